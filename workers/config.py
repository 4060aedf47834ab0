"""A worker process's typed configuration: the task name, its Celery node name, and the
``CHATSPACE_WORKER_*`` environment contract between the launcher and the worker.

``chatspace-jobs worker`` (:mod:`workers.cli`) writes this environment for each process it
starts; the process reads it back at start-up (:mod:`workers.lifecycle`). Both sides go
through :class:`WorkerEnv`, so a variable is named once. This module imports nothing of
``workers/`` (nor of ``app/``): everything else may import it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

RUN_JOB = "chatspace.run_job"  # the one task's name; tasks carry a job id only
NODE_PREFIX = "chatspace"
ENV_PREFIX = "CHATSPACE_WORKER_"
WORKER_ENV = ENV_PREFIX + "NAME"  # inherited by the engine processes a worker starts


def nodename(worker_name: str) -> str:
    """The Celery node name of a chatspace worker (what remote control's ``destination``
    matches)."""
    return worker_name if "@" in worker_name else f"{NODE_PREFIX}@{worker_name}"


class WorkerEnv(BaseSettings):
    """The ``CHATSPACE_WORKER_*`` variables. An empty variable means "not set", except
    ``gpu``: unset = pick the first visible GPU, empty = no GPU (the CPU engine)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    name: str | None = None
    gpu: str | None = None
    model: str | None = None
    dtype: str | None = None
    queues: Annotated[list[str], NoDecode] = []
    max_jobs: int | None = None
    exit_when_idle: bool = False

    @field_validator("name", "model", "dtype", "max_jobs", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @field_validator("exit_when_idle", mode="before")
    @classmethod
    def _flag(cls, v):
        return bool(v) if isinstance(v, str | None) and not v else v

    @field_validator("queues", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [q.strip() for q in v.split(",") if q.strip()]
        return v

    def to_env(self) -> dict[str, str]:
        """The variables for a child process (every one written, empty when unset)."""
        return {
            ENV_PREFIX + "NAME": self.name or "",
            ENV_PREFIX + "GPU": "" if self.gpu is None else str(self.gpu),
            ENV_PREFIX + "MODEL": self.model or "",
            ENV_PREFIX + "DTYPE": self.dtype or "",
            ENV_PREFIX + "QUEUES": ",".join(self.queues),
            ENV_PREFIX + "MAX_JOBS": "" if not self.max_jobs else str(int(self.max_jobs)),
            ENV_PREFIX + "EXIT_WHEN_IDLE": "1" if self.exit_when_idle else "",
        }
