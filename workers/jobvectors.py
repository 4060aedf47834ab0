"""The job's end for a capture job: vectors against the default persona, and the assistant axis.

The default persona is captured once per job (one item), so a persona's vectors against it
(traits ``pos_default``/``pos_default_50``; roles ``default_0..3``/``default_all`` and the
``pos_3-default_1`` contrast) are finished here, from each persona's small
``.vectors.safetensors`` and the default persona's activations read once. For roles the
assistant axis (assistant-axis ``pipeline/5_axis.py``: ``mean(default) - mean(role
vectors)``, role vector = ``pos_3`` per ``4_vectors.py``) is computed with every persona's
projection on it, per layer.

Written as two job artifacts beside the persona files: ``job_vectors.safetensors``
(``<persona>.<vector>`` tensors, plus ``axis``, ``default_mean`` and ``role_mean``) and
``axis.json`` (what went in, what was left out and why, projections). Runs when every item is
done and before the manifest, from stored files only, so two workers finishing together
write the same bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
from safetensors.numpy import load, save
from sqlalchemy import select

from app import jobs
from app.artifacts import read_persona_artifact, read_vector_sidecar
from app.datasets import DEFAULT_PERSONA
from app.db import session_scope
from app.models import Job, JobItem
from app.vectors import DEFAULT_VECTOR, assistant_axis, complete_pending, project

log = logging.getLogger(__name__)

VECTORS_FILE = "job_vectors.safetensors"
AXIS_FILE = "axis.json"


def derive_job(*, job, items: dict[str, str], prefix: str, store,
               on_event: Callable[[str, dict], None] = lambda k, d: None,
               axis_from: tuple[str, object] | None = None) -> list[dict]:
    """``items``: persona -> artifact key; ``axis_from``: (job id, axis array) of an earlier
    roles job, to project this job's personas (traits too) on its axis. Returns the stored
    objects (key, sha256, size)."""
    sets, metas = {}, {}
    for persona, key in sorted(items.items()):
        side = store.get_bytes(key.rsplit(".", 1)[0] + ".vectors.safetensors")
        sets[persona], metas[persona] = read_vector_sidecar(side)
    out: dict[str, np.ndarray] = {}
    if DEFAULT_PERSONA in sets and any(vs.pending for p, vs in sets.items()
                                       if p != DEFAULT_PERSONA):
        art = read_persona_artifact(store.get_bytes(items[DEFAULT_PERSONA]))
        for persona, vs in sets.items():
            if persona == DEFAULT_PERSONA:
                continue
            for name, v in complete_pending(vs, art.activations, art.keys).items():
                out[f"{persona}.{name}"] = v
    about = {"job_id": str(job.id), "dataset": job.dataset, "model": job.model,
             "dtype": job.dtype}
    stored, _ = store_job_vectors(sets, metas, out, about=about, prefix=prefix, store=store,
                                  on_event=on_event, axis_from=axis_from)
    return stored


def store_job_vectors(sets: dict, metas: dict, out: dict[str, np.ndarray], *, about: dict,
                      prefix: str, store,
                      on_event: Callable[[str, dict], None] = lambda k, d: None,
                      axis_from: tuple[str, object] | None = None) -> tuple[list[dict], dict]:
    """The job-level files from every persona's vectors (``sets``: persona -> VectorSet,
    ``metas``: their sidecar metadata; ``out``: ``<persona>.<vector>`` tensors finished
    already): the axis for roles, the report, ``job_vectors.safetensors`` and ``axis.json``.
    A capture job's end and a pipeline's axis stage both store through here. Returns (the
    stored objects, the report)."""
    out = dict(out)
    kind = next((m["kind"] for m in metas.values()), None)
    report: dict = {**about, "kind": kind, "default_persona": DEFAULT_PERSONA in sets}
    default_mean = (sets[DEFAULT_PERSONA].vectors.get(DEFAULT_VECTOR)
                    if DEFAULT_PERSONA in sets else None)
    missing = {p: {"file": m.get("scores", {}).get("file"),
                   "present": m.get("scores", {}).get("present"),
                   "missing_keys": m.get("scores", {}).get("missing_keys", 0)}
               for p, m in metas.items() if p != DEFAULT_PERSONA and (
                   not m.get("scores", {}).get("present")
                   or m.get("scores", {}).get("missing_keys"))}
    report["scores_missing"] = missing
    if kind == "roles" and default_mean is not None:
        report.update(_axis(sets, default_mean, out))
        on_event("axis", {k: report[k] for k in ("axis_shape", "axis_of", "n_roles")
                          if k in report} | {"excluded": len(report.get("excluded", {}))})
    else:
        report["axis"] = None
        report["axis_reason"] = ("the assistant axis is defined over roles with a default "
                                 "persona" if kind != "roles" else
                                 "the dataset has no default persona")
    if axis_from is not None:
        report["axis_from"] = {"job_id": axis_from[0], "projections": _project_all(
            sets, out, np.asarray(axis_from[1]))}
    if missing:
        absent = sorted(p for p, m in missing.items() if not m["present"])
        partial = {p: m["missing_keys"] for p, m in missing.items() if m["present"]}
        on_event("scores_missing", {"personas_without_file": len(absent),
                                    "without_file": absent[:50],
                                    "personas_missing_keys": partial})
    stored = []
    if out:
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(out.items())}
        data = save(tensors, metadata={"chatspace": json.dumps(
            {"schema": "chatspace.job_vectors", "job_id": about.get("job_id"), "kind": kind},
            sort_keys=True)})
        stored.append(store.put_bytes(f"{prefix}/{VECTORS_FILE}", data, overwrite=True))
    stored.append(store.put_bytes(
        f"{prefix}/{AXIS_FILE}", json.dumps(report, sort_keys=True, indent=2).encode(),
        content_type="application/json", overwrite=True))
    return [{"key": o.key, "sha256": o.sha256, "size": o.size} for o in stored], report


def _project_all(sets, out, axis) -> dict:
    """Every vector of every persona (own and finished against default), per layer."""
    res: dict[str, dict[str, list[float]]] = {}
    for persona, vs in sets.items():
        vecs = dict(vs.vectors)
        vecs.update({k.split(".", 1)[1]: v for k, v in out.items()
                     if k.startswith(persona + ".")})
        if vecs and axis.shape != next(iter(vecs.values())).shape:
            raise ValueError(f"axis shape {axis.shape} does not match the vectors "
                             f"{next(iter(vecs.values())).shape}")
        res[persona] = {n: [round(float(x), 6) for x in project(v, axis)]
                        for n, v in sorted(vecs.items())}
    return res


def _axis(sets, default_mean, out) -> dict:
    """Role vectors (``pos_3``; with no role scored, ``pos_all``, said so), the axis, and
    every persona's projections on it."""
    roles = {p: vs for p, vs in sets.items() if p != "default"}
    chosen = {p: vs.vectors["pos_3"] for p, vs in roles.items() if "pos_3" in vs.vectors}
    axis_of = "pos_3"
    if not chosen:
        chosen = {p: vs.vectors["pos_all"] for p, vs in roles.items() if "pos_all" in vs.vectors}
        axis_of = "pos_all (no role had enough score-3 samples: not the published filter)"
    excluded = {p: f"pos_3 needs {vs.params.get('min_count') or 50} score-3 samples, has "
                   f"{vs.counts.get('pos_3', 0)}" + ("" if vs.params.get("scored")
                                                      else " (no scores)")
                for p, vs in roles.items() if p not in chosen}
    if not chosen:
        return {"axis": None, "axis_reason": "no role vector met min_count", "excluded": excluded}
    axis, role_mean = assistant_axis(default_mean, chosen)
    out["axis"], out["default_mean"], out["role_mean"] = axis, default_mean, role_mean
    projections = {}
    for p, vs in sets.items():
        vec = chosen.get(p) if p in chosen else vs.vectors.get(
            "mean" if p == "default" else ("pos_3" if "pos_3" in vs.vectors else "pos_all"))
        if vec is not None:
            projections[p] = [round(float(x), 6) for x in project(vec, axis)]
    norms = np.linalg.norm(axis, axis=-1)
    return {"axis": VECTORS_FILE, "axis_shape": list(axis.shape), "axis_of": axis_of,
            "n_roles": len(chosen), "n_default": 1, "roles": sorted(chosen),
            "excluded": excluded, "axis_norms": [round(float(x), 6) for x in norms],
            "projections": projections}


