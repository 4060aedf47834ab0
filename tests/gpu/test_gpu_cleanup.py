"""On CUDA: GPU memory back to the worker's baseline after a job, after a failed batch and
after a model switch, and no vLLM engine process left behind.

Runs in its own pytest process (scripts/gpu-check.sh): this process never touches CUDA itself,
so NVML's device-wide reading is exactly what the engine processes hold.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.gpu

SLACK = 512 * 2**20
GPU = os.environ.get("CHATSPACE_TEST_GPU_INDEX", "0")  # physical index (NVML); scripts/gpu-check.sh
NAME = "gpu-test-worker"


@pytest.fixture
def runtime(gpu_models_dir, tmp_path, monkeypatch):
    from app.settings import Settings
    from workers.gpu import WORKER_ENV
    from workers.runtime import EngineRuntime

    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(WORKER_ENV, NAME)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    monkeypatch.setenv("CHATSPACE_ENGINE_GPU_MEMORY_UTILIZATION", "0.3")
    monkeypatch.setenv("CHATSPACE_ENGINE_MAX_MODEL_LEN", "1024")
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from workers.engine.tiny import ensure_tiny_model

    for fam in ("qwen3", "llama"):
        ensure_tiny_model(f"tiny:{fam}", settings.models_dir)
    rt = EngineRuntime(worker_name=NAME, gpu_index=GPU, settings=settings)
    yield rt
    rt.shutdown()


def _used():
    from workers.gpu import memory

    return memory(GPU).used


def _engines():
    """vLLM engine processes this test process started (the other lane's are not ours)."""
    import psutil

    from workers.gpu import engine_processes

    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    return [p for p in engine_processes() if p.pid in ours]


def test_memory_back_after_job_failure_and_switch(runtime):
    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SpecError

    empty = runtime.baseline_empty.used
    events = []
    eng = runtime.acquire("tiny:qwen3", "float32", on_event=lambda k, d: events.append(k))
    loaded = _used()
    assert loaded > empty + 1 * 2**30, "the engine should hold its KV cache on the GPU"
    assert _engines(), "a vLLM engine process should be running"

    # A job: captures of 32 requests, then the between-jobs cleanup.
    seqs = [[5 + (i * 7 + j) % 400 for j in range(300)] for i in range(32)]
    eng.generate(seqs, SamplingOptions(max_tokens=16), RequestSpec(capture=CaptureSpec()))
    figures = runtime.cleanup()
    assert figures["clean"], figures
    assert _used() <= runtime.baseline_warm.used + SLACK

    # A failed batch (bad spec raised inside generate) must not leave memory behind either.
    with pytest.raises(SpecError):
        eng.generate(seqs[:2], SamplingOptions(max_tokens=4),
                     RequestSpec(capture=CaptureSpec(layers=(99,))))
    assert runtime.cleanup()["clean"]

    # Model switch: the old engine is shut down fully (memory at the empty baseline, its
    # processes gone) before the new one loads.
    before = {p.pid for p in _engines()}
    runtime.acquire("tiny:llama", "float32", on_event=lambda k, d: events.append(k))
    assert "engine_switch" in events
    assert not before & {p.pid for p in _engines()}, "the old engine process outlived a switch"
    runtime.shutdown()
    assert _used() <= empty + SLACK, f"GPU memory {_used()} not back to baseline {empty}"
    assert not _engines(), "an engine process outlived the worker's shutdown"


def test_dirty_gpu_restarts_engine(runtime):
    """Memory held above the warm baseline after a job makes the worker restart its engine."""
    import subprocess
    import sys
    import time

    runtime.acquire("tiny:qwen3", "float32")
    # Past what the first cleanup may take as vLLM's steady state (the engine's budget)
    size = max(2 * 2**30, runtime._budget() + SLACK - runtime.footprint().used + 2**30)
    hog = subprocess.Popen([sys.executable, "-c", (
        f"import torch, time; x = torch.empty({size}, dtype=torch.uint8, device='cuda'); "
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "held"
        events = []
        figures = runtime.cleanup(on_event=lambda k, d: events.append(k))
        assert figures.get("restarted") and "engine_restart" in events
        assert runtime.engine is not None and runtime.restarts == 1
    finally:
        hog.kill()
        hog.wait()
    time.sleep(1)
    runtime.shutdown()
    assert not _engines()
