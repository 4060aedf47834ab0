"""Derived persona vectors against an independent loop-based computation on random data."""

from __future__ import annotations

import numpy as np
import pytest

from app.vectors import derive_vectors

L, H = 3, 5


def make_trait_data(rng, n_p=3, n_q=12, drop=()):
    keys = [f"{lab}_p{p}_q{q}" for p in range(n_p) for q in range(n_q)
            for lab in ("pos", "neg", "default") if f"{lab}_p{p}_q{q}" not in drop]
    rng.shuffle(keys)
    acts = rng.normal(size=(len(keys), L, H)).astype(np.float32)
    scores = {}
    for k in keys:
        r = rng.random()
        scores[k] = "REFUSAL" if r < 0.1 else float(rng.integers(0, 101))
    return keys, acts, scores


def ref_mean(rows):
    total = np.zeros((L, H))
    for r in rows:
        for layer in range(L):
            for h in range(H):
                total[layer, h] += float(r[layer, h])
    return total / len(rows)


def ref_traits(keys, acts, scores, thr=50):
    """The public definitions, written as plain loops over (prompt, question)."""
    by_key = dict(zip(keys, acts))
    out = {}
    pairs = {"pos_neg": [], "pos_neg_50": [], "pos_default": [], "pos_default_50": []}
    hi, mid = [], []
    for p in range(10):
        for q in range(50):
            pk = f"pos_p{p}_q{q}"
            if pk not in by_key or (scores is not None and (pk not in scores or scores[pk] == "REFUSAL")):
                continue
            if scores is not None:
                if scores[pk] >= 70:
                    hi.append(by_key[pk])
                if 40 <= scores[pk] < 70:
                    mid.append(by_key[pk])
            for other in ("neg", "default"):
                ok = f"{other}_p{p}_q{q}"
                if ok not in by_key:
                    continue
                if scores is not None and (ok not in scores or scores[ok] == "REFUSAL"):
                    continue
                pairs[f"pos_{other}"].append((by_key[pk], by_key[ok]))
                if scores is not None and scores[pk] - scores[ok] > thr:
                    pairs[f"pos_{other}_50"].append((by_key[pk], by_key[ok]))
    for name, ps in pairs.items():
        if ps:
            out[name] = ref_mean([a for a, _ in ps]) - ref_mean([b for _, b in ps])
    if hi:
        out["pos_70"] = ref_mean(hi)
    if mid:
        out["pos_40_70"] = ref_mean(mid)
    if scores is None:
        out = {k: v for k, v in out.items() if k in ("pos_neg", "pos_default")}
    return out


def ref_roles(keys, acts, scores, min_count):
    out = {}
    for label in ("pos", "default"):
        every = []
        for s in (0, 1, 2, 3):
            rows = [a for k, a in zip(keys, acts)
                    if k.split("_")[0] == label and scores.get(k) == s]
            every += rows
            if len(rows) >= min_count:
                out[f"{label}_{s}"] = ref_mean(rows)
        if len(every) >= min_count:
            out[f"{label}_all"] = ref_mean(every)
    return out


def test_trait_vectors_match_reference_with_scores_and_refusals():
    rng = np.random.default_rng(0)
    keys, acts, scores = make_trait_data(rng, drop={"neg_p1_q3", "default_p2_q0"})
    vs = derive_vectors(acts, keys, kind="traits", scores=scores)
    ref = ref_traits(keys, acts, scores)
    assert set(vs.vectors) == set(ref) == {
        "pos_neg", "pos_neg_50", "pos_default", "pos_default_50", "pos_70", "pos_40_70"}
    for name in ref:
        assert vs.vectors[name].shape == (L, H) and vs.vectors[name].dtype == np.float32
        np.testing.assert_allclose(vs.vectors[name], ref[name], rtol=1e-5, atol=1e-6)
    assert vs.contrast_of == "pos_neg_50"
    np.testing.assert_array_equal(vs.contrast, vs.vectors["pos_neg_50"])
    n_ref = sum(1 for k in keys if k.startswith("pos_") and scores[k] != "REFUSAL"
                and scores[k] >= 70)
    assert vs.counts["pos_70"] == n_ref


