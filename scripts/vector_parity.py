"""The vectors a finished capture job stored, against plain-loop readings of the public scripts.

    PYTHONPATH=. python scripts/vector_parity.py JOB_ID [--scores-seed 0]

Reads the job's persona artifacts and job_vectors from the configured store (the embedded
local folder by default). For every persona it compares, per vector name:
  - without scores: the vectors the job stored (persona artifact + job_vectors.safetensors)
    against the public definition with every sample scored 0 (the public scripts need a
    score file; all-zero scores select every pair and no filtered vector);
  - with scores: synthetic judge scores (0-100 with 10% REFUSAL for traits, 0-3 for roles;
    two keys per persona left out, no judge scores being published) through our code path
    (derive_vectors on the persona, complete_pending with the default persona) against the
    public script.
The references are the ones in tests/unit/test_vectors.py (each cites its script and lines).
Prints a markdown table: vector, personas, pairs/samples counted (total), max |ours - public|;
and the axis shape when the job has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("job_id")
    ap.add_argument("--scores-seed", type=int, default=0)
    ap.add_argument("--min-count", type=int, default=None)
    args = ap.parse_args()

    from safetensors.numpy import load

    from app.artifacts import read_persona_artifact
    from app.db import session_scope
    from app.models import Job
    from app.settings import get_settings
    from app.storage import get_store
    from app.vectors import assistant_axis, complete_pending, derive_vectors
    from tests.unit.test_vectors import (
        ref_axis,
        ref_mean_vector,
        ref_pos_3_vector,
        ref_roles_5_vectors,
        ref_traits_5_vectors,
    )

    settings = get_settings()
    store = get_store(settings)
    with session_scope() as s:
        job = s.get(Job, args.job_id)
        prefix = job.artifact_prefix
        params = dict(job.params or {})
    objs = [o.key for o in store.list(prefix + "/")]
    personas = {k.rsplit("/", 1)[1][: -len(".safetensors")]: k for k in objs
                if k.endswith(".safetensors") and not k.endswith(".vectors.safetensors")
                and not k.endswith("/job_vectors.safetensors")}
    arts = {p: read_persona_artifact(store.get_bytes(k)) for p, k in sorted(personas.items())}
    jv_key = f"{prefix}/job_vectors.safetensors"
    job_vecs = load(store.get_bytes(jv_key)) if jv_key in objs else {}
    default = arts.get("default")
    kind = "traits" if any(k.startswith("neg_") for a in arts.values() for k in a.keys) else "roles"
    min_count = args.min_count or params.get("min_count") or (50 if kind == "roles" else None)
    rng = np.random.default_rng(args.scores_seed)
    rows: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0])  # personas, n, diff
    axis_parts: dict[str, tuple] = {}  # role -> (our pos_3, the 4_vectors.py pos_3)

    def record(mode, name, n, ours, ref):
        r = rows[(mode, name)]
        r[0] += 1
        r[1] += n
        if ours is not None or ref is not None:
            if ours is None or ref is None:
                r[2] = float("inf")  # present on one side only
            else:
                r[2] = max(r[2], float(np.abs(np.asarray(ours, np.float64) - ref).max()))

    for persona, art in arts.items():
        if persona == "default":
            ref = ref_mean_vector(dict(zip(art.keys, art.activations)))
            record("no scores", "default: mean", len(art.keys), art.vectors.get("mean"), ref)
            continue
        table = dict(zip(art.keys, art.activations))
        if default is not None:
            table.update(zip(default.keys, default.activations))
        n_p = 1 + max(int(k.split("_p")[1].split("_")[0]) for k in table)
        n_q = 1 + max(int(k.split("_q")[1]) for k in table)
        stored = dict(art.vectors)
        stored.update({k.split(".", 1)[1]: v for k, v in job_vecs.items()
                       if k.startswith(persona + ".")})
        if kind == "traits":
            ref, counts = ref_traits_5_vectors(table, {k: 0 for k in table}, n_prompts=n_p,
                                               n_questions=n_q)
            for name in ("pos_neg", "pos_default"):
                record("no scores", name, counts[name], stored.get(name), ref.get(name))
            scores = {k: ("REFUSAL" if rng.random() < 0.1 else int(rng.integers(0, 101)))
                      for k in table}
        else:
            # unscored: every sample, as the public groups with every sample scored alike
            ref = ref_roles_5_vectors(table, {k: 3 for k in table}, min_count or 50)
            for name in ("pos_all", "default_all"):
                n = sum(1 for k in table if k.startswith(name.split("_")[0] + "_"))
                record("no scores", name, n, stored.get(name), ref.get(name))
            scores = {k: int(rng.choice([0, 1, 2, 3, 3])) for k in table}
        for gone in rng.choice(sorted(scores), size=2, replace=False):
            del scores[str(gone)]
        own = [k for k in art.keys]
        vs = derive_vectors(art.activations, own, kind=kind, scores=scores,
                            default_keys=list(default.keys) if default else [],
                            min_count=min_count)
        ours = dict(vs.vectors)
        if default is not None:
            ours.update(complete_pending(vs, default.activations, list(default.keys)))
        if kind == "traits":
            ref, counts = ref_traits_5_vectors(table, scores, n_prompts=n_p, n_questions=n_q)
            for name in ("pos_neg", "pos_neg_50", "pos_default", "pos_default_50", "pos_70",
                         "pos_40_70"):
                assert vs.counts[name] == counts[name], (persona, name)
                record("scores", name, counts[name], ours.get(name), ref.get(name))
        else:
            ref = ref_roles_5_vectors(table, scores, min_count)
            for name in ("pos_3", "pos_all", "default_1", "default_all"):
                record("scores", name, vs.counts.get(name, 0), ours.get(name), ref.get(name))
            r3 = ref_pos_3_vector(dict(zip(art.keys, art.activations)), scores, min_count)
            record("scores", "pos_3 (4_vectors.py)", vs.counts.get("pos_3", 0),
                   ours.get("pos_3"), r3)
            if r3 is not None and "pos_3" in ours:
                axis_parts[persona] = (ours["pos_3"], r3)
            if "pos_3" in ref and "default_1" in ref:
                record("scores", "pos_3-default_1", 0, ours.get("pos_3-default_1"),
                       ref["pos_3"] - ref["default_1"])

    if axis_parts and default is not None:
        d_ours = derive_vectors(default.activations, list(default.keys), kind=kind,
                                persona="default").vectors["mean"]
        axis, _ = assistant_axis(d_ours, {p: o for p, (o, _) in axis_parts.items()})
        ref = ref_axis([ref_mean_vector(dict(zip(default.keys, default.activations)))],
                       [r for _, r in axis_parts.values()])
        record("scores", f"axis {list(axis.shape)} (5_axis.py)", len(axis_parts), axis, ref)
    print(f"job {args.job_id}: {kind}, {len(arts)} personas, dataset {job.dataset}\n")
    print("| scores | vector | personas | pairs/samples (total) | max abs diff vs public |")
    print("|---|---|---|---|---|")
    for (mode, name), (n_pers, n, diff) in sorted(rows.items()):
        print(f"| {mode} | {name} | {n_pers} | {n:,} | {diff:.2e} |")
    report_key = f"{prefix}/axis.json"
    if report_key in objs:
        report = json.loads(store.get_bytes(report_key))
        print(f"\naxis: {report.get('axis_shape')} ({report.get('axis_of')}; "
              f"{report.get('n_roles')} roles){'' if report.get('axis') else ' none: ' + str(report.get('axis_reason'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
