"""Persona vectors from per-sample response means, exactly as the public pipelines define them.

Input: ``activations`` ``(n_samples, n_layers, hidden)`` (each row the mean over one sample's
response tokens), the sample ``keys`` (``"{label}_p{prompt}_q{question}"``) and optionally
judge ``scores`` (key -> number or ``"REFUSAL"``). Output vectors are ``(n_layers, hidden)``.

Traits (persona-subspace ``traits/5_vectors.py``, ``compute_vectors``):
  pos_neg        mean(pos) - mean(neg) over (pos, neg) pairs with the same p and q
  pos_neg_50     the same over pairs whose score gap pos - neg exceeds 50
  pos_default    / pos_default_50: the same against ``default`` samples of the same p and q
  pos_70         mean of pos samples scoring >= 70
  pos_40_70      mean of pos samples scoring in [40, 70)
  A pos sample counts only when it is scored and not "REFUSAL"; a pair only when its other
  member is scored and not "REFUSAL"; and when the question's ``neg`` sample is "REFUSAL"
  the pos-default pair of that question is dropped too (the script's ``continue`` leaves the
  loop body before the default pair). Without scores (an extension: the script needs a score
  file) pos_neg / pos_default use every pair and the score-filtered vectors are absent. An
  empty selection gives no vector (the script wrote zeros of a fixed shape).

Roles (persona-subspace ``roles/5_vectors.py``; assistant-axis ``pipeline/4_vectors.py``):
  pos_0..pos_3, default_0..default_3   mean of samples of that label with that 0-3 score
  pos_all, default_all                 mean over every 0-3 scored sample of the label
                                       (without scores: over every sample of the label)
  Each needs ``min_count`` samples (default 50) or is absent. ``pos_3`` is also
  assistant-axis's role vector (role files hold only pos samples there).
  ``pos_3-default_1`` is persona-subspace's role contrast.
The default persona (assistant-axis ``4_vectors.py`` ``compute_mean_vector``): ``mean`` over
all its samples, unfiltered, no minimum.

The default persona is captured once per job, so a persona's vectors against ``default``
are computed in two halves: :func:`derive_vectors` (on the worker, with the persona's own
samples) returns the persona side of each such vector and the default keys it pairs with
(:attr:`VectorSet.pending`); :func:`complete_pending` (when the job ends, with the default
persona's samples) finishes them. :func:`derive_all` does both at once for one table of
samples. Sums accumulate in float64; vectors come back as float32 unless asked otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

KEY_RE = re.compile(r"^(pos|neg|default)_p(\d+)_q(\d+)$")
REFUSAL = "REFUSAL"
ROLE_MIN_COUNT = 50
DEFAULT_VECTOR = "mean"


@dataclass
class Pending:
    """A vector against ``default`` waiting for the default persona's samples.

    ``pair``: ``persona_mean - mean(default[keys])`` (one default key per pair, in pair
    order; pairs share a default sample across personas, never within one).
    ``mean``: ``mean(default[keys])`` (a role's ``default_<score>`` group), kept only when
    ``len(keys) >= min_count``."""

    kind: str  # pair | mean
    default_keys: list[str]
    persona_mean: np.ndarray | None = None
    min_count: int = 1


@dataclass
class VectorSet:
    vectors: dict[str, np.ndarray]
    counts: dict[str, int]  # samples (or pairs) behind every candidate, present or not
    contrast: np.ndarray | None = None
    contrast_of: str | None = None
    params: dict = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    missing_scores: list[str] = field(default_factory=list)  # keys a score was needed for

    def named(self) -> dict[str, np.ndarray]:
        """Every vector under its name, with a contrast of two of them (roles'
        ``pos_3-default_1``) under its own; a traits contrast is one of the vectors already."""
        out = dict(self.vectors)
        if self.contrast is not None and self.contrast_of and "-" in self.contrast_of:
            out[self.contrast_of] = self.contrast
        return out


def parse_key(key: str) -> tuple[str, int, int]:
    m = KEY_RE.match(key)
    if not m:
        raise ValueError(f"sample key {key!r} is not '{{pos|neg|default}}_p<N>_q<N>'")
    return m.group(1), int(m.group(2)), int(m.group(3))


def derive_vectors(activations: np.ndarray, keys: list[str], *, kind: str,
                   scores: dict[str, float | str] | None = None, min_count: int | None = None,
                   default_keys: list[str] | None = None, persona: str | None = None,
                   pos_neg_threshold: float = 50, pos_default_threshold: float = 50,
                   out_dtype=np.float32) -> VectorSet:
    """Vectors of one persona; ``kind`` is 'traits' or 'roles'.

    ``default_keys``: the default persona's sample keys in this job (captured separately);
    vectors against them come back in ``pending``. When ``keys`` hold default samples too
    (the default persona folded into this persona's table, as the public scripts' files
    hold it), everything is finished here and ``pending`` is empty. ``persona="default"``
    gives the default persona's ``mean`` vector.
    """
    if persona != "default" and any(k.startswith("default_") for k in keys):
        acts = np.asarray(activations)
        own = [i for i, k in enumerate(keys) if not k.startswith("default_")]
        dflt = [i for i, k in enumerate(keys) if k.startswith("default_")]
        dkeys = [keys[i] for i in dflt]
        vs = derive_vectors(acts[own], [keys[i] for i in own], kind=kind, scores=scores,
                            min_count=min_count, default_keys=dkeys, persona=persona,
                            pos_neg_threshold=pos_neg_threshold,
                            pos_default_threshold=pos_default_threshold, out_dtype=out_dtype)
        done = complete_pending(vs, acts[dflt], dkeys, out_dtype=out_dtype)
        vs.pending = {}
        vs.vectors.update({k: v for k, v in done.items() if "-" not in k})
        contrast = next((k for k in done if "-" in k), None)
        if contrast is not None:
            vs.contrast, vs.contrast_of = done[contrast], contrast
        return vs
    acts = np.asarray(activations)
    if acts.ndim != 3 or acts.shape[0] != len(keys):
        raise ValueError(f"activations must be (n_samples={len(keys)}, n_layers, hidden), "
                         f"got {acts.shape}")
    if len(set(keys)) != len(keys):
        raise ValueError("sample keys are not unique")
    index = {k: i for i, k in enumerate(keys)}
    for k in keys:
        parse_key(k)
    if persona == "default":
        vs = VectorSet({DEFAULT_VECTOR: _mean(acts, list(range(len(keys))))},
                       {DEFAULT_VECTOR: len(keys)})
    elif kind == "traits":
        vs = _traits(acts, index, list(default_keys or []), scores, pos_neg_threshold,
                     pos_default_threshold, 1 if min_count is None else min_count)
    elif kind == "roles":
        vs = _roles(acts, index, list(default_keys or []), scores,
                    ROLE_MIN_COUNT if min_count is None else min_count)
    else:
        raise ValueError(f"kind must be 'traits' or 'roles', not {kind!r}")
    if scores is not None and persona != "default":
        wanted = list(keys) + [k for k in (default_keys or []) if k not in index]
        vs.missing_scores = [k for k in wanted if k not in scores]
    vs.vectors = {k: v.astype(out_dtype) for k, v in vs.vectors.items()}
    if vs.contrast is not None:
        vs.contrast = vs.contrast.astype(out_dtype)
    vs.params = {"kind": kind, "scored": scores is not None, "min_count": min_count,
                 "pos_neg_threshold": pos_neg_threshold,
                 "pos_default_threshold": pos_default_threshold}
    return vs


def complete_pending(vs: VectorSet, default_acts: np.ndarray, default_keys: list[str],
                     out_dtype=np.float32) -> dict[str, np.ndarray]:
    """Finish a persona's vectors against ``default`` with the default persona's samples;
    for roles also ``pos_3-default_1`` (else ``pos_all-default_all``) as the contrast."""
    index = {k: i for i, k in enumerate(default_keys)}
    out: dict[str, np.ndarray] = {}
    for name, p in vs.pending.items():
        rows = [index[k] for k in p.default_keys if k in index]
        if len(rows) != len(p.default_keys) or len(rows) < max(1, p.min_count):
            continue
        d = _mean(default_acts, rows)
        out[name] = (p.persona_mean - d) if p.kind == "pair" else d
    for a, b in (("pos_3", "default_1"), ("pos_all", "default_all")):
        va = vs.vectors.get(a)
        if va is not None and b in out and vs.params.get("kind") == "roles":
            out[f"{a}-{b}"] = va.astype(np.float64) - out[b]
            break
    return {k: v.astype(out_dtype) for k, v in out.items()}


def derive_all(activations: np.ndarray, keys: list[str], *, kind: str, scores=None,
               min_count: int | None = None, **kw) -> dict[str, np.ndarray]:
    """Every vector of one persona from one table holding its samples and the default
    persona's (``default_*`` keys): the public scripts' view, where both sit in one file.
    Includes the roles contrast under its name (``pos_3-default_1``)."""
    return derive_vectors(activations, keys, kind=kind, scores=scores, min_count=min_count,
                          **kw).named()


def _mean(acts: np.ndarray, rows: list[int]) -> np.ndarray:
    return acts[rows].astype(np.float64).mean(axis=0)


def _ordered(index: dict[str, int], label: str) -> list[tuple[int, int, str]]:
    """(p, q, key) of one label, in the scripts' loop order (prompt, then question)."""
    out = []
    for key in index:
        lab, p, q = parse_key(key)
        if lab == label:
            out.append((p, q, key))
    return sorted(out)


def _traits(acts, index, default_keys, scores, t_neg, t_default, min_count) -> VectorSet:
    scored = scores is not None
    n_neg, n_def = f"pos_neg_{t_neg:g}", f"pos_default_{t_default:g}"
    pos_only: dict[str, list[int]] = {"pos_70": [], "pos_40_70": []}
    pairs: dict[str, list[tuple[int, int]]] = {"pos_neg": [], n_neg: []}
    dpairs: dict[str, list[tuple[int, str]]] = {"pos_default": [], n_def: []}
    dset = set(default_keys) | {k for k in index if k.startswith("default_")}

    def usable(key):  # present among the samples and scored
        return not scored or key in scores

    for p, q, pos in _ordered(index, "pos"):
        if scored:
            if pos not in scores or scores[pos] == REFUSAL:
                continue
            s = scores[pos]
            if s >= 70:
                pos_only["pos_70"].append(index[pos])
            elif s >= 40:
                pos_only["pos_40_70"].append(index[pos])
        neg, dflt = f"neg_p{p}_q{q}", f"default_p{p}_q{q}"
        if neg in index and usable(neg):
            if scored and scores[neg] == REFUSAL:
                continue  # the REFUSAL rule: the pos-default pair of this question goes too
            pairs["pos_neg"].append((index[pos], index[neg]))
            if scored and s - scores[neg] > t_neg:
                pairs[n_neg].append((index[pos], index[neg]))
        if dflt in dset and usable(dflt):
            if scored and scores[dflt] == REFUSAL:
                continue
            dpairs["pos_default"].append((index[pos], dflt))
            if scored and s - scores[dflt] > t_default:
                dpairs[n_def].append((index[pos], dflt))
    if not scored:
        for d in (pos_only, pairs, dpairs):
            for name in [n for n in d if n not in ("pos_neg", "pos_default")]:
                del d[name]
    counts = {**{n: len(v) for n, v in pairs.items()}, **{n: len(v) for n, v in dpairs.items()},
              **{n: len(v) for n, v in pos_only.items()}}
    vectors: dict[str, np.ndarray] = {}
    pending: dict[str, Pending] = {}
    floor = max(1, min_count)
    for name, rows in pos_only.items():
        if len(rows) >= floor:
            vectors[name] = _mean(acts, rows)
    for name, sel in pairs.items():
        if len(sel) >= floor:
            a, b = zip(*sel)
            vectors[name] = _mean(acts, list(a)) - _mean(acts, list(b))
    for name, sel in dpairs.items():
        if len(sel) >= floor:
            a = [i for i, _ in sel]
            pending[name] = Pending("pair", [k for _, k in sel], _mean(acts, a))
    of = next((n for n in (n_neg, "pos_neg") if n in vectors), None)
    return VectorSet(vectors, counts, vectors.get(of), of, pending=pending)


def _roles(acts, index, default_keys, scores, min_count) -> VectorSet:
    groups: dict[str, list[str]] = {}
    own = [k for k in index if not k.startswith("default_")]
    for key in own + [k for k in default_keys if k not in index]:
        label, _, _ = parse_key(key)
        if label == "neg":
            continue
        if scores is None:
            groups.setdefault(f"{label}_all", []).append(key)
            continue
        s = scores.get(key)
        if s is None or s == REFUSAL or s not in (0, 1, 2, 3):
            continue
        groups.setdefault(f"{label}_{int(s)}", []).append(key)
        groups.setdefault(f"{label}_all", []).append(key)
    names = ([f"{lab}_{s}" for lab in ("pos", "default") for s in (0, 1, 2, 3)]
             if scores is not None else []) + ["pos_all", "default_all"]
    counts = {n: len(groups.get(n, [])) for n in names}
    floor = max(1, min_count)
    vectors = {n: _mean(acts, [index[k] for k in groups[n]]) for n in names
               if n.startswith("pos_") and counts[n] >= floor}
    pending = {n: Pending("mean", groups[n], min_count=floor) for n in names
               if n.startswith("default_") and counts[n] >= floor}
    return VectorSet(vectors, counts, pending=pending)


def assistant_axis(default_mean: np.ndarray, role_vectors: dict[str, np.ndarray]):
    """assistant-axis ``pipeline/5_axis.py``: ``axis = mean(default) - mean(role vectors)``
    per layer (one default vector here, so its mean is itself). Returns (axis, role_mean)."""
    if not role_vectors:
        raise ValueError("no role vectors: the axis needs at least one")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in role_vectors.values()])
    role_mean = stacked.mean(axis=0)
    return np.asarray(default_mean, dtype=np.float64) - role_mean, role_mean


def project(vector: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Per layer, ``vector[l] @ (axis[l] / (|axis[l]| + 1e-8))``: assistant-axis's
    ``assistant_axis/axis.py`` ``project(..., normalize=True)`` at every layer at once."""
    v = np.asarray(vector, dtype=np.float64)
    a = np.asarray(axis, dtype=np.float64)
    return (v * (a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-8))).sum(-1)
