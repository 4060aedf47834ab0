"""Derived vectors against plain-loop readings of the public scripts, on random data.

Each ``ref_*`` function below follows one public script statement by statement (cited by
repository, file, commit and line), with Python lists standing in for torch tensors, so a
difference in a rule (which pairs count, which ``continue`` skips what) shows up as a
difference in the vectors or in the counts. Data are synthetic: random activations and
random 0-100 / 0-3 scores with REFUSAL sprinkled in, including the cases the rules differ on
(a REFUSAL neg sample, a key absent from the score file).
"""

from __future__ import annotations

import numpy as np
import pytest

from app.vectors import (
    assistant_axis,
    complete_pending,
    derive_all,
    derive_vectors,
    project,
)

L, H = 3, 5
TOL = {"rtol": 1e-5, "atol": 1e-6}


def mean_of(rows):
    """``torch.stack(rows).mean(dim=0)``, as a loop in float64."""
    n_layers, hidden = np.shape(rows[0])
    total = np.zeros((n_layers, hidden))
    for r in rows:
        for layer in range(n_layers):
            for h in range(hidden):
                total[layer, h] += float(r[layer, h])
    return total / len(rows)


# ---------------------------------------------------------------------------- references


def ref_traits_5_vectors(activations: dict, scores: dict, pos_neg_threshold=50,
                         pos_default_threshold=50, n_prompts=5, n_questions=240):
    """lu-christina/persona-subspace ``traits/5_vectors.py`` (commit 1ef02de),
    ``compute_vectors`` lines 43-135: the loops over prompt_idx / question_idx (60-61), the
    pos check and REFUSAL skip (67-73), the score buckets (76-79), the pos-neg pair with its
    REFUSAL ``continue`` (82-95; the ``continue`` at 88 also skips the pos-default pair
    below it), the pos-default pair (98-111). Empty selections return zeros there; here they
    are left out (``None``), as our artifacts leave such vectors out."""
    pos_neg_all, pos_neg_f, pos_def_all, pos_def_f, pos_70, pos_40_70 = [], [], [], [], [], []
    for prompt_idx in range(n_prompts):
        for question_idx in range(n_questions):
            pos_key = f"pos_p{prompt_idx}_q{question_idx}"
            neg_key = f"neg_p{prompt_idx}_q{question_idx}"
            default_key = f"default_p{prompt_idx}_q{question_idx}"
            if pos_key in activations and pos_key in scores:
                pos_activation = activations[pos_key]
                pos_score = scores[pos_key]
                if pos_score == "REFUSAL":
                    continue
                if pos_score >= 70:
                    pos_70.append(pos_activation)
                elif pos_score >= 40 and pos_score < 70:
                    pos_40_70.append(pos_activation)
                if neg_key in activations and neg_key in scores:
                    neg_activation = activations[neg_key]
                    neg_score = scores[neg_key]
                    if neg_score == "REFUSAL":
                        continue
                    pos_neg_all.append((pos_activation, neg_activation))
                    if (pos_score - neg_score) > pos_neg_threshold:
                        pos_neg_f.append((pos_activation, neg_activation))
                if default_key in activations and default_key in scores:
                    default_activation = activations[default_key]
                    default_score = scores[default_key]
                    if default_score == "REFUSAL":
                        continue
                    pos_def_all.append((pos_activation, default_activation))
                    if (pos_score - default_score) > pos_default_threshold:
                        pos_def_f.append((pos_activation, default_activation))

    def diff(pairs):
        if not pairs:
            return None
        return mean_of([p[0] for p in pairs]) - mean_of([p[1] for p in pairs])

    out = {"pos_neg": diff(pos_neg_all), f"pos_neg_{pos_neg_threshold}": diff(pos_neg_f),
           "pos_default": diff(pos_def_all),
           f"pos_default_{pos_default_threshold}": diff(pos_def_f),
           "pos_70": mean_of(pos_70) if pos_70 else None,
           "pos_40_70": mean_of(pos_40_70) if pos_40_70 else None}
    counts = {"pos_neg": len(pos_neg_all), "pos_neg_50": len(pos_neg_f),
              "pos_default": len(pos_def_all), "pos_default_50": len(pos_def_f),
              "pos_70": len(pos_70), "pos_40_70": len(pos_40_70)}
    return {k: v for k, v in out.items() if v is not None}, counts


