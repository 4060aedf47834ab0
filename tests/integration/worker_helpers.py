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


def submit(kind: str = "capture", params: dict | None = None) -> str:
    from app.db import session_scope

    from app import jobs
    from workers.dispatch import enqueue_job

    with session_scope() as s:
        job = jobs.create_job(s, kind=kind, dataset=DATASET, model=MODEL, dtype=DTYPE,
                              params={**PARAMS, **(params or {})})
        job_id = str(job.id)
    enqueue_job(job_id)
    return job_id


def start_worker(name: str, log_dir: Path, **kw) -> subprocess.Popen:
    from workers.cli import spawn_worker

    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name}.log", "ab")
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
    from app.db import session_scope
    from app.models import Job, JobEvent, JobItem
    from sqlalchemy import select

    with session_scope() as s:
        job = s.get(Job, job_id)
        items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
        events = s.execute(select(JobEvent).where(JobEvent.job_id == job_id)
                           .order_by(JobEvent.id)).scalars().all()
        return {"state": job.state, "failure_kind": getattr(job, "failure_kind", None),
                "items": [{"persona": i.persona, "state": i.state, "key": i.artifact_key,
                           "sha256": i.artifact_sha256, "done": getattr(i, "done", None)}
                          for i in items],
                "events": [{"kind": e.kind, "data": e.data} for e in events]}


def wait_for(job_id: str, states=("succeeded", "failed", "cancelled"), *, timeout=150.0,
             until=None, log_dir: Path | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(job_id)
        if row["state"] in states or (until and until(row)):
            return row
        time.sleep(0.5)
    logs = ""
    if log_dir is not None:
        logs = "\n".join(p.read_text()[-3000:] for p in Path(log_dir).glob("*.log"))
    raise AssertionError(f"job {job_id} still {row['state']} after {timeout}s: {row}\n{logs}")


def check_artifacts(job_id: str) -> dict:
    """Manifest present, every entry's checksum verifies, one artifact per persona."""
    from app.artifacts import read_persona_artifact
    from app.settings import get_settings
    from app.storage import get_store
    from workers.pipeline import job_prefix

    settings = get_settings()
    store = get_store(settings)
    prefix = job_prefix(settings, model=MODEL, dataset=DATASET, dtype=DTYPE, job_id=job_id)
    manifest = store.read_manifest(prefix)
    assert manifest is not None, f"no manifest under {prefix}"
    assert manifest["model"] == MODEL and manifest["versions"]["vllm"]
    for entry in manifest["artifacts"]:
        assert store.verify(entry["key"], entry["sha256"]), entry
    persona_entries = [e for e in manifest["artifacts"] if e["kind"] == "persona"]
    personas = [e["persona"] for e in persona_entries]
    assert len(personas) == len(set(personas))
    stored = [o.key for o in store.list(prefix + "/") if o.key.endswith(".safetensors")]
    assert sorted(stored) == sorted(e["key"] for e in persona_entries)
    arts = {}
    for e in persona_entries:
        art = read_persona_artifact(store.get_bytes(e["key"], expect_sha256=e["sha256"]))
        assert list(art.activations.shape) == e["shapes"]["activations"]
        arts[e["persona"]] = art
    return arts


def reference_vectors(art, *, layers=None) -> dict:
    """Vectors recomputed from the HF backend's exact capture of the same conversations."""
    from workers.engine.hf import HFBackend

    from app.datasets import load_dataset
    from app.prompts import build_prompt
    from app.settings import get_settings
    from app.vectors import derive_vectors
    from workers.engine.spec import CaptureSpec, RequestSpec, Span
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
                            response=response)
        a, b = full.response_span
        fulls.append(full.input_ids)
        specs.append(RequestSpec(key=key, capture=CaptureSpec(
            layers=tuple(layers), prompt=False, response=False, last_prompt=False,
            spans=(Span("response", a, b),))))
    caps = hf.capture(fulls, specs)
    acts = np.stack([c.means["response"].float().numpy() for c in caps])
    return {"activations": acts,
            "vectors": derive_vectors(acts, list(art.keys), kind=ds.kind).vectors}
