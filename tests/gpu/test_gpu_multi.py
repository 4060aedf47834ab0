"""On two GPUs: tensor parallel gives the same captures and steered tokens as one GPU, and two
workers pinned to two GPUs drain one queue with no persona done twice.

Skipped with fewer than two GPUs (device kind ``nvidia-h100-x2``). The two-worker test runs
on the embedded default (SQLite + filesystem broker + local artifact folder): the GPU machine
has no Postgres or Redis; the same claim path on Postgres is covered by the CPU integration
tests.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (device kind nvidia-h100-x2)")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def test_tensor_parallel_matches_single_gpu(gpu_models_dir):
    import torch

    from workers.engine.engine import SteeringEngine
    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SteerOp
    from workers.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model("tiny:qwen3", Path(gpu_models_dir))
    rnd = random.Random(3)
    seqs = [[rnd.randrange(3, 500) for _ in range(rnd.randrange(20, 160))] for _ in range(6)]
    plens = [len(s) // 2 for s in seqs]
    g = torch.Generator().manual_seed(0)
    results = {}
    for tp in (1, 2):
        eng = SteeringEngine(str(path), dtype="float32", max_model_len=1024,
                             gpu_memory_utilization=0.3, tensor_parallel_size=tp)
        try:
            if tp == 1:
                vec = (torch.randn(eng.hidden_size, generator=g) * 2.0).tolist()
                unit = torch.randn(eng.hidden_size, generator=g).tolist()
                ops = [None, SteerOp("add", 1, vec, scale=1.5), SteerOp("cap", 2, unit, max=0.5),
                       SteerOp("ablate", 0, unit, scale=0.0), None, SteerOp("add", 3, vec)]
                specs = [RequestSpec(steer=(op,) if op else (), capture=CaptureSpec(),
                                     key=f"r{i}") for i, op in enumerate(ops)]
            caps = eng.capture(seqs, RequestSpec(capture=CaptureSpec()), prompt_lens=plens)
            gens = eng.generate(seqs, SamplingOptions(max_tokens=12), specs)
        finally:
            eng.shutdown()
        results[tp] = (caps, gens)
    (c1, g1), (c2, g2) = results[1], results[2]
    worst = max(_rel(a.means[s], b.means[s]) for a, b in zip(c2, c1)
                for s in ("prompt", "response", "last_prompt"))
    assert worst < 1e-3, f"TP=2 captures differ from TP=1 by {worst:.3g}"
    for i, (a, b) in enumerate(zip(g2, g1)):
        assert a.token_ids == b.token_ids, f"request {i}: TP=2 steered tokens differ from TP=1"
        assert _rel(a.capture.means["prompt"], b.capture.means["prompt"]) < 1e-3


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