def test_refusal_is_skipped_not_counted_as_zero():
    acts = np.stack([np.full((L, H), v, np.float32) for v in (10.0, 1.0, 20.0, 2.0)])
    keys = ["pos_p0_q0", "neg_p0_q0", "pos_p0_q1", "neg_p0_q1"]
    scores = {"pos_p0_q0": 90, "neg_p0_q0": 5, "pos_p0_q1": "REFUSAL", "neg_p0_q1": 0}
    vs = derive_vectors(acts, keys, kind="traits", scores=scores)
    np.testing.assert_allclose(vs.vectors["pos_neg"], 9.0)
    np.testing.assert_allclose(vs.vectors["pos_70"], 10.0)
    assert vs.counts["pos_neg"] == 1 and "pos_40_70" not in vs.vectors


def test_trait_vectors_without_scores_are_only_the_unfiltered_ones():
    rng = np.random.default_rng(1)
    keys, acts, _ = make_trait_data(rng)
    vs = derive_vectors(acts, keys, kind="traits")
    ref = ref_traits(keys, acts, None)
    assert set(vs.vectors) == {"pos_neg", "pos_default"} == set(ref)
    for name in ref:
        np.testing.assert_allclose(vs.vectors[name], ref[name], rtol=1e-5, atol=1e-6)
    assert vs.contrast_of == "pos_neg"


def test_trait_pos_default_absent_without_default_samples():
    rng = np.random.default_rng(2)
    keys, acts, scores = make_trait_data(rng)
    keep = [i for i, k in enumerate(keys) if not k.startswith("default_")]
    vs = derive_vectors(acts[keep], [keys[i] for i in keep], kind="traits", scores=scores)
    assert "pos_default" not in vs.vectors and "pos_default_50" not in vs.vectors
    assert "pos_neg" in vs.vectors


def test_role_vectors_match_reference_with_min_count():
    rng = np.random.default_rng(3)
    keys = [f"{lab}_p{p}_q{q}" for p in range(5) for q in range(40) for lab in ("pos", "default")]
    acts = rng.normal(size=(len(keys), L, H)).astype(np.float32)
    scores = {}
    for k in keys:
        if k.startswith("pos_"):
            scores[k] = int(rng.choice([0, 1, 2, 3, 3, 3, 3, 3]))
        else:
            scores[k] = "REFUSAL" if rng.random() < 0.05 else int(rng.choice([1, 1, 1, 1, 2, 0]))
    vs = derive_vectors(acts, keys, kind="roles", scores=scores, min_count=50)
    ref = ref_roles(keys, acts, scores, 50)
    assert set(vs.vectors) == set(ref)
    assert {"pos_3", "default_1", "pos_all", "default_all"} <= set(vs.vectors)
    assert "pos_0" not in vs.vectors and vs.counts["pos_0"] < 50  # too few: absent
    for name in ref:
        np.testing.assert_allclose(vs.vectors[name], ref[name], rtol=1e-5, atol=1e-6)
    assert vs.contrast_of == "pos_3-default_1"
    np.testing.assert_allclose(vs.contrast, ref["pos_3"] - ref["default_1"], rtol=1e-5, atol=1e-6)
    assert vs.counts["default_all"] == sum(
        1 for k in keys if k.startswith("default_") and scores[k] != "REFUSAL")


def test_role_key_set_without_scores():
    rng = np.random.default_rng(4)
    keys = [f"{lab}_p{p}_q{q}" for p in range(5) for q in range(10) for lab in ("pos", "default")]
    acts = rng.normal(size=(len(keys), L, H))
    vs = derive_vectors(acts, keys, kind="roles")
    assert set(vs.vectors) == {"pos_all", "default_all"}
    assert vs.contrast_of == "pos_all-default_all"
    below = derive_vectors(acts[:60], keys[:60], kind="roles")  # 30 each < 50
    assert below.vectors == {} and below.contrast is None and below.counts["pos_all"] == 30


def test_bad_inputs_are_refused():
    acts = np.zeros((2, L, H))
    with pytest.raises(ValueError, match="n_samples"):
        derive_vectors(acts, ["pos_p0_q0"], kind="traits")
    with pytest.raises(ValueError, match="sample key"):
        derive_vectors(acts, ["pos_p0_q0", "weird"], kind="traits")
    with pytest.raises(ValueError, match="kind"):
        derive_vectors(acts, ["pos_p0_q0", "neg_p0_q0"], kind="styles")
