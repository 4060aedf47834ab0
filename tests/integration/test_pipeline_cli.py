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
    # three traits and the default persona, captured once per job (#10)
    assert sorted(e["persona"] for e in entries) == personas == [
        "curious", "default", "optimistic", "sycophantic"]
    for e in entries:
        assert store.verify(e["key"], e["sha256"]) and e["key"].endswith(".safetensors")
        assert e["shapes"]["activations"][0] == e["n_samples"]
        assert e["n_samples"] == 4 or e["persona"] == "default"
    assert all(_wait_gone(pid) for pid in pids)  # the local worker exits once idle


@pytest.mark.timeout(600)
def test_submit_wait_for_a_model_no_worker_can_load(tmp_path):
    """``submit --model X --wait`` for a model that cannot be loaded here (hub offline): the
    local worker it starts fails to load, the wait shows the error and ends with exit 3 and
    the reason (it used to hang with the error only in the worker's log); a second
    ``submit --wait`` right after starts a new local worker and runs its job. The workers
    use the transformers backend: the mechanics are the same and it starts in seconds."""
    data = tmp_path / "data"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "CHATSPACE_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1",
           "CHATSPACE_LOAD_RETRY_S": "1", "CHATSPACE_ENGINE_BACKEND": "hf",
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {})}
    exe = str(Path(sys.executable).with_name("chatspace-jobs"))
    t0 = time.monotonic()
    bad = subprocess.run([exe, "submit", "traits_sample", "--model", "org/no-such-model",
                          "--max-samples", "1", "--wait"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=240, check=False)
    took = time.monotonic() - t0
    log = data / "logs" / "local-worker.log"
    detail = (bad.stdout[-2000:], bad.stderr[-3000:],
              log.read_text()[-3000:] if log.exists() else "no worker log")
    assert bad.returncode == 3, detail
    assert "starting a local one" in bad.stderr, detail
    assert "failed (error): 3 failed model loads" in bad.stderr, detail
    assert "could not load org/no-such-model (float32)" in bad.stderr, detail
    assert took < 200, took

    ok = subprocess.run([exe, "submit", "traits_sample", "--max-samples", "1",
                         "--max-tokens", "4", "--wait"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=240, check=False)
    detail = (ok.stdout[-2000:], ok.stderr[-3000:], log.read_text()[-3000:])
    assert ok.returncode == 0, detail
    assert "starting a local one" in ok.stderr, detail