def ref_roles_5_vectors(activations: dict, scores: dict, min_count_threshold=50):
    """lu-christina/persona-subspace ``roles/5_vectors.py`` (commit 69d51f8),
    ``compute_vectors`` lines 42-107: group by prompt type and 0-3 score, skipping keys with
    no score (57-58), REFUSAL (63-64) and scores outside 0-3 (75-76); a vector per group and
    per prompt type ("_all") when it has at least ``min_count_threshold`` rows (92-105)."""
    groups = {"pos": {0: [], 1: [], 2: [], 3: []}, "default": {0: [], 1: [], 2: [], 3: []}}
    for key, activation in activations.items():
        if key not in scores:
            continue
        score = scores[key]
        if score == "REFUSAL":
            continue
        if key.startswith("pos_"):
            prompt_type = "pos"
        elif key.startswith("default_"):
            prompt_type = "default"
        else:
            continue
        if score not in [0, 1, 2, 3]:
            continue
        groups[prompt_type][score].append(activation)
    result = {}
    for prompt_type in ["pos", "default"]:
        for label in [0, 1, 2, 3]:
            rows = groups[prompt_type][label]
            if len(rows) >= min_count_threshold:
                result[f"{prompt_type}_{label}"] = mean_of(rows)
        every = []
        for rows in groups[prompt_type].values():
            every.extend(rows)
        if len(every) >= min_count_threshold:
            result[f"{prompt_type}_all"] = mean_of(every)
    return result


def ref_pos_3_vector(activations: dict, scores: dict, min_count=50):
    """safety-research/assistant-axis ``pipeline/4_vectors.py`` (commit a989619)
    ``compute_pos_3_vector`` lines 38-61: rows whose score == 3 (53), at least ``min_count``
    of them or the role fails (56-57)."""
    filtered = [act for key, act in activations.items() if key in scores and scores[key] == 3]
    if len(filtered) < min_count:
        return None
    return mean_of(filtered)


def ref_mean_vector(activations: dict):
    """``pipeline/4_vectors.py`` ``compute_mean_vector`` lines 64-76 (the default role)."""
    return mean_of(list(activations.values()))


def ref_axis(default_vectors: list, role_vectors: list):
    """``pipeline/5_axis.py`` (commit a989619) lines 72-80: stack, mean over dim 0 each,
    ``axis = default_mean - role_mean``."""
    return mean_of(default_vectors) - mean_of(role_vectors)


# ------------------------------------------------------------------------------ data


def trait_data(rng, n_p=5, n_q=24, drop=(), unscored=(), refusal=0.1):
    """A trait's pos/neg samples and the default persona's, with 0-100 scores."""
    keys = [f"{lab}_p{p}_q{q}" for p in range(n_p) for q in range(n_q)
            for lab in ("pos", "neg", "default") if f"{lab}_p{p}_q{q}" not in drop]
    acts = rng.normal(size=(len(keys), L, H)).astype(np.float32)
    scores = {}
    for k in keys:
        if k in unscored:
            continue
        scores[k] = "REFUSAL" if rng.random() < refusal else int(rng.integers(0, 101))
    return keys, acts, scores


def split(keys, acts):
    own = [i for i, k in enumerate(keys) if not k.startswith("default_")]
    dflt = [i for i, k in enumerate(keys) if k.startswith("default_")]
    return ([keys[i] for i in own], acts[own]), ([keys[i] for i in dflt], acts[dflt])


def max_diff(ours: dict, ref: dict) -> float:
    return max(float(np.abs(ours[k] - ref[k]).max()) for k in ref)


# ------------------------------------------------------------------------------ traits


