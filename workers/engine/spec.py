"""What a request asks the engine for, and what it gets back.

These plain dataclasses (tensors allowed) are the contract shared by the vLLM engine (``engine.py`` /
``extension.py``), the transformers reference backend (``hf.py``) and the job pipeline.
They travel to vLLM workers inside ``SamplingParams.extra_args`` as plain dicts
(:meth:`RequestSpec.to_wire` / :meth:`RequestSpec.from_wire`), under :data:`WIRE_KEY`.
A job's steering ops are declared once in :mod:`jobspec.steering` (op names, fields); the
worker builds these dataclasses from them, and :func:`validate_spec` is the engine's own
check at its boundary (it knows the loaded model's shape).

Positions are absolute token positions in the request's sequence (prompt followed by the
generated tokens). vLLM never forwards the last sampled token, so a span computed during
generation covers the prompt and all generated tokens but the last; the exact mode
(``SteeringEngine.capture``) re-reads a finished conversation in one prefill pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobspec import sampling
from jobspec.steering import OPS as OP_KINDS
from jobspec.steering import OpKind

__all__ = ["OP_KINDS", "OpKind"]  # re-exported: the op names are jobspec's
WIRE_KEY = "chatspace"  # SamplingParams.extra_args[WIRE_KEY] = {"uid", "spec", "steer_key", ...}
RESERVED_SPANS = ("prompt", "response", "last_prompt")  # the built-in span names


class SpecError(ValueError):
    """A malformed steering or capture spec; ``field`` names where, e.g. ``steer[2].vector``."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class SteerOp:
    """One steering op at one decoder layer, applied to the layer's output hidden state.

    - ``add``:    h ← h + scale · v
    - ``cap``:    with û = v/|v| and p = h·û, h ← h + (clamp(p, min, max) − p) · û
                  (either bound may be None = open side)
    - ``ablate``: h ← h + (scale − 1) · (h·û) · û   (scale 0 removes the component)

    Caps and ablations are computed in fp32 whatever the model dtype.
    """

    op: OpKind
    layer: int
    vector: Any  # sequence of floats or a 1-D tensor of length hidden_size
    scale: float = 1.0
    min: float | None = None
    max: float | None = None

    def to_wire(self) -> dict:
        vec = self.vector
        if hasattr(vec, "tolist"):
            vec = vec.detach().float().cpu().tolist() if hasattr(vec, "detach") else vec.tolist()
        return {"op": self.op, "layer": int(self.layer), "vector": [float(x) for x in vec],
                "scale": float(self.scale), "min": self.min, "max": self.max}

    @classmethod
    def from_wire(cls, d: dict) -> SteerOp:
        return cls(op=d["op"], layer=int(d["layer"]), vector=d["vector"],
                   scale=float(d.get("scale", 1.0)), min=d.get("min"), max=d.get("max"))


@dataclass(frozen=True)
class Span:
    """A named half-open range of absolute positions ``[start, end)``; ``end=None`` = open."""

    name: str
    start: int
    end: int | None = None


@dataclass(frozen=True)
class CaptureSpec:
    """Which activations to keep for a request.

    Means are reduced on the device; only ``(n_layers, hidden)`` per span crosses to the CPU.
    - ``prompt``:      mean over the prompt positions ``[0, P)``
    - ``response``:    mean over generated positions that were forwarded ``[P, P+n_gen-1)``
    - ``last_prompt``: the hidden state at position ``P-1``
    - ``spans``:       extra named spans (the exact mode uses these for the response)
    - ``raw``:         every forwarded row, labelled with its position and token id
    """

    layers: tuple[int, ...] | None = None  # None = all layers
    prompt: bool = True
    response: bool = True
    last_prompt: bool = True
    spans: tuple[Span, ...] = ()
    raw: bool = False

    def to_wire(self) -> dict:
        return {
            "layers": list(self.layers) if self.layers is not None else None,
            "prompt": self.prompt, "response": self.response, "last_prompt": self.last_prompt,
            "spans": [[s.name, s.start, s.end] for s in self.spans], "raw": self.raw,
        }

    @classmethod
    def from_wire(cls, d: dict) -> CaptureSpec:
        layers = d.get("layers")
        return cls(
            layers=tuple(int(x) for x in layers) if layers is not None else None,
            prompt=bool(d.get("prompt", True)), response=bool(d.get("response", True)),
            last_prompt=bool(d.get("last_prompt", True)),
            spans=tuple(Span(n, int(s), None if e is None else int(e)) for n, s, e in d.get("spans", [])),
            raw=bool(d.get("raw", False)),
        )


@dataclass(frozen=True)
class RequestSpec:
    """Everything one request asks of the hooks. ``key`` names it in errors and results."""

    steer: tuple[SteerOp, ...] = ()
    capture: CaptureSpec | None = None
    key: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.steer) or self.capture is not None

    def to_wire(self) -> dict:
        return {"steer": [op.to_wire() for op in self.steer],
                "capture": self.capture.to_wire() if self.capture else None,
                "key": self.key}

    @classmethod
    def from_wire(cls, d: dict) -> RequestSpec:
        return cls(steer=tuple(SteerOp.from_wire(o) for o in d.get("steer", [])),
                   capture=CaptureSpec.from_wire(d["capture"]) if d.get("capture") else None,
                   key=d.get("key"))


@dataclass
class Capture:
    """What the hooks captured for one request. Tensors are fp32 on the CPU."""

    layers: list[int]
    means: dict[str, Any]  # span name -> tensor (n_layers, hidden)
    counts: dict[str, int]  # span name -> number of positions averaged
    positions: dict[str, tuple[int, int]]  # span name -> [start, end) actually covered
    raw: Any | None = None  # tensor (n_rows, n_layers, hidden) when asked
    raw_positions: list[int] | None = None
    raw_token_ids: list[int] | None = None


