"""Steering ops against an independent float64 numpy computation of the documented formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.engine.ops import CompiledOps, apply_ops, apply_rows, compile_layer
from workers.engine.spec import SteerOp

H = 32


def reference(h: np.ndarray, ops: list[SteerOp]) -> np.ndarray:
    """The spec's formulas in float64, op by op, row by row."""
    h = h.astype(np.float64).copy()
    for op in ops:
        v = np.asarray(op.vector, dtype=np.float64)
        if op.op == "add":
            h = h + op.scale * v
            continue
        u = v / np.linalg.norm(v)
        p = h @ u
        if op.op == "cap":
            lo = -np.inf if op.min is None else op.min
            hi = np.inf if op.max is None else op.max
            h = h + (np.minimum(np.maximum(p, lo), hi) - p)[..., None] * u
        else:
            h = h + (op.scale - 1.0) * p[..., None] * u
    return h


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _split(rng, shape):
    residual = rng.normal(size=shape) * 3
    delta = rng.normal(size=shape)
    return residual, delta


def _check(rng, ops, shape=(7, H), dtype=torch.float32, atol=1e-5):
    residual, delta = _split(rng, shape)
    r_t = torch.tensor(residual, dtype=dtype)
    d_t = torch.tensor(delta, dtype=dtype)
    new_delta = apply_ops(d_t, r_t, ops)
    assert new_delta.dtype == dtype and new_delta.shape == d_t.shape
    # the reference starts from the h the model actually holds (rounded to dtype)
    h_in = r_t.double().numpy() + d_t.double().numpy()
    want = reference(h_in, ops)
    got = r_t.double().numpy() + new_delta.double().numpy()
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    return r_t, d_t, new_delta


def _vec(rng, scale=1.0):
    return (rng.normal(size=H) * scale).tolist()


def test_add(rng):
    _check(rng, [SteerOp("add", 0, _vec(rng), scale=2.5)])


def test_cap_two_sided_moves_projection_into_bounds(rng):
    v = _vec(rng)
    op = SteerOp("cap", 0, v, min=-0.5, max=0.5)
    r, _, nd = _check(rng, [op])
    u = torch.tensor(v, dtype=torch.float64)
    u = u / u.norm()
    p = (r.double() + nd.double()) @ u
    assert p.min() >= -0.5 - 1e-5 and p.max() <= 0.5 + 1e-5


@pytest.mark.parametrize("lo,hi", [(None, 0.3), (-0.2, None), (1.0, 1.0)])
def test_cap_open_sides(rng, lo, hi):
    _check(rng, [SteerOp("cap", 0, _vec(rng), min=lo, max=hi)])


def test_cap_open_side_leaves_rows_within_bound_untouched(rng):
    v = _vec(rng)
    residual, delta = _split(rng, (50, H))
    r, d = torch.tensor(residual, dtype=torch.float32), torch.tensor(delta, dtype=torch.float32)
    nd = apply_ops(d, r, [SteerOp("cap", 0, v, max=0.0)])
    u = torch.tensor(v) / torch.tensor(v).norm()
    below = (r + d) @ u <= 0
    assert below.any() and (~below).any()
    assert torch.equal(nd[below], d[below])
    assert not torch.allclose(nd[~below], d[~below])


@pytest.mark.parametrize("scale", [0.0, 0.5, -1.0, 3.0])
def test_ablate(rng, scale):
    _check(rng, [SteerOp("ablate", 0, _vec(rng, 5.0), scale=scale)])


def test_ablate_scale_zero_removes_component(rng):
    v = _vec(rng)
    r, _, nd = _check(rng, [SteerOp("ablate", 0, v, scale=0.0)])
    u = torch.tensor(v, dtype=torch.float64)
    p = (r.double() + nd.double()) @ (u / u.norm())
    assert p.abs().max() < 1e-5


def test_ordered_ops_order_matters(rng):
    v, w = _vec(rng), _vec(rng)
    ops = [SteerOp("add", 0, w, scale=4.0), SteerOp("cap", 0, v, min=-0.1, max=0.1),
           SteerOp("ablate", 0, w, scale=0.5), SteerOp("add", 0, v, scale=-1.0)]
    _, _, forward = _check(np.random.default_rng(1), ops)
    _, _, backward = _check(np.random.default_rng(1), list(reversed(ops)))
    assert not torch.allclose(forward, backward)


def test_residual_none_means_h_is_delta(rng):
    h = torch.tensor(rng.normal(size=(3, 4, H)), dtype=torch.float32)
    ops = [SteerOp("cap", 0, _vec(rng), min=-0.2), SteerOp("add", 0, _vec(rng), scale=0.3)]
    got = apply_ops(h, None, ops)
    np.testing.assert_allclose(got.double().numpy(), reference(h.double().numpy(), ops), atol=1e-5)