def test_trait_vectors_match_the_public_script_with_scores_refusals_and_gaps():
    rng = np.random.default_rng(0)
    keys, acts, scores = trait_data(rng, drop={"neg_p1_q3", "default_p2_q0"},
                                    unscored={"neg_p0_q5", "default_p3_q7", "pos_p4_q1"})
    ref, ref_counts = ref_traits_5_vectors(dict(zip(keys, acts)), scores, n_questions=24)
    ours = derive_all(acts, keys, kind="traits", scores=scores)
    assert set(ours) == set(ref) == {
        "pos_neg", "pos_neg_50", "pos_default", "pos_default_50", "pos_70", "pos_40_70"}
    for name in ref:
        assert ours[name].shape == (L, H) and ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], ref[name], **TOL)
    (own_k, own_a), (d_k, _) = split(keys, acts)
    vs = derive_vectors(own_a, own_k, kind="traits", scores=scores, default_keys=d_k)
    assert vs.counts == ref_counts
    assert vs.contrast_of == "pos_neg_50"
    # every key a score was needed for and is absent is reported, not a dropped file
    assert sorted(vs.missing_scores) == sorted(["neg_p0_q5", "default_p3_q7", "pos_p4_q1"])


def test_a_refused_neg_drops_the_questions_pos_default_pair_too():
    """The case the old rule got wrong (it kept the pos-default pair)."""
    keys = ["pos_p0_q0", "neg_p0_q0", "default_p0_q0", "pos_p0_q1", "neg_p0_q1",
            "default_p0_q1"]
    acts = np.stack([np.full((L, H), v, np.float32) for v in (10, 1, 3, 20, 2, 5)])
    scores = {"pos_p0_q0": 90, "neg_p0_q0": "REFUSAL", "default_p0_q0": 10,
              "pos_p0_q1": 80, "neg_p0_q1": 10, "default_p0_q1": 10}
    ref, counts = ref_traits_5_vectors(dict(zip(keys, acts)), scores)
    ours = derive_all(acts, keys, kind="traits", scores=scores)
    assert counts["pos_default"] == 1  # only q1
    np.testing.assert_allclose(ours["pos_default"], ref["pos_default"])
    np.testing.assert_allclose(ours["pos_default"], 15.0)
    np.testing.assert_allclose(ours["pos_70"], 15.0)  # q0's pos still counts for pos_70


def test_trait_vectors_without_scores_are_the_unfiltered_pairs():
    rng = np.random.default_rng(1)
    keys, acts, _ = trait_data(rng, n_q=10, drop={"neg_p0_q1"})
    everything = {k: 0 for k in keys}  # scored, never refused, never over a threshold
    ref, _ = ref_traits_5_vectors(dict(zip(keys, acts)), everything, n_questions=10)
    ours = derive_all(acts, keys, kind="traits")
    assert set(ours) == {"pos_neg", "pos_default"}
    for name in ours:
        np.testing.assert_allclose(ours[name], ref[name], **TOL)


def test_default_persona_once_gives_the_same_vectors_as_default_inside_each_file():
    """Split as the job runs it (persona on a worker, default from its own item) versus
    both in one table (the script's view)."""
    rng = np.random.default_rng(5)
    keys, acts, scores = trait_data(rng, n_q=12)
    (own_k, own_a), (d_k, d_a) = split(keys, acts)
    vs = derive_vectors(own_a, own_k, kind="traits", scores=scores, default_keys=d_k)
    assert "pos_default" not in vs.vectors and set(vs.pending) == {"pos_default",
                                                                   "pos_default_50"}
    done = complete_pending(vs, d_a[::-1].copy(), d_k[::-1])  # order of rows is irrelevant
    whole = derive_all(acts, keys, kind="traits", scores=scores)
    for name in done:
        np.testing.assert_allclose(done[name], whole[name], **TOL)


# ------------------------------------------------------------------------------ roles


def role_data(rng, n_p=5, n_q=40, unscored=()):
    keys = [f"{lab}_p{p}_q{q}" for p in range(n_p) for q in range(n_q) for lab in ("pos", "default")]
    acts = rng.normal(size=(len(keys), L, H)).astype(np.float32)
    scores = {}
    for k in keys:
        if k in unscored:
            continue
        if k.startswith("pos_"):
            scores[k] = int(rng.choice([0, 1, 2, 3, 3, 3, 3, 3]))
        else:
            scores[k] = "REFUSAL" if rng.random() < 0.05 else int(rng.choice([1, 1, 1, 1, 2, 0]))
    return keys, acts, scores


