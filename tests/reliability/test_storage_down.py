"""The S3-compatible server unreachable during uploads (a proxy in front of moto refuses
connections; moto keeps its objects).

Short outage: uploads retry, no manifest exists while the job is incomplete, and the job
completes once storage is back. Outage longer than ``CHATSPACE_S3_UPLOAD_RETRY_S``: the job
fails with a storage error naming the endpoint, and writes no manifest.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.checks import StatusPoller, verify_jobs, wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _manifest_exists(stack, prefix) -> bool:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_direct, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    resp = s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix.rstrip("/") + "/")
    return any(o["Key"].endswith("/manifest.json") for o in resp.get("Contents", []))


def _prefix(stack, job):
    return stack.http.get(f"/jobs/{job}").json()["artifact_prefix"]


def test_storage_outage_uploads_retry_then_job_completes(stack, monkeypatch):
    monkeypatch.setenv("CHATSPACE_S3_UPLOAD_RETRY_S", "60")
    worker_name = "rel-s3-retry"
    stack.start_worker(worker_name)
    stack.wait_worker_ready(worker_name)
    stack.proxy.down()  # before any upload: every persona's upload meets the outage
    job = stack.submit(max_samples=2, batch_size=2, max_tokens=4)
    prefix = _prefix(stack, job)
    worker_log = stack.logs / f"{worker_name}.log"
    with StatusPoller(stack.http, [job]) as poll:
        seen_manifest = []
        # down until an upload has met the outage (a fixed 6 s was shorter than the first
        # persona's generation on a loaded machine: the upload then ran after the outage),
        # then a few seconds more: nothing completes meanwhile
        deadline, until = time.monotonic() + 120, None
        while until is None or time.monotonic() < until:
            assert time.monotonic() < deadline, f"no upload met the outage\n{stack.log_tail()}"
            if until is None and "retrying" in worker_log.read_text(errors="replace"):
                until = time.monotonic() + 3
            seen_manifest.append(_manifest_exists(stack, prefix))
            time.sleep(0.5)
        state = stack.http.get(f"/jobs/{job}").json()["state"]
        assert state in ("queued", "running"), state
        stack.proxy.up()
        t0 = time.monotonic()
        wait_jobs([job], timeout=150, logs=stack.log_tail)
        recovery = time.monotonic() - t0
    assert not any(seen_manifest), "a manifest appeared for an incomplete job"
    fig = verify_jobs([job], scenario="S3 down during uploads (recovers)")
    fig.recovery_s, fig.p99_ms = round(recovery, 1), poll.p99_ms()
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig


def test_storage_down_past_limit_fails_naming_endpoint(stack, monkeypatch):
    monkeypatch.setenv("CHATSPACE_S3_UPLOAD_RETRY_S", "3")
    monkeypatch.setenv("CHATSPACE_MAX_ITEM_ATTEMPTS", "1")
    worker_name = "rel-s3-fail"
    stack.start_worker(worker_name)
    stack.wait_worker_ready(worker_name)
    stack.proxy.down()
    job = stack.submit(max_samples=1, batch_size=1, max_tokens=2)
    prefix = _prefix(stack, job)
    with StatusPoller(stack.http, [job]) as poll:
        t0 = time.monotonic()
        row = wait_jobs([job], timeout=150, logs=stack.log_tail)[job]
        took = time.monotonic() - t0
    stack.proxy.up()
    assert row["state"] == "failed", row["state"]
    errors = " ".join(filter(None, [row["error"], *(e["message"] or "" for e in row["events"])]))
    assert stack.proxy.url in errors, f"the error does not name the endpoint: {errors[:500]}"
    assert not _manifest_exists(stack, prefix)
    fig = verify_jobs([job], scenario="S3 down past the retry limit", expect="failed")
    fig.recovery_s, fig.p99_ms = round(took, 1), poll.p99_ms()
    fig.notes.append("failed(error) naming the endpoint, as configured")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig
