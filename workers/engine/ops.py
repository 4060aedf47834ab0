"""Steering ops as pure torch: the math both backends (vLLM hooks, HF hooks) share.

A decoder layer's output hidden state is ``h = residual + delta`` (vLLM returns the pair; HF
returns ``h`` itself, i.e. ``residual=None``). A layer's ops run in order, each on the ``h``
the previous one produced; the result is handed back as a new ``delta`` so vLLM's residual
stream is untouched: ``delta' = delta + (h' − h)``.

All the math runs in fp32 whatever the model dtype (one rounding back at the end), so caps and
ablations are exact enough in bf16/fp16 models. Everything per-op (scaled vectors, unit
directions, bounds) is computed once per request by :meth:`CompiledOps.compile`, on the right
device; the hot path only does the arithmetic: no allocation of constants, no ``.item()``,
no ``.cpu()`` — a host sync inside a hook costs most of the throughput (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.engine.spec import SteerOp

_ADD, _CAP, _ABLATE = 0, 1, 2
_KIND = {"add": _ADD, "cap": _CAP, "ablate": _ABLATE}


@dataclass(frozen=True)
class _Op:
    kind: int
    vec: torch.Tensor  # fp32 (hidden,): scale·v for add, the unit direction û otherwise
    coef: float = 0.0  # ablate: scale − 1
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class LayerOps:
    """The ordered ops of one layer, ready to apply.

    ``add_only`` layers (the common case) fold into a single pre-summed fp32 vector, since
    additions commute and need no projection of ``h``.
    """

    ops: tuple[_Op, ...]
    add_sum: torch.Tensor | None  # set when every op is an add

    def apply(self, delta: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """New ``delta`` for ``h = residual + delta`` (``h = delta`` when residual is None).

        Works on any shape ``(..., hidden)``: vLLM's ``(num_tokens, hidden)`` rows of one
        request, or HF's ``(batch, seq, hidden)``.
        """
        d32 = delta.float()
        if self.add_sum is not None:
            return (d32 + self.add_sum).to(delta.dtype)
        h = d32 if residual is None else d32 + residual.float()
        h0 = h
        for op in self.ops:
            if op.kind == _ADD:
                h = h + op.vec
                continue
            p = h @ op.vec  # (...,) projection onto û, fp32
            if op.kind == _CAP:
                shift = torch.clamp(p, min=op.lo, max=op.hi) - p
            else:
                shift = p * op.coef
            h = h + shift.unsqueeze(-1) * op.vec
        return (d32 + (h - h0)).to(delta.dtype)

    def apply_(self, delta: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        """:meth:`apply` written into ``delta`` (a view is fine: vLLM's rows of one request).

        Add-only layers take one kernel: ``add_`` of the fp32 sum into a bf16/fp16 ``delta``
        computes in fp32 and rounds once, exactly what :meth:`apply` returns; in eager mode
        every op is a host-side launch, so four become one.
        """
        if self.add_sum is not None:
            delta.add_(self.add_sum)
        else:
            delta.copy_(self.apply(delta, residual))


def _vector(raw, *, device) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.detach().to(device=device, dtype=torch.float64).reshape(-1)
    return torch.as_tensor(list(raw), dtype=torch.float64, device=device)


def compile_layer(ops: Sequence[SteerOp], *, device: torch.device | str = "cpu") -> LayerOps:
    """Pre-compute one layer's ops (order kept). Unit vectors are normalised in fp64 and
    stored in fp32; validation is :func:`spec.validate_spec`'s job, done before this."""
    compiled = []
    for op in ops:
        v = _vector(op.vector, device=device)
        kind = _KIND[op.op]
        if kind == _ADD:
            compiled.append(_Op(_ADD, (v * float(op.scale)).float()))
        elif kind == _CAP:
            compiled.append(_Op(_CAP, (v / v.norm()).float(),
                                lo=None if op.min is None else float(op.min),
                                hi=None if op.max is None else float(op.max)))
        else:
            compiled.append(_Op(_ABLATE, (v / v.norm()).float(), coef=float(op.scale) - 1.0))
    add_sum = None
    if compiled and all(o.kind == _ADD for o in compiled):
        add_sum = torch.stack([o.vec for o in compiled]).sum(0)
    return LayerOps(tuple(compiled), add_sum)


@dataclass(frozen=True)
class CompiledOps:
    """A request's steering, grouped by layer and compiled for one device.

    Build once per request (``CompiledOps.compile(spec.steer, device=...)``), then call
    ``for_layer(i)`` in the layer hook; ``None`` means the request is not steered there.
    """

    by_layer: dict[int, LayerOps]

    @classmethod
    def compile(cls, steer: Sequence[SteerOp], *, device: torch.device | str = "cpu") -> CompiledOps:
        grouped: dict[int, list[SteerOp]] = {}
        for op in steer:
            grouped.setdefault(int(op.layer), []).append(op)
        return cls({layer: compile_layer(ops, device=device) for layer, ops in grouped.items()})

    @property
    def layers(self) -> frozenset[int]:
        return frozenset(self.by_layer)

    def for_layer(self, layer: int) -> LayerOps | None:
        return self.by_layer.get(layer)

    def __bool__(self) -> bool:
        return bool(self.by_layer)


def apply_ops(delta: torch.Tensor, residual: torch.Tensor | None,
              ops: LayerOps | Sequence[SteerOp]) -> torch.Tensor:
    """Steer ``h = residual + delta`` (any ``(..., hidden)`` shape) and return the new delta.

    ``ops`` is a compiled :class:`LayerOps` (the hot path) or plain :class:`SteerOp` s of one
    layer, compiled on the fly (convenient in tests and one-off use; their ``layer`` is not
    consulted).
    """
    if not isinstance(ops, LayerOps):
        ops = compile_layer(list(ops), device=delta.device)
    if not ops.ops:
        return delta
    return ops.apply(delta, residual)


def apply_rows(delta: torch.Tensor, residual: torch.Tensor, ops: LayerOps,
               start: int, end: int) -> None:
    """Steer rows ``[start, end)`` of a vLLM ``(num_tokens, hidden)`` delta in place: the one
    request those rows belong to. Slices are views, so nothing is copied besides the math."""
    ops.apply_(delta[start:end], residual[start:end])
