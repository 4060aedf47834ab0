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


GB = 2**30


class _Card:
    """A fake GPU: the device-wide reading, and what each process holds on it."""

    def __init__(self, **procs):
        self.procs = dict(procs)  # pid -> bytes
        self.total = 80 * GB

    def memory(self, _gpu):
        return gpu.MemoryReading(used=sum(self.procs.values()), total=self.total)

    def process_memory(self, _gpu, pids):
        mine = [b for pid, b in self.procs.items() if pid in pids]
        return sum(mine) if mine else None


def _patch(monkeypatch, card: _Card, *, per_process: bool = True) -> None:
    monkeypatch.setattr(gpu, "memory", card.memory)
    monkeypatch.setattr(gpu, "process_memory",
                        card.process_memory if per_process else lambda _g, _p: None)
    monkeypatch.setattr(gpu, "free_process_memory", lambda: None)
    monkeypatch.setattr(gpu, "wait_for_baseline", _no_wait(gpu.wait_for_baseline))


def _runtime(monkeypatch, card: _Card, *, per_process: bool, warm: int = 30 * GB,
             share: float = 0.5, **engine_settings):
    """A runtime on ``card`` whose engine holds ``warm`` bytes after its warm-up; the
    engine's share is ``share`` of the card (0.5: 40 GB of 80)."""
    import os

    me = os.getpid()
    _patch(monkeypatch, card, per_process=per_process)
    loads = []

    class Engine(_Engine):
        def warm_up(self, n):
            card.procs[me] = card.procs.get(me, 0) + warm  # loaded and warmed up

        def shutdown(self):
            card.procs[me] = 0

    settings = Settings()
    settings.engine.gpu_memory_utilization = share
    for k, v in engine_settings.items():
        setattr(settings.engine, k, v)
    rt = EngineRuntime(worker_name="w", gpu_index="0", settings=settings,
                       loader=lambda m, d, s: loads.append(m) or Engine([]))
    rt.acquire("tiny:qwen3", "float32")
    return rt, loads, me


def _no_wait(real):
    def wait(*a, **kw):
        kw["timeout_s"] = 0.0
        return real(*a, **kw)
    return wait


def test_first_job_steady_state_becomes_the_baseline_a_later_leak_restarts(monkeypatch):
    card = _Card()
    rt, loads, me = _runtime(monkeypatch, card, per_process=True)
    events = []
    card.procs[me] += 3 * GB  # vLLM's steady state after the first real job
    figures = rt.cleanup(on_event=lambda k, d: events.append(k))
    assert figures["clean"] and figures["baseline_raised"] and events == ["memory_baseline"]
    assert rt.baseline_warm.used == 33 * GB and loads == ["tiny:qwen3"]
    assert rt.cleanup()["clean"] and loads == ["tiny:qwen3"]  # the next job: same engine
    card.procs[me] += 1 * GB  # grows again after a later job: a leak
    figures = rt.cleanup(on_event=lambda k, d: events.append(k))
    assert figures.get("restarted") and loads == ["tiny:qwen3", "tiny:qwen3"]
    assert events[-2:] == ["engine_restart", "engine_loaded"]


def test_first_job_above_the_engines_share_restarts(monkeypatch):
    card = _Card()
    rt, loads, me = _runtime(monkeypatch, card, per_process=True)
    card.procs[me] += 12 * GB  # 42 GB: above the 40 GB share
    assert rt.cleanup().get("restarted") and len(loads) == 2


def test_the_worker_processs_own_context_counts_beside_the_engines_share(monkeypatch):
    """The in-graph readout maps captures into the worker process, which then holds a CUDA
    context outside vLLM's share: read once the engine is up, it is budgeted, so the first
    job's steady state beside it becomes the baseline instead of a restart."""
    import os

    card = _Card()
    me = os.getpid()
    _patch(monkeypatch, card)
    loads = []

    class Engine(_Engine):
        def warm_up(self, n):
            card.procs[me] += 30 * GB

    def load(m, d, s):
        card.procs[me] = 1 * GB  # the worker's context, made by the engine's self-test
        loads.append(m)
        return Engine([])

    settings = Settings()
    settings.engine.gpu_memory_utilization = 0.5  # 40 GB of 80
    rt = EngineRuntime(worker_name="w", gpu_index="0", settings=settings, loader=load)
    rt.acquire("tiny:qwen3", "float32")
    assert rt.own_bytes == 1 * GB
    card.procs[me] += 10 * GB  # 41 GB: the 40 GB share plus the context
    figures = rt.cleanup()
    assert figures["clean"] and figures.get("baseline_raised") and loads == ["tiny:qwen3"]
    card.procs[me] += 2 * GB  # past share + context: restarted as before
    assert rt.cleanup().get("restarted") and len(loads) == 2


def test_other_processes_on_the_card_do_not_restart_the_engine(monkeypatch):
    """Per-process readings: another engine loading on the same GPU (the benchmark's own)
    is not this worker's leak; with device-wide readings it would be."""
    card = _Card(other=5 * GB)
    rt, loads, _ = _runtime(monkeypatch, card, per_process=True)
    assert rt.per_process
    card.procs["bench"] = 30 * GB
    assert rt.cleanup()["clean"] and rt.cleanup()["clean"] and loads == ["tiny:qwen3"]
    card2 = _Card(other=5 * GB)
    rt2, loads2, _ = _runtime(monkeypatch, card2, per_process=False)
    assert not rt2.per_process
    card2.procs["bench"] = 30 * GB
    assert rt2.cleanup().get("restarted") and len(loads2) == 2


def test_steady_state_above_the_share_as_vllm_holds_it_on_an_h200(monkeypatch):
    """The H200 reading (8B shape, share 0.42 of 140 GB: 58.8 GB): the warm-up baseline is
    already above the share (CUDA graphs and contexts outside it), and a real job adds
    1.5 GB. A small first job that comes back clean does not use up the one baseline raise;
    the real job's steady state within the share's 5 % becomes the baseline; growth past
    that is a leak and restarts."""
    card = _Card()
    card.total = 140 * GB
    rt, loads, me = _runtime(monkeypatch, card, per_process=True, warm=64 * GB, share=0.42)
    events = []
    sink = lambda k, d: events.append(k)
    assert rt.cleanup(on_event=sink)["clean"] and not events  # the small cold job
    card.procs[me] += int(1.5 * GB)  # the first real job: vLLM's steady state
    figures = rt.cleanup(on_event=sink)
    assert figures["clean"] and figures["baseline_raised"] and loads == ["tiny:qwen3"]
    assert figures["budget"] == 64 * GB + int(int(0.42 * 140 * GB) * 0.05)
    assert rt.cleanup()["clean"] and loads == ["tiny:qwen3"]  # the next jobs: same engine
    card.procs[me] += 1 * GB  # grows again: a leak
    figures = rt.cleanup(on_event=sink)
    assert figures.get("restarted") and figures["budget"] and len(loads) == 2
    assert events == ["memory_baseline", "engine_restart", "engine_loaded"]


def test_no_steady_allowance_restarts_on_any_growth_above_the_share(monkeypatch):
    """memory_steady_pct 0: a warm-up baseline above the share leaves no room, as before."""
    card = _Card()
    rt, loads, me = _runtime(monkeypatch, card, per_process=True, warm=42 * GB,
                             memory_steady_pct=0.0)
    card.procs[me] += 1 * GB
    assert rt.cleanup().get("restarted") and len(loads) == 2
