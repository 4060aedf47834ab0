"""On two GPUs: tensor parallel gives the same captures and steered tokens as one GPU, and two
workers pinned to two GPUs drain one queue with no persona done twice.

Skipped with fewer than two GPUs (device kind ``nvidia-h100-x2``). The two-worker test runs
on the embedded default (SQLite + filesystem broker + local artifact folder): the GPU machine
has no Postgres or Redis; the same claim path on Postgres is covered by the CPU integration
tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.engine.tp_check import assert_tp2_matches_tp1
from tests.gpu.figures import record

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (device kind nvidia-h100-x2)")


@pytest.mark.parametrize("path", ["eager", "ingraph"])
def test_tensor_parallel_matches_single_gpu(path, gpu_models_dir):
    """The in-graph case runs compiled with CUDA graphs and the IPC readout of rank 0's
    block (the settings' ``auto`` keeps TP > 1 on the eager hooks until this passed)."""
    from workers.engine.tiny import ensure_tiny_model

    worst = assert_tp2_matches_tp1(ensure_tiny_model("tiny:qwen3", Path(gpu_models_dir)),
                                   gpu_memory_utilization=0.3, steering_path=path)
    record("tensor_parallel", model="tiny:qwen3", path=path, worst_capture_rel_err=worst,
           tol=1e-3)


def test_two_pinned_workers_drain_one_queue(tmp_path, monkeypatch):
    from sqlalchemy import select

    from app.db import session_scope, upgrade
    from app.models import JobEvent, JobItem, Worker
    from app.settings import get_settings
    from tests.integration import worker_helpers as h

    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CHATSPACE_ENGINE_GPU_MEMORY_UTILIZATION", "0.3")
    monkeypatch.setenv("CHATSPACE_ENGINE_MAX_MODEL_LEN", "512")
    for var in ("CHATSPACE_DATABASE_URL", "CHATSPACE_BROKER_URL", "CHATSPACE_S3_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    upgrade()
    logs = tmp_path / "logs"
    procs = [h.start_worker(f"gpu-w{i}", logs, gpu_index=str(i), exit_when_idle=False)
             for i in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while True:  # both engines warm before any job exists, so both can take one
            with session_scope() as s:
                ready = {w.name for w in s.execute(select(Worker)).scalars()
                         if w.state == "idle" and w.model_info}
            if {"gpu-w0", "gpu-w1"} <= ready:
                break
            assert all(p.poll() is None for p in procs), _logs(logs)
            assert time.monotonic() < deadline, f"workers not ready: {ready}\n{_logs(logs)}"
            time.sleep(1)
        job_ids = [h.submit("capture", {"max_samples": 8}) for _ in range(6)]
        rows = [h.wait_for(j, timeout=300, log_dir=logs) for j in job_ids]
    finally:
        for p in procs:
            h.stop(p)
    assert all(r["state"] == "succeeded" for r in rows), [r["state"] for r in rows]
    with session_scope() as s:
        items = s.execute(select(JobItem).where(JobItem.job_id.in_(job_ids))).scalars().all()
        claims = s.execute(select(JobEvent).where(JobEvent.job_id.in_(job_ids),
                                                  JobEvent.to_state == "running",
                                                  JobEvent.item_id.is_not(None))).scalars().all()
        assert items and all(i.state == "succeeded" and i.attempt == 1 for i in items)
        per_item = {}
        for e in claims:
            per_item.setdefault(e.item_id, []).append(e.worker)
        record("two_pinned_workers", jobs=len(job_ids), personas=len(items),
               claims=len(claims), per_worker={w: sum(v == [w] for v in per_item.values())
                                               for w in ("gpu-w0", "gpu-w1")})
        assert all(len(w) == 1 for w in per_item.values()), "a persona was claimed twice"
        assert set(per_item) == {i.id for i in items}
        assert {w[0] for w in per_item.values()} == {"gpu-w0", "gpu-w1"}, \
            "both pinned workers should have taken work"
        gpus = {w.name: w.gpu for w in s.execute(select(Worker)).scalars()}
    assert gpus["gpu-w0"] == "0" and gpus["gpu-w1"] == "1"
    for job_id, row in zip(job_ids, rows):
        h.check_artifacts(job_id, row)


def _logs(log_dir) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(log_dir.glob("*.log")))
