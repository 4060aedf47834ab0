"""The job loop without Celery: a fake engine, the embedded SQLite database and the local
store. Items are claimed, run and completed; the job finishes with its manifest; artifacts go
under the prefix recorded on the job (not one recomputed from the worker's settings)."""

from __future__ import annotations

from app import jobs
from app.db import session_scope, upgrade
from app.models import Job, JobItem
from app.settings import get_settings
from app.storage import get_store
from tests.unit.test_pipeline_capture import FakeEngine
from workers.jobloop import execute_job


class FakeRuntime:
    gpu = None

    def __init__(self, engine):
        self.engine = engine

    def acquire(self, model, dtype, *, on_event=None):
        return self.engine

    def cleanup(self, *, on_event=None) -> dict:
        return {}


class FakeWorker:
    name = "loop-test"

    def __init__(self, settings, engine):
        self.settings, self.runtime = settings, FakeRuntime(engine)
        self.marks: list[str] = []

    def busy(self, job_id: str) -> None:
        self.marks.append("busy")

    def idle(self) -> None:
        self.marks.append("idle")


def test_job_loop_runs_every_item_under_the_recorded_prefix():
    settings = get_settings()
    upgrade()
    prefix = "recorded/elsewhere/job"
    with session_scope() as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                              dtype="float32", params={"max_samples": 2, "batch_size": 2,
                                                       "max_tokens": 4, "layers": [0, 2]},
                              personas=["curious", "optimistic"], artifact_prefix=prefix)
        job_id = str(job.id)
    worker = FakeWorker(settings, FakeEngine())
    assert execute_job(job_id, worker=worker) == {"job_id": job_id, "ran": 2}
    with session_scope() as s:
        job = s.get(Job, job_id)
        items = s.query(JobItem).filter(JobItem.job_id == job_id).all()
        assert job.state == "succeeded" and job.manifest_key.startswith(prefix + "/")
        assert sorted(i.artifact_key for i in items) == [
            f"{prefix}/curious.safetensors", f"{prefix}/optimistic.safetensors"]
    store = get_store(settings)
    assert {o.key for o in store.list(prefix)} >= {f"{prefix}/curious.safetensors",
                                                    job.manifest_key}
    assert worker.marks[-1] == "idle"
    # a second delivery of the same task finds nothing to run
    assert execute_job(job_id, worker=worker)["ran"] == 0