def test_batched_3d_shape(rng):
    _check(rng, [SteerOp("ablate", 0, _vec(rng), scale=0.0), SteerOp("add", 0, _vec(rng))],
           shape=(2, 5, H))


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_low_precision_inputs_computed_in_fp32(rng, dtype, atol):
    """One rounding back to the dtype at the end: the error stays within one ulp of |h|
    (~8 for bf16 with |h| ≲ 16, i.e. 2^-8·16 ≈ 0.06; fp16 2^-11·16 ≈ 0.008)."""
    v = _vec(rng)
    ops = [SteerOp("add", 0, _vec(rng), scale=0.7), SteerOp("ablate", 0, _vec(rng), scale=0.0),
           SteerOp("cap", 0, v, min=-1.0, max=1.0)]
    r, _, nd = _check(rng, ops, dtype=dtype, atol=atol)
    # the cap is honoured up to the dtype's rounding of the written-back delta
    u = torch.tensor(v, dtype=torch.float64)
    assert nd.dtype == dtype and not torch.isnan(nd).any()
    assert ((r.double() + nd.double()) @ (u / u.norm())).abs().max() < 1.0 + 3 * atol


def test_add_only_layer_uses_presummed_vector(rng):
    ops = [SteerOp("add", 0, _vec(rng), scale=1.5), SteerOp("add", 0, _vec(rng), scale=-0.5)]
    compiled = compile_layer(ops)
    assert compiled.add_sum is not None
    _check(rng, ops)
    assert compile_layer(ops + [SteerOp("ablate", 0, _vec(rng))]).add_sum is None


def test_compiled_ops_groups_by_layer_and_keeps_order(rng):
    a, b = _vec(rng), _vec(rng)
    steer = [SteerOp("add", 2, a), SteerOp("cap", 0, b, max=0.0), SteerOp("ablate", 2, b, scale=0.0)]
    c = CompiledOps.compile(steer, device="cpu")
    assert c.layers == {0, 2} and c.for_layer(1) is None and bool(c)
    assert [o.kind for o in c.for_layer(2).ops] == [0, 2]
    assert all(o.vec.dtype == torch.float32 for o in c.for_layer(2).ops)
    assert not CompiledOps.compile([], device="cpu")
    residual, delta = _split(rng, (4, H))
    r, d = torch.tensor(residual, dtype=torch.float32), torch.tensor(delta, dtype=torch.float32)
    np.testing.assert_allclose(
        (r + c.for_layer(2).apply(d, r)).double().numpy(),
        reference((r + d).double().numpy(), [steer[0], steer[2]]), atol=1e-5)


def test_tensor_vectors_accepted(rng):
    v = torch.tensor(_vec(rng), dtype=torch.bfloat16)
    got = apply_ops(torch.ones(2, H), None, [SteerOp("add", 0, v, scale=2.0)])
    torch.testing.assert_close(got, 1 + 2 * v.float().expand(2, H))


def test_apply_rows_touches_only_the_slice(rng):
    residual, delta = _split(rng, (10, H))
    r, d = torch.tensor(residual, dtype=torch.float32), torch.tensor(delta, dtype=torch.float32)
    before = d.clone()
    ops = compile_layer([SteerOp("add", 0, _vec(rng)), SteerOp("cap", 0, _vec(rng), min=0.0)])
    apply_rows(d, r, ops, 3, 7)
    assert torch.equal(d[:3], before[:3]) and torch.equal(d[7:], before[7:])
    torch.testing.assert_close(d[3:7], ops.apply(before[3:7], r[3:7]))
    assert not torch.allclose(d[3:7], before[3:7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kinds", [("add", "add"), ("add", "cap")])
def test_in_place_apply_equals_apply_bit_for_bit(rng, dtype, kinds):
    """apply_ (one fused add_ for add-only layers) rounds exactly as apply does, in every dtype,
    and writes through a row slice of a larger tensor."""
    residual, delta = _split(rng, (12, H))
    r, d = torch.tensor(residual).to(dtype), torch.tensor(delta * 40).to(dtype)
    ops = compile_layer([SteerOp(k, 0, _vec(rng), scale=0.7, max=0.5) if k == "cap"
                         else SteerOp(k, 0, _vec(rng), scale=0.7) for k in kinds])
    want = ops.apply(d[2:9], r[2:9])
    got = d.clone()
    ops.apply_(got[2:9], r[2:9])
    assert torch.equal(got[2:9], want)
    assert torch.equal(got[:2], d[:2]) and torch.equal(got[9:], d[9:])
