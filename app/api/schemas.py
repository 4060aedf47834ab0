"""Request and response bodies of the status API (also what the CLI prints with ``--json``).

The request model is the job spec (:mod:`app.spec`): it checks only *types* (and refuses
unknown fields, so a typo like ``max_sample`` is an error naming the field rather than a
silently ignored option); every rule about values lives in :mod:`app.submit`, so the HTTP API and the CLI's in-process mode refuse the same
inputs with the same messages. Response models are lenient (optional fields): they describe
rows written by other components and must never turn a missing column into a 500.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.spec import JobParams, JobSpec

# The request side is the one job spec (app/spec.py); the names the API has always used:
JobParamsIn = JobParams
JobSubmit = JobSpec


class ErrorOut(BaseModel):
    error: str
    message: str
    field: str | None = None
    hint: str | None = None


class PersonaProgress(BaseModel):
    persona: str
    stage: str | None = None  # a pipeline job's item is one (stage, persona)
    state: str | None = None
    done: int | None = None
    total: int | None = None
    attempt: int | None = None
    worker: str | None = None
    artifact_key: str | None = None
    error: str | None = None


class StageProgress(BaseModel):
    items: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    samples_done: int = 0
    samples_total: int = 0


class Progress(BaseModel):
    items_done: int = 0
    items_total: int = 0
    samples_done: int = 0
    samples_total: int = 0
    ooms: int = 0
    personas: list[PersonaProgress] = Field(default_factory=list)
    stages: dict[str, StageProgress] = Field(
        default_factory=dict, description="per stage of a pipeline job, in chain order")


class JobOut(BaseModel):
    id: str
    kind: str
    dataset: str
    model: str
    dtype: str
    state: str
    failure_kind: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifact_prefix: str | None = None
    last_error: str | None = None
    worker: str | None = None
    progress: Progress | None = None


class JobList(BaseModel):
    jobs: list[JobOut]


class EventOut(BaseModel):
    id: int | str | None = None
    job_id: str | None = None
    kind: str
    created_at: datetime | None = None
    data: Any = None


class EventList(BaseModel):
    events: list[EventOut]


class WorkerOut(BaseModel):
    name: str
    state: str | None = None
    host: str | None = None
    gpu: str | None = None
    model: str | None = None
    dtype: str | None = None
    queues: list[str] = Field(default_factory=list)
    memory: dict[str, Any] | None = None
    model_info: dict[str, Any] | None = None
    current_job_id: str | None = None
    last_heartbeat: datetime | None = None
    heartbeat_age_s: float | None = None
    alive: bool = False


class WorkerList(BaseModel):
    workers: list[WorkerOut]


class ControlOut(BaseModel):
    worker: str
    command: str
    replies: list[dict[str, Any]]


class ArtifactOut(BaseModel):
    key: str
    size: int
    sha256: str | None = None
    last_modified: datetime | None = None
    meta: dict[str, str] = Field(default_factory=dict)


class ArtifactList(BaseModel):
    prefix: str
    artifacts: list[ArtifactOut]


class ArtifactUrl(BaseModel):
    key: str
    url: str
    expires_s: int


class UploadOut(BaseModel):
    responses: str = Field(description="what a job's params.responses names: uploads/<id>")
    persona: str
    key: str
    sha256: str
    size: int
    samples: int


class DatasetOut(BaseModel):
    name: str
    kind: str
    personas: int
    samples: int
    root: str
    problems: int = 0
    questions: int = 0
    has_default: bool = False
    error: str | None = None


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
