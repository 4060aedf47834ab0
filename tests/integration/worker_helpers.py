"""Shared helpers for the worker end-to-end tests: submit, run a real worker, check results."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

MODEL, DTYPE, DATASET = "tiny:qwen3", "float32", "traits_sample"
PARAMS = {"max_samples": 4, "max_tokens": 6, "batch_size": 4, "temperature": 0.0, "seed": 0}


def fast_fault_env(monkeypatch, pg_url: str, redis_url: str, **env: str) -> None:
    """The production adapters with short heartbeats, leases and reaper intervals (a dead
    worker is found within seconds), a small context, and ``env`` (``CHATSPACE_`` + key)
    on top; the database migrated."""
    from app.db import upgrade
    from app.settings import get_settings

    base = {"DATABASE_URL": pg_url, "BROKER_URL": redis_url, "HEARTBEAT_S": "1",
            "LEASE_S": "4", "WORKER_STALE_S": "4", "REAPER_INTERVAL_S": "1",
            "ENGINE_MAX_MODEL_LEN": "512"}
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(f"CHATSPACE_{key}", value)
    get_settings.cache_clear()
    upgrade(pg_url)


def submit(kind: str = "capture", params: dict | None = None) -> str:
    from app import jobs
    from app.db import session_scope
    from workers.dispatch import enqueue_job

    with session_scope() as s:
        job = jobs.create_job(s, kind=kind, dataset=DATASET, model=MODEL, dtype=DTYPE,
                              params={**PARAMS, **(params or {})})
        job_id = str(job.id)
    enqueue_job(job_id)
    return job_id


def submit_pipeline(**params) -> str:
    """A pipeline job through the submit path the API and the CLI use (validation, plan,
    enqueue)."""
    from app.db import session_scope
    from app.settings import get_settings
    from app.spec import JobSpec
    from app.submit import submit_job
    from workers.dispatch import enqueue_job

    spec = JobSpec(dataset=DATASET, model=MODEL, dtype=DTYPE, params={**PARAMS, **params})
    with session_scope() as s:
        job = submit_job(s, request=spec, settings=get_settings(), enqueue=enqueue_job)
        assert job.kind == "pipeline"
        return str(job.id)


def start_worker(name: str, log_dir: Path, **kw) -> subprocess.Popen:
    from workers.cli import spawn_worker

    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as out:  # the child keeps its own copy
        return spawn_worker(name=name, model=MODEL, dtype=DTYPE, stdout=out,
                            stderr=subprocess.STDOUT, **kw)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """End the worker and everything it started (its own session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def job_row(job_id: str) -> dict:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job, JobEvent, JobItem

    with session_scope() as s:
        job = s.get(Job, job_id)
        items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
        events = s.execute(select(JobEvent).where(JobEvent.job_id == job_id)
                           .order_by(JobEvent.id)).scalars().all()
        return {"state": job.state, "failure_kind": job.failure_kind, "error": job.error,
                "manifest_key": job.manifest_key, "items_done": job.items_done,
                "items": [{"id": i.id, "persona": i.persona, "stage": i.stage, "state": i.state,
                           "attempt": i.attempt, "key": i.artifact_key,
                           "sha256": i.artifact_sha256, "samples_done": i.samples_done,
                           "samples_total": i.samples_total, "batch_size": i.batch_size,
                           "failure_kind": i.failure_kind, "error": i.error}
                          for i in sorted(items, key=lambda i: i.position)],
                "events": [{"kind": e.kind, "data": e.data, "item_id": e.item_id,
                            "from": e.from_state, "to": e.to_state, "worker": e.worker}
                           for e in events]}


def wait_for(job_id: str, states=("succeeded", "failed", "cancelled"), *, timeout=150.0,
             until=None, log_dir: Path | None = None,
             worker: subprocess.Popen | None = None, interval: float = 0.5) -> dict:
    """Poll the job until it reaches ``states`` (or ``until(row)``); fail at once, with the
    worker logs, when ``worker`` exited or after ``timeout``."""
    deadline = time.monotonic() + timeout
    why = f"after {timeout}s"
    while time.monotonic() < deadline:
        row = job_row(job_id)
        if row["state"] in states or (until and until(row)):
            return row
        if worker is not None and worker.poll() is not None:
            why = f"and its worker exited with {worker.returncode}"
            break
        time.sleep(interval)
    logs = ""
    if log_dir is not None:
        logs = "\n".join(p.read_text()[-3000:] for p in Path(log_dir).glob("*.log"))
    raise AssertionError(f"job {job_id} still {row['state']} {why}: {row}\n{logs}")


def check_artifacts(job_id: str, row: dict | None = None) -> dict:
    """Manifest present and last, every entry's checksum verifies against the store and the
    item rows, one artifact per persona with the shapes the manifest states."""
    from app.artifacts import job_prefix, read_persona_artifact
    from app.settings import get_settings
    from app.storage import get_store

    settings = get_settings()
    store = get_store(settings)
    row = row or job_row(job_id)
    prefix = job_prefix(settings, model=MODEL, dataset=DATASET, dtype=DTYPE, job_id=job_id)
    manifest = store.read_manifest(prefix)
    assert manifest is not None, f"no manifest under {prefix}"
    assert row["manifest_key"] == f"{prefix}/manifest.json"
    assert manifest["model"] == MODEL and manifest["job_id"] == job_id
    assert manifest["versions"]["vllm"] and manifest["versions"]["torch"]
    for entry in manifest["artifacts"]:
        assert store.verify(entry["key"], entry["sha256"]), entry
    persona_entries = [e for e in manifest["artifacts"] if e["kind"] == "persona"]
    personas = [e["persona"] for e in persona_entries]
    assert sorted(personas) == sorted(i["persona"] for i in row["items"])
    by_item = {i["persona"]: (i["key"], i["sha256"]) for i in row["items"]}
    assert {e["persona"]: (e["key"], e["sha256"]) for e in persona_entries} == by_item
    stored = [o.key for o in store.list(prefix + "/") if o.key.endswith(".safetensors")
              and not o.key.endswith((".vectors.safetensors", "/job_vectors.safetensors"))]
    assert sorted(stored) == sorted(e["key"] for e in persona_entries)
    arts = {}
    for e in persona_entries:
        art = read_persona_artifact(store.get_bytes(e["key"], expect_sha256=e["sha256"]))
        n, n_layers, hidden = art.activations.shape
        assert list(art.activations.shape) == e["shapes"]["activations"]
        assert n == len(art.keys) == e["n_samples"] and n_layers == len(e["layers"])
        for name, vec in art.vectors.items():
            assert vec.shape == (n_layers, hidden) == tuple(e["shapes"][f"vectors.{name}"])
        arts[e["persona"]] = art
    return arts


def reference_vectors(art, *, layers=None) -> dict:
    """Vectors recomputed from the HF backend's exact capture of the same conversations."""
    from app.datasets import load_dataset
    from app.prompts import build_prompt
    from app.settings import get_settings
    from app.vectors import derive_vectors
    from workers.engine.hf import HFBackend
    from workers.engine.spec import CaptureSpec, RequestSpec, Span
    from workers.pipeline import template_kwargs
    from workers.runtime import resolve_model

    settings = get_settings()
    ds = load_dataset(DATASET, settings=settings)
    samples = {s.key: s for s in ds.samples(art.metadata["persona"],
                                             max_samples=PARAMS["max_samples"])}
    hf = HFBackend(resolve_model(MODEL, settings), dtype=DTYPE)
    layers = [int(x) for x in art.metadata["layers"]]
    fulls, specs = [], []
    for key, response in zip(art.keys, art.metadata["responses"]):
        s = samples[key]
        full = build_prompt(hf.tokenizer, system=s.system_prompt or None, question=s.question,
                            response=response, template_kwargs=template_kwargs(hf.tokenizer))
        a, b = full.response_span
        fulls.append(full.input_ids)
        specs.append(RequestSpec(key=key, capture=CaptureSpec(
            layers=tuple(layers), prompt=False, response=False, last_prompt=False,
            spans=(Span("resp", a, b),))))
    caps = hf.capture(fulls, specs)
    acts = np.stack([c.means["resp"].float().numpy() for c in caps])
    return {"activations": acts,
            "vectors": derive_vectors(acts, list(art.keys), kind=ds.kind,
                                      persona=art.metadata["persona"]).vectors}
