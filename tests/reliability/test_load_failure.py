"""A worker that cannot load the job's model: the job says why at once and fails after a
bounded number of failed loads, instead of staying ``queued`` with no error.

The model here is one no worker can load (a Hugging Face id that is not on the machine, hub
offline): the same path as an engine that runs out of GPU memory at start, or a model vLLM
cannot serve — the engine's constructor raises. Two ways in:

- a worker serving that model loads it at start, retries a bounded number of times, records
  each failure on the jobs waiting for it, and exits;
- an any-model worker loads it when the job's message arrives; the reconciler wakes it again
  (the job has no holder and the queue is empty), until the bound fails the job. The worker
  itself stays up for other jobs.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.checks import job_state, wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MISSING = "org/no-such-model"
BOUND = 3  # max_load_failures (the default)


def _load_failures(row) -> list[dict]:
    return [e for e in row["events"] if e["kind"] == "load_failed"]


def _check_failed(stack, job: str, worker: str) -> dict:
    row = job_state(job)
    assert row["state"] == "failed" and row["failure_kind"] == "error", row
    failures = _load_failures(row)
    assert len(failures) == BOUND, [e["message"] for e in failures]
    assert all(e["data"]["model"] == MISSING for e in failures)
    for text in (row["error"], *(e["message"] for e in failures)):
        assert f"worker {worker} could not load {MISSING}" in text, text
        assert "no-such-model" in text and "Error" in text, text  # the loader's own words
    assert all(i["state"] == "failed" for i in row["items"]), row["items"]
    api = stack.http.get(f"/jobs/{job}").json()  # what `status` and `--wait` print
    assert api["state"] == "failed" and api["last_error"] == row["error"], api
    return row


def test_worker_that_cannot_load_at_start_fails_its_jobs_with_the_reason(stack, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = stack.submit(model=MISSING)
    t0 = time.monotonic()
    worker = stack.start_worker("rel-load-start", model=MISSING, CHATSPACE_LOAD_RETRY_S=4)
    # the first failure is on the job while it is still queued (the next try is 4 s away)
    row = wait_jobs([job], timeout=120, logs=stack.log_tail,
                    until=lambda r: bool(_load_failures(r[job])))[job]
    queued = stack.http.get(f"/jobs/{job}").json()
    assert queued["state"] == "queued", queued
    assert f"could not load {MISSING}" in (queued["last_error"] or ""), queued
    wait_jobs([job], timeout=120, logs=stack.log_tail)
    took = time.monotonic() - t0
    row = _check_failed(stack, job, "rel-load-start")
    assert worker.wait(60) != 0, "the worker kept running without an engine"
    from tests.reliability.checks import Figures

    fig = Figures(scenario="model cannot load at worker start", jobs=1, recovery_s=round(took, 1))
    fig.notes.append(f"failed after {BOUND} loads: {row['error'][:160]}")
    fig.record()


def test_any_model_worker_that_cannot_load_stays_up_and_the_job_fails(stack, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    worker = stack.start_worker("rel-load-any", model=None)
    deadline = time.monotonic() + 120
    while not any(w["name"] == "rel-load-any" and w.get("alive")
                  for w in stack.http.get("/workers").json()["workers"]):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.3)
    job = stack.submit(model=MISSING)
    wait_jobs([job], timeout=120, logs=stack.log_tail)
    _check_failed(stack, job, "rel-load-any")
    assert worker.poll() is None, "the any-model worker died with the load"
    ok = stack.submit(dataset="one_persona", max_samples=1, max_tokens=2)  # it still serves
    assert wait_jobs([ok], timeout=180, logs=stack.log_tail)[ok]["state"] == "succeeded"
