"""OOM injected into the engine (``CHATSPACE_FAULT_OOM``, see workers/batching.py).

Transient: one persona's first batch OOMs, the batch is halved and the job succeeds. Persisting:
every batch OOMs down to the floor, the job is ``failed(oom)`` with the batch sizes and memory
figures, and the same worker then takes and completes the next job.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.checks import StatusPoller, job_state, verify_jobs, wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_transient_oom_retries_with_smaller_batch(stack):
    stack.start_worker("rel-oom-once", CHATSPACE_FAULT_OOM="curious:1")
    job = stack.submit(max_samples=4, batch_size=4, max_tokens=4)
    with StatusPoller(stack.http, [job]) as poll:
        t0 = time.monotonic()
        row = wait_jobs([job], timeout=150, logs=stack.log_tail)[job]
        took = time.monotonic() - t0
    retries = [e["data"] for e in row["events"] if e["kind"] == "oom_retry"]
    assert [(r["persona"], r["batch_size"], r["next_batch_size"]) for r in retries] == [
        ("curious", 4, 2)], retries
    fig = verify_jobs([job], scenario="OOM once (halved, recovers)")
    fig.recovery_s, fig.p99_ms = round(took, 1), poll.p99_ms()
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig


def test_persisting_oom_fails_job_with_figures_then_next_job_runs(stack):
    stack.start_worker("rel-oom-always", CHATSPACE_FAULT_OOM="curious:99")
    doomed = stack.submit(max_samples=2, batch_size=2, max_tokens=4)
    fine = stack.submit(dataset="roles_sample", max_samples=2, batch_size=2, max_tokens=4)
    with StatusPoller(stack.http, [doomed, fine]) as poll:
        t0 = time.monotonic()
        rows = wait_jobs([doomed, fine], timeout=180, logs=stack.log_tail)
        took = time.monotonic() - t0
    row = rows[doomed]
    assert (row["state"], row["failure_kind"]) == ("failed", "oom"), row
    final = [e["data"] for e in row["events"] if e["kind"] == "oom_failed"]
    assert final and final[0]["failed_sizes"] == [2, 1] and "memory" in final[0], final
    api = stack.http.get(f"/jobs/{doomed}").json()
    assert api["state"] == "failed" and api["failure_kind"] == "oom", api
    assert api["progress"]["ooms"] >= 1, api["progress"]
    fig_doomed = verify_jobs([doomed], scenario="x", expect="failed", failure_kind="oom")
    fig = verify_jobs([fine], scenario="OOM persisting (failed(oom), next job runs)")
    assert job_state(fine)["state"] == "succeeded"
    fig.jobs += 1
    fig.duplicates += fig_doomed.duplicates
    fig.recovery_s, fig.p99_ms = round(took, 1), poll.p99_ms()
    fig.notes.append("job 1 failed(oom) with failed_sizes [2, 1]; job 2 succeeded")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig
