"""The streaming path of the pipeline and the job loop, on fake engines (the real stream is
tests/engine/test_vllm_stream.py): samples finish out of order and in uneven groups, an
out-of-memory error mid-stream halves the cap and re-adds only the unfinished samples, and a
persona's store step runs in a thread while the next persona streams, its item completed only
after the store returned."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app import jobs
from app.artifacts import read_persona_artifact
from app.db import session_scope, upgrade
from app.errors import EngineOOM
from app.models import Job, JobEvent, JobItem
from app.settings import get_settings
from tests.unit.test_jobloop import FakeWorker
from tests.unit.test_pipeline_capture import FakeEngine, make_ctx
from workers import batching, jobloop, pipeline
from workers.batching import BatchPolicy
from workers.engine.spec import (
    CaptureSpec,
    RequestSpec,
    Reread,
    SamplingOptions,
    SpecError,
    StreamItem,
    StreamResult,
)
from workers.engine.stream import sequential_stream


class StreamingEngine(FakeEngine):
    """``stream`` with the engine's contract: at most ``max_in_flight`` samples in flight,
    generations finish newest first, each re-read one pull later; ``oom_after`` results
    raises an out-of-memory error once."""

    def __init__(self, oom_after: int | None = None):
        super().__init__()
        self.oom_after = oom_after
        self.caps: list[int] = []
        self.generated: list[str] = []
        self.max_live = 0
        self.closed = 0

    def stream(self, items, options, *, reread=None, max_in_flight=None):
        self.caps.append(max_in_flight)
        it = iter(items)
        gens: list[StreamItem] = []
        reads: list[tuple[StreamItem, object, Reread]] = []
        done = 0
        try:
            while True:
                while len(gens) + len(reads) < max_in_flight and (item := next(it, None)):
                    gens.append(item)
                self.max_live = max(self.max_live, len(gens) + len(reads))
                if not gens and not reads:
                    return
                out = []
                for item, gen, again in reads:  # last step's re-reads finish now
                    cap = self.capture([again.sequence], [again.spec])[0]
                    out.append(StreamResult(item.tag, gen, cap))
                reads = []
                for item in gens[::-1][:2]:  # the two newest generations finish
                    gens.remove(item)
                    gen = self.generate([item.prompt], options, [item.spec])[0]
                    self.generated.append(item.spec.key if item.spec else str(item.tag))
                    again = reread(item, gen) if reread else None
                    if again is None:
                        out.append(StreamResult(item.tag, gen))
                    else:
                        reads.append((item, gen, again))
                if self.oom_after is not None and done + len(out) > self.oom_after:
                    self.oom_after = None
                    raise RuntimeError("CUDA out of memory (fake)")
                done += len(out)
                if out:
                    yield out
        finally:
            self.closed += 1


@pytest.fixture(autouse=True)
def _faults():
    batching._fault_counts.clear()
    yield
    batching._fault_counts.clear()


def _artifact(ctx):
    result = pipeline.run_item(ctx)
    return read_persona_artifact(ctx.store.get_bytes(result.artifact_key,
                                                     expect_sha256=result.sha256))


def test_streamed_capture_equals_the_chunked_one():
    ctx, _, _, _, _ = make_ctx(layers=[0, 2], max_samples=12)
    ref = _artifact(ctx)
    ctx, _, progress, _, _ = make_ctx(layers=[0, 2], max_samples=12)
    ctx.engine = eng = StreamingEngine()
    art = _artifact(ctx)
    assert eng.caps == [4] and eng.max_live <= 4 and eng.closed == 1
    assert art.keys == ref.keys and art.metadata["responses"] == ref.metadata["responses"]
    np.testing.assert_array_equal(art.activations, ref.activations)
    assert set(art.vectors) == set(ref.vectors)
    dones = [d for d, _ in progress]
    assert dones[0] == 0 and dones[-1] == 12 and dones == sorted(dones) and len(dones) > 3


def test_oom_mid_stream_halves_the_cap_and_readds_only_the_unfinished(monkeypatch):
    ctx, _, _, _, _ = make_ctx(layers=[0, 2], max_samples=12)
    ref = _artifact(ctx)
    ctx, _, _, events, _ = make_ctx(layers=[0, 2], max_samples=12)
    ctx.engine = eng = StreamingEngine(oom_after=5)
    art = _artifact(ctx)
    assert eng.caps == [4, 2] and eng.closed == 2
    assert [k for k, _ in events] == ["oom_retry"]
    assert events[0][1]["batch_size"] == 4 and events[0][1]["next_batch_size"] == 2
    # generated once each, except those in flight when the OOM hit (generated again)
    assert set(eng.generated) == {str(i) for i in range(12)}
    assert 12 < len(eng.generated) <= 12 + 4
    assert art.keys == ref.keys
    np.testing.assert_array_equal(art.activations, ref.activations)


def ref_samples(ctx):
    return pipeline.item_samples(ctx, pipeline.load_dataset(ctx.dataset, settings=ctx.settings),
                                 ctx.persona)


def test_oom_at_the_floor_fails_with_every_size():
    ctx, _, _, events, _ = make_ctx(max_samples=12)
    ctx.engine = StreamingEngine(oom_after=0)
    policy = pipeline._policy(ctx)
    policy.min_batch = 4
    with pytest.raises(EngineOOM) as err:
        pipeline.generate_and_capture(ctx, ref_samples(ctx), capture=True, policy=policy)
    assert err.value.memory["failed_sizes"] == [4] and events[-1][0] == "oom_failed"


def test_rollout_streams_without_rereads():
    ctx, _, _, _, _ = make_ctx(kind="rollout", max_samples=6, steer=[
        {"op": "add", "layer": 1, "vector": [0.5] * 8, "scale": 2.0}])
    ctx.engine = eng = StreamingEngine()
    rows = pipeline.generate_and_capture(ctx, ref_samples(ctx), capture=False,
                                         steer=pipeline.resolve_steering(
                                             ctx.params.steer, load_vector=None,
                                             persona=ctx.persona, num_layers=3,
                                             hidden_size=8)[0])
    assert [r["sample"].key for r in rows] == [s.key for s in ref_samples(ctx)]
    assert "means" not in rows[0] and eng.closed == 1


def test_cancel_closes_the_stream():
    from workers.batching import JobCancelled

    ctx, _, _, _, _ = make_ctx(max_samples=12)
    ctx.engine = eng = StreamingEngine()
    calls = []
    ctx.should_cancel = lambda: calls.append(1) or len(calls) > 3
    with pytest.raises(JobCancelled):
        pipeline.run_item(ctx)
    assert eng.closed == 1 and len(eng.generated) < 12


def test_sequential_stream_chunks_and_rereads():
    eng = FakeEngine()
    items = [StreamItem(i, [5, 6, 7 + i]) for i in range(5)]
    spec = RequestSpec(capture=CaptureSpec(layers=(0,)))
    out = list(sequential_stream(eng, items, SamplingOptions(max_tokens=3),
        reread=lambda it, g: Reread(list(it.prompt) + g.token_ids, spec) if it.tag % 2 else None,
        max_in_flight=2))
    assert eng.batches == [2, 2, 1] and [len(b) for b in out] == [2, 2, 1]
    flat = [r for b in out for r in b]
    assert [r.tag for r in flat] == list(range(5))
    assert [r.capture is not None for r in flat] == [False, True, False, True, False]
    with pytest.raises(SpecError, match="prompt_len"):
        list(sequential_stream(eng, items, SamplingOptions(), max_in_flight=2,
                               reread=lambda it, g: Reread([1, 2], spec,
                                                           prompt_len=1 if it.tag else None)))


def test_policy_stream_keeps_done_items_across_an_oom():
    seen, freed = [], []

    def run(pending, cap):
        seen.append(([i for i, _ in pending], cap))
        for k in range(0, len(pending), cap):
            chunk = pending[k:k + cap]
            if len(seen) == 1 and k >= 2 * cap:
                raise RuntimeError("CUDA out of memory")
            yield [(i, x * 10) for i, x in chunk]

    policy = BatchPolicy(persona="p", batch_size=3, free_memory=lambda: freed.append(1))
    assert policy.stream(list(range(10)), run) == [x * 10 for x in range(10)]
    assert seen == [(list(range(10)), 3), (list(range(6, 10)), 1)]
    assert policy.failed_sizes == [3] and freed == [1]


def test_store_step_runs_while_the_next_persona_streams(monkeypatch):
    """The first persona's store overlaps the second's engine part, in another thread; each
    item completes only after its store returned; a store that fails fails its item, which is
    retried, and the job still succeeds with every artifact."""
    settings = get_settings()
    upgrade()
    with session_scope() as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                              dtype="float32", params={"max_samples": 2, "batch_size": 2,
                                                       "max_tokens": 4},
                              personas=["curious", "optimistic"])
        job_id = str(job.id)
    spans: dict[str, list] = {"compute": [], "store": []}
    failed = []
    compute, store = pipeline.generate_and_capture, pipeline._store_capture

    def timed_compute(ctx, *a, **kw):
        t = time.monotonic()
        rows = compute(ctx, *a, **kw)
        time.sleep(0.3)
        spans["compute"].append((ctx.persona, t, time.monotonic()))
        return rows

    def timed_store(ctx, *a, **kw):
        t = time.monotonic()
        time.sleep(0.3)
        if ctx.persona == "optimistic" and not failed:
            failed.append(1)
            raise OSError("the store is down (fake)")
        with session_scope() as s:  # not yet completed while its store runs
            item = s.query(JobItem).filter_by(job_id=job_id, persona=ctx.persona).one()
            assert item.state == "running"
        out = store(ctx, *a, **kw)
        spans["store"].append((ctx.persona, t, time.monotonic(),
                               threading.current_thread() is threading.main_thread()))
        return out

    monkeypatch.setattr(pipeline, "generate_and_capture", timed_compute)
    monkeypatch.setattr(pipeline, "_store_capture", timed_store)
    worker = FakeWorker(settings, FakeEngine())
    assert jobloop.execute_job(job_id, worker=worker)["ran"] == 2
    (p0, _, _), (_, c2, c3) = spans["compute"][:2]
    first = next(s for s in spans["store"] if s[0] == p0)
    assert not first[3]  # a background thread
    assert first[1] < c3 and first[2] > c2  # stored while the next persona computed
    with session_scope() as s:
        assert s.get(Job, job_id).state == "succeeded"
        items = s.query(JobItem).filter_by(job_id=job_id).all()
        assert all(i.state == "succeeded" and i.artifact_sha256 for i in items)
        assert {i.persona: i.attempt for i in items}["optimistic"] == 2
        kinds = [e.kind for e in s.query(JobEvent).filter_by(job_id=job_id)]
        assert kinds.count("state") >= 4