def finish_capture(job_id: str, prefix: str, *, store) -> list[dict]:
    """Manifest entries for the job-level files of a finished capture job (none otherwise).
    A failure here is logged and recorded as an event, never a lost job: the persona
    artifacts are stored and verified already."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.kind != "capture":
            return []
        items = {i.persona: i.artifact_key for i in s.execute(
            select(JobItem).where(JobItem.job_id == job_id)).scalars() if i.artifact_key}
        again = job.state == "succeeded"  # a redelivered message: same files, no new events
        s.expunge(job)

    def event(kind: str, data: dict) -> None:
        if again:
            return
        with session_scope() as s:
            jobs.record_event(s, job_id=job_id, kind=kind, data=data)

    try:
        other = (job.params or {}).get("axis_from")
        axis_from = (other, _load_axis(other, store)) if other else None
        stored = derive_job(job=job, items=items, prefix=prefix, store=store, on_event=event,
                            axis_from=axis_from)
    except Exception as exc:
        log.exception("job %s: job-level vectors failed", job_id)
        event("job_vectors_failed", {"error": f"{exc.__class__.__name__}: {exc}"[:500]})
        return []
    return [{**o, "persona": None, "kind": o["key"].rsplit("/", 1)[-1]} for o in stored]


def _load_axis(job_id: str, store):
    """The ``axis`` tensor an earlier roles job stored."""
    with session_scope() as s:
        prefix = s.get(Job, job_id).artifact_prefix
    return load(store.get_bytes(f"{prefix}/{VECTORS_FILE}"))["axis"]
