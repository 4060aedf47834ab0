"""Running a persona's samples through the engine in chunks, with the OOM policy.

``batch_size`` is a memory cap: each chunk goes to the engine in one call and vLLM's
scheduler batches it (``engine.max_num_seqs`` sequences running at a time, refilled as they
finish), so a chunk at least as large as ``max_num_seqs`` keeps the GPU as busy as one call
with the whole persona would, while what one call holds (capture sums on the device, results
on the host) stays bounded.

An out-of-memory error on a batch (anything :func:`workers.gpu.is_oom` recognises) frees
memory, halves the batch size and retries that same batch; samples already done are kept.
Below ``engine.oom_min_batch`` the persona fails with :class:`app.errors.EngineOOM` carrying
every batch size that failed and the memory readings. Cancel is checked between batches.

Test hook — ``CHATSPACE_FAULT_OOM="<persona>:<times>"`` (comma-separate several): the first
``<times>`` batches of that persona in this worker process raise an injected OOM before
reaching the engine, so the OOM path can be exercised on CPU. ``*`` matches every persona.
Unset in production; it has no effect unless set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from app.errors import ChatspaceError, EngineOOM
from workers import gpu

log = logging.getLogger(__name__)

FAULT_OOM_ENV = "CHATSPACE_FAULT_OOM"
T = TypeVar("T")
R = TypeVar("R")

_fault_counts: dict[str, int] = {}


class JobCancelled(ChatspaceError):
    """The job was cancelled; the pipeline stopped between batches."""

    code = "cancelled"


class InjectedOOM(RuntimeError):
    """Raised by the test hook; its message reads like a CUDA OOM on purpose."""


def _fault_budget(persona: str) -> int:
    spec = os.environ.get(FAULT_OOM_ENV, "")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, times = part.rpartition(":")
        if name in (persona, "*"):
            try:
                return int(times)
            except ValueError:
                raise ValueError(f"{FAULT_OOM_ENV}={spec!r}: use '<persona>:<times>'") from None
    return 0


def maybe_inject_oom(persona: str) -> None:
    budget = _fault_budget(persona)
    if budget and _fault_counts.get(persona, 0) < budget:
        _fault_counts[persona] = _fault_counts.get(persona, 0) + 1
        raise InjectedOOM(f"CUDA out of memory (injected by {FAULT_OOM_ENV} for {persona!r})")


@dataclass
class BatchPolicy:
    """Batch size state for one persona, shared by its generate and capture steps."""

    persona: str
    batch_size: int
    min_batch: int = 1
    gpu_index: str | None = None
    should_cancel: Callable[[], bool] = lambda: False
    on_event: Callable[[str, dict], None] = lambda kind, data: None
    free_memory: Callable[[], None] = gpu.free_process_memory
    failed_sizes: list[int] = field(default_factory=list)

    def run(self, items: Sequence[T], fn: Callable[[Sequence[T]], list[R]],
            *, on_batch: Callable[[int, list[R]], None] | None = None) -> list[R]:
        """``fn`` over ``items`` in batches; ``on_batch(done, results)`` after each one."""
        out: list[R] = []
        start = 0
        while start < len(items):
            if self.should_cancel():
                raise JobCancelled(f"cancelled after {start} of {len(items)} samples")
            batch = items[start:start + self.batch_size]
            try:
                maybe_inject_oom(self.persona)
                results = fn(batch)
            except Exception as exc:
                if not gpu.is_oom(exc):
                    raise
                self._on_oom(exc, len(batch))
                continue
            out.extend(results)
            start += len(batch)
            if on_batch:
                on_batch(start, results)
        return out

    def _on_oom(self, exc: BaseException, size: int) -> None:
        self.failed_sizes.append(size)
        self.free_memory()
        reading = gpu.memory(self.gpu_index)
        figures = {"persona": self.persona, "batch_size": size,
                   "failed_sizes": list(self.failed_sizes),
                   "memory": reading.as_dict() if reading else None, "error": str(exc)[:500]}
        if size <= self.min_batch:
            self.on_event("oom_failed", figures)
            raise EngineOOM(
                f"persona {self.persona!r}: out of memory at batch size {size} (tried "
                f"{', '.join(map(str, self.failed_sizes))}; floor {self.min_batch})",
                batch_size=size, memory={**figures}) from exc
        self.batch_size = max(self.min_batch, size // 2)
        figures["next_batch_size"] = self.batch_size
        log.warning("OOM on %s at batch %d; retrying with %d", self.persona, size,
                    self.batch_size)
        self.on_event("oom_retry", figures)