@dataclass
class GenResult:
    key: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    capture: Capture | None = None
    hook_calls: int = 0  # layer-hook invocations that touched this request


@dataclass
class StreamItem:
    """One sample fed to :meth:`Engine.stream`: ``tag`` comes back with its result."""

    tag: Any
    prompt: str | Sequence[int]
    spec: RequestSpec | None = None


@dataclass
class Reread:
    """A finished generation's exact re-read (what :meth:`Engine.capture` takes for one
    sequence): the caller's ``reread`` callback returns it, or None for no re-read."""

    sequence: Sequence[int]
    spec: RequestSpec
    prompt_len: int | None = None


@dataclass
class StreamResult:
    """A sample done: its generation and, when it was re-read, the re-read's capture."""

    tag: Any
    gen: GenResult
    capture: Capture | None = None


def validate_spec(spec: RequestSpec, *, num_layers: int, hidden_size: int) -> None:
    """Raise :class:`SpecError` naming the field for anything the hooks cannot apply."""
    for i, op in enumerate(spec.steer):
        where = f"steer[{i}]"
        if op.op not in OP_KINDS:
            raise SpecError(f"{where}.op", f"unknown op {op.op!r}; use one of {', '.join(OP_KINDS)}")
        if not isinstance(op.layer, int) or not 0 <= op.layer < num_layers:
            raise SpecError(f"{where}.layer", f"layer {op.layer!r} out of range; the model has "
                            f"layers 0..{num_layers - 1}")
        vec = op.vector.tolist() if hasattr(op.vector, "tolist") else list(op.vector)
        if len(vec) != hidden_size:
            raise SpecError(f"{where}.vector", f"length {len(vec)} does not match the model's "
                            f"hidden size {hidden_size}")
        if not all(math.isfinite(float(x)) for x in vec):
            raise SpecError(f"{where}.vector", "contains NaN or inf")
        if op.op in ("cap", "ablate") and math.sqrt(sum(float(x) ** 2 for x in vec)) < 1e-12:
            raise SpecError(f"{where}.vector", f"a {op.op} direction must be non-zero")
        if not math.isfinite(op.scale):
            raise SpecError(f"{where}.scale", "must be a finite number")
        if op.op == "cap":
            if op.min is None and op.max is None:
                raise SpecError(f"{where}", "a cap needs min, max or both")
            for b in ("min", "max"):
                v = getattr(op, b)
                if v is not None and not math.isfinite(v):
                    raise SpecError(f"{where}.{b}", "must be a finite number or null")
            if op.min is not None and op.max is not None and op.min > op.max:
                raise SpecError(f"{where}.min", f"min {op.min} is above max {op.max}")
    cap = spec.capture
    if cap is not None and cap.layers is not None:
        if not cap.layers:
            raise SpecError("capture.layers", "empty; omit it to capture all layers")
        for j, layer in enumerate(cap.layers):
            if not 0 <= layer < num_layers:
                raise SpecError(f"capture.layers[{j}]", f"layer {layer} out of range; the model "
                                f"has layers 0..{num_layers - 1}")
        if len(set(cap.layers)) != len(cap.layers):
            raise SpecError("capture.layers", "has duplicates")
    if cap is not None:
        seen: set[str] = set()
        for j, s in enumerate(cap.spans):
            if s.start < 0 or (s.end is not None and s.end <= s.start):
                raise SpecError(f"capture.spans[{j}]", f"bad range [{s.start}, {s.end})")
            if s.name in RESERVED_SPANS or s.name in seen:
                raise SpecError(f"capture.spans[{j}].name", f"{s.name!r} is taken; span names "
                                f"must be unique and not one of {', '.join(RESERVED_SPANS)}")
            seen.add(s.name)


def validate_specs(specs: Sequence[RequestSpec | None], *, num_layers: int,
                   hidden_size: int) -> None:
    """:func:`validate_spec` over a batch; the error's field names the request (``specs[i]``).

    Each distinct spec object is checked once: a batch usually repeats one spec per request,
    and checking every element of every vector in Python took seconds per call (measured:
    288 requests steering 36 layers of 4096 floats, 17 s on a loaded 2-core host)."""
    seen: set[int] = set()
    for i, spec in enumerate(specs):
        if spec is None or id(spec) in seen:
            continue
        seen.add(id(spec))
        try:
            validate_spec(spec, num_layers=num_layers, hidden_size=hidden_size)
        except SpecError as exc:
            raise SpecError(f"specs[{i}].{exc.field}", exc.message) from None


def as_specs(specs: RequestSpec | Sequence[RequestSpec | None] | None, n: int) -> list[RequestSpec | None]:
    """Broadcast one spec (or None) to ``n`` requests; check a list has length ``n``."""
    if specs is None or isinstance(specs, RequestSpec):
        return [specs] * n
    specs = list(specs)
    if len(specs) != n:
        raise SpecError("specs", f"{len(specs)} specs for {n} prompts")
    return specs


@dataclass
class SamplingOptions:
    """Generation settings shared by both backends."""

    max_tokens: int = sampling.MAX_TOKENS
    temperature: float = sampling.TEMPERATURE
    top_p: float = sampling.TOP_P
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    # Restrict the reply to one of these strings (vLLM structured outputs): the judge pool's
    # scale. The transformers backend cannot, and refuses a request that asks.
    choices: tuple[str, ...] | None = None
    # False: token ids only, ``text`` left empty. For measuring the engine: the cost of
    # detokenizing depends on which tokens come out (bench/detokenize_cost.py: a lone byte
    # that is not a whole character costs vLLM's detokenizer ~16x a printable token)
    detokenize: bool = True
