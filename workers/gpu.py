"""GPU pinning, memory readings, cleanup between jobs, orphan engines, OOM classification.

Memory is read through NVML (or ``nvidia-smi``) rather than ``torch.cuda``: the worker process
itself must not create a CUDA context (vLLM runs the model in its own engine-core process),
and NVML sees memory held by every process on the device, which is what "the GPU is clean"
means. On a machine with no GPU every reading is ``None`` and cleanup checks pass trivially.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from workers.config import WORKER_ENV

log = logging.getLogger(__name__)

ENGINE_PROC_MARKERS = ("VLLM::EngineCore", "VLLM::Worker", "EngineCore")


@dataclass(frozen=True)
class MemoryReading:
    used: int  # bytes in use on the device, all processes
    total: int

    @property
    def free(self) -> int:
        return self.total - self.used

    def as_dict(self) -> dict:
        return {"used": self.used, "total": self.total, "free": self.free}


def physical_gpus() -> list[str]:
    """Indices of the GPUs this machine has (ignores CUDA_VISIBLE_DEVICES)."""
    out = _nvidia_smi(["--query-gpu=index", "--format=csv,noheader,nounits"])
    return [line.strip() for line in out.splitlines() if line.strip()] if out else []


def visible_gpus() -> list[str]:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every physical GPU."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    return physical_gpus()


def pinned_env(gpu: str | None, base: dict | None = None) -> dict:
    """Environment for a worker process pinned to one GPU (or to none: CPU engine)."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    return env


def memory(gpu: str | None) -> MemoryReading | None:
    """Device-wide memory of one physical GPU, or None without a GPU."""
    if gpu is None or gpu == "":
        return None
    try:
        import pynvml  # nvidia-ml-py, present wherever vLLM for CUDA is installed

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return MemoryReading(used=int(info.used), total=int(info.total))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        log.debug("NVML reading failed; trying nvidia-smi", exc_info=True)
    out = _nvidia_smi(["-i", str(gpu), "--query-gpu=memory.used,memory.total",
                       "--format=csv,noheader,nounits"])
    if not out:
        return None
    used, total = (int(float(x)) * 1024 * 1024 for x in out.strip().splitlines()[0].split(","))
    return MemoryReading(used=used, total=total)


def process_memory(gpu: str | None, pids: set[int]) -> int | None:
    """Bytes the processes ``pids`` hold on one GPU, from the driver's per-process
    accounting; None when the GPU lists none of them (no GPU, no per-process accounting, or a
    PID namespace that shows other numbers): the caller then reads the whole device."""
    if gpu is None or gpu == "":
        return None
    rows = _compute_apps(gpu)
    mine = [used for pid, used in rows if pid in pids and used is not None]
    return sum(mine) if mine else None


def _compute_apps(gpu: str) -> list[tuple[int, int | None]]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
            return [(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory))
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        log.debug("NVML process list failed; trying nvidia-smi", exc_info=True)
    out = _nvidia_smi(["-i", str(gpu), "--query-compute-apps=pid,used_memory",
                       "--format=csv,noheader,nounits"])
    rows = []
    for line in (out or "").splitlines():
        try:
            pid, used = (x.strip() for x in line.split(","))
            rows.append((int(pid), int(float(used)) * 1024 * 1024))
        except ValueError:
            continue
    return rows


def wait_for_baseline(gpu: str | None, baseline: MemoryReading | None, *, slack_bytes: int,
                      timeout_s: float = 30.0,
                      read: Callable[[], MemoryReading | None] | None = None,
                      ) -> tuple[bool, MemoryReading | None]:
    """Poll until memory (``read()``, by default the device's) is back within
    ``slack_bytes`` of ``baseline``.

    Freed memory shows up in NVML only after the owning process exits or calls into the
    driver, so a short poll avoids restarting an engine that was about to be clean.
    """
    if baseline is None:
        return True, None
    read = read or (lambda: memory(gpu))
    deadline = time.monotonic() + timeout_s
    reading = read()
    while reading is not None and reading.used > baseline.used + slack_bytes:
        if time.monotonic() > deadline:
            return False, reading
        time.sleep(0.5)
        reading = read()
    return True, reading


def free_process_memory() -> None:
    """Drop what this process holds: Python garbage and, if CUDA is initialised, torch's cache."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        log.debug("torch cache cleanup skipped", exc_info=True)


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors, however vLLM or torch wrapped them."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if name in ("OutOfMemoryError", "EngineOOMError", "EngineOOM"):
            return True
        text = str(exc).lower()
        if "out of memory" in text or "cuda error: out of memory" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def engine_processes(worker_name: str | None = None) -> list:
    """vLLM engine processes on this host (optionally only those a given worker started)."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "ppid"]):
        try:
            title = " ".join(proc.info.get("cmdline") or []) + " " + (proc.info.get("name") or "")
            if not any(m in title for m in ENGINE_PROC_MARKERS):
                continue
            if worker_name is not None and proc.environ().get(WORKER_ENV) != worker_name:
                continue
            found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def orphan_engines(worker_name: str) -> list:
    """Engine processes started by a (dead) worker of this name whose parent is gone."""
    orphans = []
    for proc in engine_processes(worker_name):
        try:
            parent = proc.parent()
            if parent is None or parent.pid == 1 or not _is_worker_process(parent, worker_name):
                orphans.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return orphans


def kill_processes(procs, *, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL what is still alive after ``grace_s``. Returns the pids ended."""
    pids = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            pids.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return pids


def _is_worker_process(proc, worker_name: str) -> bool:
    try:
        return proc.environ().get(WORKER_ENV) == worker_name and not any(
            m in " ".join(proc.cmdline()) for m in ENGINE_PROC_MARKERS)
    except Exception:  # noqa: BLE001
        return False


def _nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