def test_role_vectors_match_persona_subspace_with_min_count():
    rng = np.random.default_rng(3)
    keys, acts, scores = role_data(rng, unscored={"pos_p0_q0", "default_p1_q1"})
    ref = ref_roles_5_vectors(dict(zip(keys, acts)), scores, 50)
    ours = derive_all(acts, keys, kind="roles", scores=scores, min_count=50)
    assert {"pos_3", "default_1", "pos_all", "default_all"} <= set(ref)
    assert set(ours) - {"pos_3-default_1"} == set(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], **TOL)
    np.testing.assert_allclose(ours["pos_3-default_1"], ref["pos_3"] - ref["default_1"], **TOL)


def test_role_pos_3_and_default_mean_match_assistant_axis_4_vectors():
    rng = np.random.default_rng(6)
    keys, acts, scores = role_data(rng)
    (own_k, own_a), (d_k, d_a) = split(keys, acts)
    # assistant-axis role files hold only the role's pos samples (1_generate labels "pos")
    ref = ref_pos_3_vector(dict(zip(own_k, own_a)), scores, 50)
    vs = derive_vectors(own_a, own_k, kind="roles", scores=scores, min_count=50)
    np.testing.assert_allclose(vs.vectors["pos_3"], ref, **TOL)
    too_few = derive_vectors(own_a, own_k, kind="roles", scores=scores, min_count=10_000)
    assert "pos_3" not in too_few.vectors
    assert ref_pos_3_vector(dict(zip(own_k, own_a)), scores, 10_000) is None
    dv = derive_vectors(d_a, d_k, kind="roles", persona="default")
    np.testing.assert_allclose(dv.vectors["mean"], ref_mean_vector(dict(zip(d_k, d_a))), **TOL)


def test_role_vectors_without_scores():
    rng = np.random.default_rng(4)
    keys, acts, _ = role_data(rng, n_q=10)
    ours = derive_all(acts, keys, kind="roles")
    assert set(ours) == {"pos_all", "default_all", "pos_all-default_all"}
    everything = {k: 0 for k in keys}
    ref = ref_roles_5_vectors(dict(zip(keys, acts)), everything, 50)
    np.testing.assert_allclose(ours["pos_all"], ref["pos_all"], **TOL)
    below = derive_vectors(acts[:60], keys[:60], kind="roles")  # 30 pos < 50
    assert below.vectors == {} and below.counts["pos_all"] == 30


# ------------------------------------------------------------------------------ axis


def test_axis_matches_5_axis_and_projection_matches_project():
    rng = np.random.default_rng(7)
    default = rng.normal(size=(L, H))
    roles = {f"r{i}": rng.normal(size=(L, H)) for i in range(4)}
    axis, _ = assistant_axis(default, roles)
    ref = ref_axis([default], list(roles.values()))
    np.testing.assert_allclose(axis, ref, **TOL)
    assert axis.shape == (L, H)
    p = project(roles["r0"], axis)
    for layer in range(L):  # assistant_axis/axis.py project(): act @ (ax / (|ax| + 1e-8))
        ax = axis[layer] / (np.sqrt(sum(x * x for x in axis[layer])) + 1e-8)
        assert p[layer] == pytest.approx(sum(a * b for a, b in zip(roles["r0"][layer], ax)))
    with pytest.raises(ValueError, match="no role vectors"):
        assistant_axis(default, {})


def test_bad_inputs_are_refused():
    acts = np.zeros((2, L, H))
    with pytest.raises(ValueError, match="n_samples"):
        derive_vectors(acts, ["pos_p0_q0"], kind="traits")
    with pytest.raises(ValueError, match="sample key"):
        derive_vectors(acts, ["pos_p0_q0", "weird"], kind="traits")
    with pytest.raises(ValueError, match="kind"):
        derive_vectors(acts, ["pos_p0_q0", "neg_p0_q0"], kind="styles")
