"""The warm baseline is read after a warm-up batch, not right after load (issue 18): vLLM's
memory grows with its first real batch, and a baseline read before that made every job end
in an engine restart. GPU memory readings are faked here (the edge); the GPU version of the
check is tests/gpu/test_gpu_cleanup.py."""

from __future__ import annotations

from app.settings import Settings
from workers import gpu
from workers.runtime import EngineRuntime


class _Engine:
    num_layers, hidden_size = 2, 8

    def __init__(self, log):
        self.log = log

    def warm_up(self, n):
        self.log.append(("warm_up", n))
        _State.used += 3 * 2**30  # the steady state vLLM reaches after its first batch

    def shutdown(self):
        pass


class _State:
    used = 10 * 2**30


def _reading(_gpu):
    return gpu.MemoryReading(used=_State.used, total=80 * 2**30)


def test_baseline_after_warm_up(monkeypatch):
    monkeypatch.setattr(gpu, "memory", _reading)
    monkeypatch.setattr(gpu, "free_process_memory", lambda: None)
    log = []
    rt = EngineRuntime(worker_name="w", gpu_index="0", settings=Settings(),
                       loader=lambda m, d, s: _Engine(log))
    rt.acquire("tiny:qwen3", "float32")
    assert log == [("warm_up", Settings().engine.warmup_prompts)]
    assert rt.baseline_warm.used == 13 * 2**30  # read after the warm-up


def test_no_warm_up_without_gpu_readings_or_when_off(monkeypatch):
    monkeypatch.setattr(gpu, "memory", lambda _g: None)
    monkeypatch.setattr(gpu, "free_process_memory", lambda: None)
    log = []
    rt = EngineRuntime(worker_name="w", gpu_index=None, settings=Settings(),
                       loader=lambda m, d, s: _Engine(log))
    rt.acquire("tiny:qwen3", "float32")
    assert log == []
    monkeypatch.setattr(gpu, "memory", _reading)
    off = Settings()
    off.engine.warmup_prompts = 0
    rt2 = EngineRuntime(worker_name="w", gpu_index="0", settings=off,
                        loader=lambda m, d, s: _Engine(log))
    rt2.acquire("tiny:qwen3", "float32")
    assert log == []
