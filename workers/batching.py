"""Running a persona's samples through the engine, with the OOM policy.

``batch_size`` is a memory cap. :meth:`BatchPolicy.stream` hands the persona to the engine's
stream (:meth:`workers.engine.protocol.Engine.stream`) with at most ``batch_size`` samples in
flight: vLLM's scheduler batches them (``engine.max_num_seqs`` running at a time, refilled as
they finish) and nothing drains between chunks; on the vLLM engine the next persona's stream
joins the same vLLM run once this one's samples are all in (:mod:`workers.engine.lanes`), so
nothing drains between personas either. An out-of-memory error of that shared run reaches
both personas' policies: each halves its own cap and re-streams its own unfinished samples. :meth:`BatchPolicy.run` calls a function per
chunk of ``batch_size`` (the sweep and the pipeline stages that capture given responses).

An out-of-memory error (anything :func:`workers.gpu.is_oom` recognises) frees memory and
halves the batch size; a chunk is retried, a stream restarts with the samples it had not
finished (those done are kept). Below ``engine.oom_min_batch`` the persona fails with
:class:`app.errors.EngineOOM` carrying every batch size that failed and the memory readings.
Cancel is checked before each chunk and each (re)start of a stream.

Test hook — ``CHATSPACE_FAULT_OOM="<persona>:<times>"`` (comma-separate several): the first
``<times>`` batches of that persona in this worker process raise an injected OOM before
reaching the engine, so the OOM path can be exercised on CPU. ``*`` matches every persona.
Unset in production; it has no effect unless set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
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

    def stream(self, items: Sequence[T],
               run: Callable[[list[tuple[int, T]], int], Iterator[list[tuple[int, R]]]],
               *, on_results: Callable[[int, list[tuple[int, R]]], None] | None = None
               ) -> list[R]:
        """Results of ``items`` in their order. ``run(pending, cap)`` streams ``pending``
        ((index, item) pairs) with at most ``cap`` in flight and yields (index, result) lists
        as they finish; ``on_results(done, results)`` after each. On out-of-memory the stream
        is closed (the engine aborts what it holds), the cap halves and the items without a
        result stream again."""
        out: dict[int, R] = {}
        while len(out) < len(items):
            if self.should_cancel():
                raise JobCancelled(f"cancelled after {len(out)} of {len(items)} samples")
            pending = [(i, x) for i, x in enumerate(items) if i not in out]
            size = min(self.batch_size, len(pending))
            try:
                maybe_inject_oom(self.persona)
                with closing(run(pending, self.batch_size)) as results:
                    for got in results:
                        out.update(got)
                        if on_results:
                            on_results(len(out), got)
            except Exception as exc:
                if not gpu.is_oom(exc):
                    raise
                self._on_oom(exc, size)
        return [out[i] for i in range(len(items))]

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
