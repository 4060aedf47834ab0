"""The README's main job through the real CLI: ``chatspace-jobs submit ... --wait`` as a
subprocess with nothing configured but a data directory (SQLite, the filesystem broker, the
local artifact folder). The CLI enqueues through ``workers.dispatch.enqueue_job`` and, with
no live worker, starts one with ``workers.cli.run_local_until_idle``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def _wait_gone(pid: int, timeout: float = 60.0) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_submit_wait_on_the_embedded_default(tmp_path, monkeypatch):
    data = tmp_path / "data"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "CHATSPACE_DATA_DIR": str(data)}
    exe = Path(sys.executable).with_name("chatspace-jobs")
    proc = subprocess.run([str(exe), "submit", "traits_sample", "--max-samples", "4",
                           "--max-tokens", "8", "--wait"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, check=False)
    log = data / "logs" / "local-worker.log"
    detail = (proc.stdout[-2000:], proc.stderr[-2000:],
              log.read_text()[-3000:] if log.exists() else "no worker log")
    assert proc.returncode == 0, detail
    job_id = proc.stdout.split()[0]
    assert len(job_id) == 32, detail

    # Read the outcome with this process's settings pointed at the same data directory.
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job, JobItem, Worker
    from app.settings import get_settings
    from app.storage import get_store

    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(data))
    get_settings.cache_clear()
    with session_scope() as s:
        job = s.get(Job, job_id)
        items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
        workers = s.execute(select(Worker)).scalars().all()
        assert job.state == "succeeded" and job.manifest_key, detail
        manifest_key = job.manifest_key
        personas = sorted(i.persona for i in items)
        pids = [w.pid for w in workers]
    store = get_store(get_settings())
    manifest = json.loads(store.get_bytes(manifest_key))
    entries = [e for e in manifest["artifacts"] if e["kind"] == "persona"]
    assert sorted(e["persona"] for e in entries) == personas == [
        "curious", "optimistic", "sycophantic"]
    for e in entries:
        assert store.verify(e["key"], e["sha256"]) and e["key"].endswith(".safetensors")
        assert e["shapes"]["activations"][0] == e["n_samples"] == 4
    assert all(_wait_gone(pid) for pid in pids)  # the local worker exits once idle
