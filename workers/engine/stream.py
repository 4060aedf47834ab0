"""Streaming samples through an engine: generation, then each sample's exact re-read.

:meth:`Engine.stream` takes an iterator of :class:`~workers.engine.spec.StreamItem` and
yields lists of :class:`~workers.engine.spec.StreamResult` as samples finish. The vLLM engine
(:meth:`workers.engine.engine.SteeringEngine.stream`) keeps up to ``max_in_flight`` samples
in vLLM's scheduler and adds each re-read the moment its generation finishes, so the GPU
never drains at a chunk boundary. :func:`sequential_stream` is the same contract over
``generate`` and ``capture`` in chunks of ``max_in_flight``: the transformers reference
backend uses it, and so does the job pipeline for an engine that only generates and captures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from workers.engine.spec import (
    GenResult,
    Reread,
    SamplingOptions,
    SpecError,
    StreamItem,
    StreamResult,
)

SEQUENTIAL_CHUNK = 64  # samples per generate call when the caller sets no cap

RereadFn = Callable[[StreamItem, GenResult], Reread | None]


def sequential_stream(engine, items: Iterable[StreamItem], options: SamplingOptions, *,
                      reread: RereadFn | None = None,
                      max_in_flight: int | None = None) -> Iterator[list[StreamResult]]:
    """Chunks of ``max_in_flight`` items: ``engine.generate`` over the chunk, ``reread``
    for each result, one ``engine.capture`` over the chunk's re-reads; one list per chunk."""
    size = max(1, int(max_in_flight or SEQUENTIAL_CHUNK))
    it = iter(items)
    while chunk := list(islice(it, size)):
        gens = engine.generate([i.prompt for i in chunk], options, [i.spec for i in chunk])
        rereads = [reread(i, g) if reread is not None else None for i, g in zip(chunk, gens)]
        todo = [k for k, r in enumerate(rereads) if r is not None]
        caps: dict = {}
        if todo:
            lens = [rereads[k].prompt_len for k in todo]
            kw = {}
            if any(n is not None for n in lens):
                if any(n is None for n in lens):
                    raise SpecError("reread.prompt_len", "give it for every re-read or none")
                kw["prompt_lens"] = lens
            got = engine.capture([rereads[k].sequence for k in todo],
                                 [rereads[k].spec for k in todo], **kw)
            caps = dict(zip(todo, got))
        yield [StreamResult(tag=i.tag, gen=g, capture=caps.get(k))
               for k, (i, g) in enumerate(zip(chunk, gens))]
