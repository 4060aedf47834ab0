"""The numeric start-up check that a decoder layer's ``(delta, residual)`` output is the stream
the next layer starts from.

Why a probe and not a comparison of tensors: the model loop hands layer i's ``(delta,
residual)`` to layer i + 1 unchanged, so comparing "what layer i returned" with "what layer
i + 1 received" is true for every model, including the broken ones. What differs is how
layer i + 1 *reads* the pair. The hooks assume it reads only ``residual + delta`` (vLLM's
fused add + norm). vLLM 0.32's Cohere and Exaone4 layers read ``hidden_states`` alone and
drop the residual, so their real stream is ``delta`` and the hooks' ``residual + delta``
counts part of it twice.

So, during the engine's self-test, a forward *pre*-hook on each consumer of a layer's output
(layers 1..L−1, and the final norm when it is called with the pair) runs the consumer twice
on copies of its inputs: once as given, once with a random vector ``v`` (as large as the
stream, per row) moved from the residual into the hidden state — ``(h + v, r − v)``, the same
``residual + delta``. If the consumer starts from ``residual + delta``, its output does not
move (beyond rounding: ~1e-7 relative in fp32, ~1e-2 in 16-bit); if it reads the two parts
differently, its output moves by about the size of the stream. The largest relative change
per consumer goes back to the engine, which refuses to serve above :func:`tolerance`.

The copies matter: vLLM's fused add + RMSNorm writes its result into its inputs. The real
forward then runs on the untouched originals, so the self-test's tokens, KV cache and capture
are those of a plain forward. A consumer the probe cannot read (no tensor ``hidden_states``
and ``residual`` among its inputs) is reported as an error, and the engine refuses.
"""

from __future__ import annotations

import inspect
import traceback

import torch

_SEED = 20  # the probe vector is the same on every rank (tensor parallel) and every start


def tolerance(dtype: str) -> float:
    """Largest relative output change a consumer of the right contract shows, with margin:
    fp32 rounding of ``(h + v) + (r − v)`` is ~1e-7 of the stream, 16-bit ~4e-3; a layer of
    the wrong contract moves its output by ~1 (measured on the tiny families, see the tests)."""
    return 1e-3 if str(dtype).removeprefix("torch.") in ("float32", "float64") else 5e-2


def _stream_of(out, *, pair: bool) -> torch.Tensor:
    """What a consumer hands on, as fp32: a layer's ``delta + residual``, the final norm's
    normalized states (its first output)."""
    if isinstance(out, tuple):
        if pair:
            if len(out) != 2 or not all(isinstance(t, torch.Tensor) for t in out):
                raise TypeError("did not return a (delta, residual) pair of tensors")
            return out[0].to(torch.float32, copy=True).add_(out[1])
        out = out[0]
    return out.to(torch.float32, copy=True)


class StreamProbe:
    """Pre-hooks on each consumer of a decoder layer's output; :meth:`remove` returns the
    worst relative output change per consumer and the consumers it could not probe."""

    def __init__(self, layers: list[torch.nn.Module], final_norm: torch.nn.Module | None):
        self.worst: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.dtype: str | None = None
        # consumer -> (index, class) of the layer whose output it reads
        self.producer: dict[str, tuple[int, str]] = {}
        self._handles = []
        for j in range(1, len(layers)):
            self._handles.append(layers[j].register_forward_pre_hook(
                self._layer_hook(f"layer {j}", (j - 1, type(layers[j - 1]).__name__)),
                with_kwargs=True))
        if final_norm is not None:
            self._handles.append(final_norm.register_forward_pre_hook(
                self._norm_hook("the final norm",
                                (len(layers) - 1, type(layers[-1]).__name__)),
                with_kwargs=True))

    def remove(self) -> dict:
        for h in self._handles:
            h.remove()
        self._handles = []
        return {"worst": dict(self.worst), "errors": dict(self.errors), "dtype": self.dtype,
                "producer": dict(self.producer)}

    # ---- hooks ------------------------------------------------------------------------
    def _layer_hook(self, name: str, producer: tuple[int, str]):
        def hook(module, args, kwargs):
            self.producer[name] = producer
            try:
                sig = inspect.signature(module.forward)

                def run(h, r):
                    b = sig.bind(*args, **kwargs)
                    b.arguments["hidden_states"], b.arguments["residual"] = h, r
                    return _stream_of(module.forward(*b.args, **b.kwargs), pair=True)

                got = sig.bind(*args, **kwargs).arguments
                h, r = got.get("hidden_states"), got.get("residual")
                self._measure(name, h, r, run)
            except Exception as exc:  # noqa: BLE001 - reported; the engine refuses
                self._fail(name, exc)

        return hook

    def _norm_hook(self, name: str, producer: tuple[int, str]):
        def hook(module, args, kwargs):
            # vLLM norms are CustomOps (forward(*args, **kwargs)): read the pair by position.
            if len(args) != 2 or kwargs or not all(isinstance(a, torch.Tensor) for a in args):
                return  # called on one tensor: there is no pair to split
            self.producer[name] = producer
            try:
                self._measure(name, args[0], args[1],
                              lambda h, r: _stream_of(module.forward(h, r), pair=False))
            except Exception as exc:  # noqa: BLE001 - reported; the engine refuses
                self._fail(name, exc)

        return hook

    def _measure(self, name: str, h, r, run) -> None:
        if not (isinstance(h, torch.Tensor) and isinstance(r, torch.Tensor)):
            raise TypeError("its inputs hold no (hidden_states, residual) tensors to probe "
                            f"(got {type(h).__name__}, {type(r).__name__})")
        self.dtype = str(h.dtype).removeprefix("torch.")
        stream = h.float() + r.float()
        noise = torch.randn(stream.shape, generator=torch.Generator().manual_seed(_SEED))
        v = noise.to(stream.device) * stream.pow(2).mean(-1, keepdim=True).sqrt()
        ref = run(h.clone(), r.clone())
        moved = run((h.float() + v).to(h.dtype), (r.float() - v).to(r.dtype))
        scale = float(ref.abs().max().clamp(min=1e-30))
        dev = float((moved - ref).abs().max()) / scale
        self.worst[name] = max(self.worst.get(name, 0.0), dev)

    def _fail(self, name: str, exc: BaseException) -> None:
        if name not in self.errors:
            self.errors[name] = (f"{type(exc).__name__}: {exc}\n"
                                 f"{traceback.format_exc(limit=-3)}")
