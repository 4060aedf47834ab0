"""What a steering engine is, declared once: the vLLM engine
(:class:`workers.engine.engine.SteeringEngine`) and the transformers reference
(:class:`workers.engine.hf.HFBackend`) both implement it, and the worker's runtime and
pipeline use only this.

A structural ``Protocol`` (no base class to inherit): ``isinstance(x, Engine)`` checks the
names at run time, and tests/unit/test_engine_protocol.py checks both classes declare them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from workers.engine.spec import (
    Capture,
    GenResult,
    RequestSpec,
    Reread,
    SamplingOptions,
    StreamItem,
    StreamResult,
)


@runtime_checkable
class Engine(Protocol):
    num_layers: int
    hidden_size: int

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (chat template, special tokens)."""

    def generate(self, prompts: Sequence[str | Sequence[int]], options: SamplingOptions,
                 specs: RequestSpec | Sequence[RequestSpec | None] | None = None,
                 ) -> list[GenResult]:
        """One result per prompt, each under its own spec (None = plain generation)."""

    def capture(self, sequences: Sequence[Sequence[int]],
                specs: RequestSpec | Sequence[RequestSpec | None] | None = None,
                ) -> list[Capture]:
        """Exact mode: one prefill pass over finished sequences; one capture each."""

    def stream(self, items: Iterable[StreamItem], options: SamplingOptions, *,
               reread: Callable[[StreamItem, GenResult], Reread | None] | None = None,
               max_in_flight: int | None = None) -> Iterator[list[StreamResult]]:
        """Generate each item and, where ``reread`` returns one, its exact re-read as soon as
        its generation finished; at most ``max_in_flight`` samples at a time (a memory cap);
        yields the samples that finished together (:mod:`workers.engine.stream`)."""

    def shutdown(self) -> None:
        """Release the model and everything it holds (processes, GPU memory); idempotent."""


ENGINE_METHODS = ("generate", "capture", "stream", "shutdown")
