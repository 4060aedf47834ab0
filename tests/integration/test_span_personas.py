"""Personas spanning one engine run (issue #14), end to end: a real Celery worker with the vLLM
steering engine (tiny Qwen3 on CPU), Postgres, Redis and the S3-compatible server.

The worker claims the next persona the moment the current one's samples are all in the
engine, and its samples join the same vLLM run. Each persona's ``item_stream`` event records
when its first sample entered the engine and when its last came out: a persona claimed during
another's stream must have entered before that one's last sample came out (the overlap, on
record). The artifacts must equal those of the same job on a worker that does not span
(``CHATSPACE_ENGINE_SPAN_PERSONAS=0``): greedy sampling, and vLLM computes each request's rows
independently of what else is in the batch, so responses are identical and activations equal
up to float summation order. With an injected OOM on every persona's first stream the job
still succeeds, each persona halving its own cap once.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration import worker_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

# 12 samples of up to 16 tokens, 4 in flight: a persona's tail (its last 4 samples
# generating and re-read) lasts far longer than claiming the next and building its prompts
PARAMS = {"max_samples": 12, "max_tokens": 16, "batch_size": 4}
OOM_PARAMS = {"max_samples": 4, "max_tokens": 16, "batch_size": 4}  # h.reference_vectors: 4


@pytest.fixture
def services(pg_url, redis_url, s3_bucket, monkeypatch, tmp_path):
    from app.db import upgrade
    from app.settings import get_settings

    monkeypatch.setenv("CHATSPACE_DATABASE_URL", pg_url)
    monkeypatch.setenv("CHATSPACE_BROKER_URL", redis_url)
    monkeypatch.setenv("CHATSPACE_ENGINE_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "vllm")
    get_settings.cache_clear()
    upgrade(pg_url)
    procs = []
    yield procs, tmp_path / "logs"
    for p in procs:
        h.stop(p)


def _run_job(procs, logs, name: str, params=None) -> tuple[dict, dict]:
    procs.append(h.start_worker(name, logs))
    job_id = h.submit("capture", params or PARAMS)
    row = h.wait_for(job_id, log_dir=logs, worker=procs[-1], timeout=300)
    assert row["state"] == "succeeded", row
    h.stop(procs.pop())
    arts = h.check_artifacts(job_id, row)
    for item in row["items"]:  # progress per item ended complete
        assert item["samples_done"] == item["samples_total"] == len(arts[item["persona"]].keys)
    return row, arts


def _overlaps(row, *, strict: bool = True) -> list[tuple[str, str]]:
    """(earlier, later) personas whose streams were in the engine together, from the events;
    ``strict``: every persona claimed during another's stream entered before that one's last
    sample came out."""
    streams = {e["data"]["persona"]: e["data"] for e in row["events"]
               if e["kind"] == "item_stream"}
    assert set(streams) == {i["persona"] for i in row["items"]}, streams
    pairs = []
    for persona, s in streams.items():
        earlier = s["claimed_during"]
        if earlier is None:
            continue
        if s["first_in"] < streams[earlier]["last_out"]:
            pairs.append((earlier, persona))
        else:
            assert not strict, (persona, s, streams[earlier])
    return pairs


def test_personas_overlap_in_the_engine_and_store_what_a_drained_run_stores(services,
                                                                             monkeypatch):
    procs, logs = services
    row, arts = _run_job(procs, logs, "span-on")
    pairs = _overlaps(row)
    assert len(pairs) == len(row["items"]) - 1, pairs  # each next persona joined the run

    monkeypatch.setenv("CHATSPACE_ENGINE_SPAN_PERSONAS", "0")
    row_off, arts_off = _run_job(procs, logs, "span-off")
    assert not [e for e in row_off["events"] if e["kind"] == "item_stream"]
    assert sorted(arts) == sorted(arts_off)
    for persona, art in arts.items():
        ref = arts_off[persona]
        assert list(art.keys) == list(ref.keys)
        assert art.metadata["responses"] == ref.metadata["responses"], persona
        assert art.metadata["response_tokens"] == ref.metadata["response_tokens"]
        scale = max(1.0, float(np.abs(ref.activations).max()))
        np.testing.assert_allclose(art.activations, ref.activations, rtol=1e-5,
                                   atol=1e-5 * scale, err_msg=persona)
        assert set(art.vectors) == set(ref.vectors)
        for name, vec in ref.vectors.items():
            np.testing.assert_allclose(art.vectors[name], vec, rtol=1e-5, atol=1e-5 * scale)


def test_injected_oom_with_overlap_halves_each_persona_and_succeeds(services, monkeypatch):
    procs, logs = services
    monkeypatch.setenv("CHATSPACE_FAULT_OOM", "*:1")  # every persona's first stream
    row, arts = _run_job(procs, logs, "span-oom", OOM_PARAMS)
    retries = [e["data"] for e in row["events"] if e["kind"] == "oom_retry"]
    assert sorted(r["persona"] for r in retries) == sorted(i["persona"] for i in row["items"])
    assert all((r["batch_size"], r["next_batch_size"]) == (4, 2) for r in retries), retries
    # each persona's first stream ends at once (the hook raises before the engine), and the
    # halving's memory release takes a moment: most, not always all, still overlap
    assert _overlaps(row, strict=False)
    for art in arts.values():  # the right rows for the right conversations
        ref = h.reference_vectors(art)
        scale = max(1.0, float(np.abs(ref["activations"]).max()))
        np.testing.assert_allclose(art.activations, ref["activations"], rtol=1e-3,
                                   atol=1e-3 * scale)
