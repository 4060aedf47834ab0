"""Persona vectors derived from per-sample response means, as the public pipelines define them.

Input: ``activations`` ``(n_samples, n_layers, hidden)`` (each row the mean over one sample's
response tokens), the sample ``keys`` (``"{label}_p{prompt}_q{question}"``) and optionally
judge ``scores`` (key -> number or ``"REFUSAL"``). Output vectors are ``(n_layers, hidden)``.

Traits (persona-subspace ``traits/5_vectors.py``):
  pos_neg        mean(pos) - mean(neg) over (pos, neg) pairs with the same p and q
  pos_neg_50     the same over pairs whose score gap pos - neg exceeds 50
  pos_default    / pos_default_50: the same against ``default`` samples of the same p and q
  pos_70         mean of pos samples scoring >= 70
  pos_40_70      mean of pos samples scoring in [40, 70)
With scores, a pair (or sample) counts only when every member is scored and none is
"REFUSAL", as there; without scores pos_neg / pos_default use every pair and the
score-filtered vectors are absent. An empty selection gives no vector (the public script
wrote zeros, which later looked like data).

Roles (persona-subspace ``roles/5_vectors.py``, assistant-axis ``4_vectors.py``):
  pos_0..pos_3, default_0..default_3   mean of samples of that label with that 0-3 score
  pos_all, default_all                 mean over every 0-3 scored sample of the label
                                       (without scores: over every sample of the label)
Each needs ``min_count`` samples (default 50) or is absent.

``contrast`` (persona minus control): traits ``pos_neg_50`` else ``pos_neg``; roles
``pos_3 - default_1`` else ``pos_all - default_all``; ``contrast_of`` says which was used.

Sums accumulate in float64; vectors come back as float32 unless asked otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

KEY_RE = re.compile(r"^(pos|neg|default)_p(\d+)_q(\d+)$")
REFUSAL = "REFUSAL"
ROLE_MIN_COUNT = 50


@dataclass
class VectorSet:
    vectors: dict[str, np.ndarray]
    counts: dict[str, int]  # samples (or pairs) behind every candidate, present or not
    contrast: np.ndarray | None = None
    contrast_of: str | None = None
    params: dict = field(default_factory=dict)


def parse_key(key: str) -> tuple[str, int, int]:
    m = KEY_RE.match(key)
    if not m:
        raise ValueError(f"sample key {key!r} is not '{{pos|neg|default}}_p<N>_q<N>'")
    return m.group(1), int(m.group(2)), int(m.group(3))


def derive_vectors(activations: np.ndarray, keys: list[str], *, kind: str,
                   scores: dict[str, float | str] | None = None, min_count: int | None = None,
                   pos_neg_threshold: float = 50, pos_default_threshold: float = 50,
                   out_dtype=np.float32) -> VectorSet:
    """All vectors of one persona; ``kind`` is the dataset kind ('traits' or 'roles')."""
    acts = np.asarray(activations)
    if acts.ndim != 3 or acts.shape[0] != len(keys):
        raise ValueError(f"activations must be (n_samples={len(keys)}, n_layers, hidden), "
                         f"got {acts.shape}")
    if len(set(keys)) != len(keys):
        raise ValueError("sample keys are not unique")
    index = {k: i for i, k in enumerate(keys)}
    for k in keys:
        parse_key(k)
    if kind == "traits":
        vs = _traits(acts, index, scores, pos_neg_threshold, pos_default_threshold,
                     1 if min_count is None else min_count)
    elif kind == "roles":
        vs = _roles(acts, index, scores, ROLE_MIN_COUNT if min_count is None else min_count)
    else:
        raise ValueError(f"kind must be 'traits' or 'roles', not {kind!r}")
    vs.vectors = {k: v.astype(out_dtype) for k, v in vs.vectors.items()}
    if vs.contrast is not None:
        vs.contrast = vs.contrast.astype(out_dtype)
    vs.params = {"kind": kind, "scored": scores is not None, "min_count": min_count,
                 "pos_neg_threshold": pos_neg_threshold,
                 "pos_default_threshold": pos_default_threshold}
    return vs


def _mean(acts: np.ndarray, rows: list[int]) -> np.ndarray:
    return acts[rows].astype(np.float64).mean(axis=0)


def _usable(key: str, scores) -> bool:
    return scores is None or (key in scores and scores[key] != REFUSAL)


def _traits(acts, index, scores, t_neg, t_default, min_count) -> VectorSet:
    picks: dict[str, list] = {n: [] for n in (
        "pos_neg", f"pos_neg_{t_neg:g}", "pos_default", f"pos_default_{t_default:g}",
        "pos_70", "pos_40_70")}
    for key, i in index.items():
        label, p, q = parse_key(key)
        if label != "pos" or not _usable(key, scores):
            continue
        s = None if scores is None else scores[key]
        if s is not None:
            if s >= 70:
                picks["pos_70"].append(i)
            elif s >= 40:
                picks["pos_40_70"].append(i)
        for other, thr in (("neg", t_neg), ("default", t_default)):
            okey = f"{other}_p{p}_q{q}"
            if okey not in index or not _usable(okey, scores):
                continue
            pair = (i, index[okey])
            picks[f"pos_{other}"].append(pair)
            if s is not None and s - scores[okey] > thr:
                picks[f"pos_{other}_{thr:g}"].append(pair)
    if scores is None:
        for name in list(picks):
            if name not in ("pos_neg", "pos_default"):
                del picks[name]
    counts = {n: len(v) for n, v in picks.items()}
    vectors = {}
    for name, sel in picks.items():
        if len(sel) < max(1, min_count):
            continue
        if name in ("pos_70", "pos_40_70"):
            vectors[name] = _mean(acts, sel)
        else:
            a, b = zip(*sel)
            vectors[name] = _mean(acts, list(a)) - _mean(acts, list(b))
    of = next((n for n in (f"pos_neg_{t_neg:g}", "pos_neg") if n in vectors), None)
    return VectorSet(vectors, counts, vectors.get(of), of)


def _roles(acts, index, scores, min_count) -> VectorSet:
    groups: dict[str, list[int]] = {}
    for key, i in index.items():
        label, _, _ = parse_key(key)
        if label == "neg":
            continue
        if scores is None:
            groups.setdefault(f"{label}_all", []).append(i)
            continue
        s = scores.get(key)
        if s is None or s == REFUSAL or s not in (0, 1, 2, 3):
            continue
        groups.setdefault(f"{label}_{int(s)}", []).append(i)
        groups.setdefault(f"{label}_all", []).append(i)
    names = ([f"{lab}_{s}" for lab in ("pos", "default") for s in (0, 1, 2, 3)]
             if scores is not None else []) + ["pos_all", "default_all"]
    counts = {n: len(groups.get(n, [])) for n in names}
    vectors = {n: _mean(acts, groups[n]) for n in names
               if counts[n] >= max(1, min_count)}
    for a, b in (("pos_3", "default_1"), ("pos_all", "default_all")):
        if a in vectors and b in vectors:
            return VectorSet(vectors, counts, vectors[a] - vectors[b], f"{a}-{b}")
    return VectorSet(vectors, counts)
