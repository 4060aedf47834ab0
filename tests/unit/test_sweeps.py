"""Sweep definitions without services: the grid, the assistant axis and the cap thresholds
against plain readings of the public scripts, the cap op against the public capping code,
and the summary and plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app import sweeps
from app.errors import SpecInvalid

RNG = np.random.default_rng(0)


def _persona(n_pos: int, n_default: int, n_layers=3, hidden=16, shift=0.0):
    acts = RNG.normal(size=(n_pos + n_default, n_layers, hidden)).astype(np.float32)
    acts[:n_pos] += shift
    keys = [f"pos_p0_q{i}" for i in range(n_pos)] + [f"default_p0_q{i}" for i in range(n_default)]
    return acts, keys


def test_grid_is_layer_major_in_the_order_given():
    spec = {"form": "add", "layers": [2, 1], "scales": [-8.0, 0.0, 4.5]}
    assert [p.id for p in sweeps.grid(spec)] == ["L2_s-8", "L2_s0", "L2_s4.5", "L1_s-8",
                                                 "L1_s0", "L1_s4.5"]
    cap = sweeps.grid({"form": "cap", "layers": [3], "cap_percentiles": [1.0, 25.0]})
    assert [(p.id, p.value) for p in cap] == [("L3_p1", 1.0), ("L3_p25", 25.0)]
    assert cap[0].as_dict() == {"point": "L3_p1", "layer": 3, "percentile": 1.0}


def test_axis_is_mean_default_minus_mean_roles_as_5_axis_py():
    per = {"a": _persona(5, 3, shift=1.0), "b": _persona(4, 3, shift=-2.0),
           "c": _persona(6, 3)}
    layer = 1
    axis, made_of = sweeps.axis_from_means(per, layer)
    # safety-research/assistant-axis pipeline/5_axis.py (main): default_mean =
    # stack(default_vectors).mean(0); role_mean = stack(role_vectors).mean(0);
    # axis = default_mean - role_mean. Role vector = a persona's mean; default likewise.
    role_vectors, default_vectors = [], []
    for acts, keys in per.values():
        pos = [acts[i, layer] for i, k in enumerate(keys) if k.startswith("pos_")]
        dft = [acts[i, layer] for i, k in enumerate(keys) if k.startswith("default_")]
        role_vectors.append(sum(x.astype(np.float64) for x in pos) / len(pos))
        default_vectors.append(sum(x.astype(np.float64) for x in dft) / len(dft))
    want = (sum(default_vectors) / len(default_vectors)) - (sum(role_vectors) / len(role_vectors))
    np.testing.assert_allclose(axis, want, rtol=1e-12, atol=1e-12)
    assert made_of == {"n_default_personas": 3, "n_role_personas": 3}


def test_axis_needs_default_samples():
    acts, keys = _persona(4, 0)
    with pytest.raises(SpecInvalid) as err:
        sweeps.axis_from_means({"a": (acts, keys)}, 0)
    assert err.value.field == "params.sweep.cap_axis" and "default" in err.value.message


def test_thresholds_are_percentiles_of_the_unit_axis_projections():
    per = {"a": _persona(5, 3), "b": _persona(7, 2)}
    axis = RNG.normal(size=16)
    got = sweeps.cap_thresholds(per, 2, axis, [1.0, 5.0, 25.0, 50.0])
    unit = axis / np.sqrt(sum(x * x for x in axis))
    proj = sorted(float(sum(float(h[2][j]) * unit[j] for j in range(16)))
                  for acts, _ in per.values() for h in acts)
    for pct, value in zip([1.0, 5.0, 25.0, 50.0], got):
        # numpy's default 'linear' rule, read plainly: rank (n - 1) * p / 100, interpolated
        rank = (len(proj) - 1) * pct / 100
        lo = int(np.floor(rank))
        hi = min(lo + 1, len(proj) - 1)
        want = proj[lo] + (proj[hi] - proj[lo]) * (rank - lo)
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12)


def _public_apply_cap(activations, vector, tau):
    """safety-research/assistant-axis assistant_axis/steering.py ActivationSteering._apply_cap
    (positions='all'), read plainly: the projection on v/|v| is lowered to tau when above."""
    v = vector / (vector.norm() + 1e-8)
    proj = torch.einsum("bld,d->bl", activations, v)
    excess = (proj - tau).clamp(min=0.0)
    return activations - torch.einsum("bl,d->bld", excess, v)


def test_a_floor_on_the_axis_is_the_public_cap_on_the_negated_axis():
    """The sweep keeps h·â >= tau (min=tau on the axis): the public cap along -axis at -tau."""
    from workers.engine.ops import apply_ops
    from workers.engine.spec import SteerOp

    torch.manual_seed(0)
    h = torch.randn(2, 5, 16, dtype=torch.float64) * 3
    axis = torch.randn(16, dtype=torch.float64)
    unit = axis / axis.norm()
    tau = float((h @ unit).median())  # half the rows are below it
    ours = h + apply_ops(torch.zeros_like(h), h, [SteerOp("cap", 0, axis, min=tau)]) \
        .to(torch.float64)
    public = _public_apply_cap(h, -axis, -tau)
    torch.testing.assert_close(ours, public, rtol=1e-5, atol=1e-5)
    assert float((ours @ unit).min()) >= tau - 1e-5
    changed = (h @ unit) < tau
    assert changed.any() and (~changed).any()


def test_summary_keeps_score_columns_null_with_a_reason():
    recs = [{"response_tokens": 4, "response": "abcd"}, {"response_tokens": 8, "response": "ab"}]
    row = sweeps.summarize_point(recs)
    assert row == {"n": 2, "mean_response_tokens": 6.0, "mean_response_chars": 3.0,
                   "judge_mean": None, "refusal_rate": None, "minilm_mean": None}
    status = sweeps.scores_status()
    assert all(not s["computed"] and "not computed" in s["reason"] for s in status.values())


def test_plot_is_a_png_of_the_length_when_no_judge_score():
    rows = [{"persona": p, "point": f"L2_s{s:g}", "layer": 2, "scale": float(s),
             "mean_response_tokens": float(abs(s)), "judge_mean": None}
            for p in ("a", "b") for s in (-4, 0, 4)]
    assert sweeps.plot_metric(rows) == ("mean_response_tokens", "mean response length (tokens)")
    png = sweeps.render_plot(rows)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows[0]["judge_mean"] = 50.0
    assert sweeps.plot_metric(rows)[0] == "judge_mean"
