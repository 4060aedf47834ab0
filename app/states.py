"""The job state machine: states, failure kinds and the transitions allowed between them.

Jobs and items share one set of states. Every change of state goes through one guarded
``UPDATE ... WHERE state IN (allowed sources)`` in :mod:`app.jobs`; the tables here are the
only place that says which moves exist, so the service layer, the tests and the API agree.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ItemState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FailureKind(StrEnum):
    """Why something failed: the job's own fault (``error``, ``oom``), the worker died
    (``lost``), or the artifact store refused it (``storage``)."""

    OOM = "oom"
    ERROR = "error"
    LOST = "lost"
    STORAGE = "storage"


class JobKind(StrEnum):
    CAPTURE = "capture"
    ROLLOUT = "rollout"
    PIPELINE = "pipeline"  # the research chain: generate -> capture -> judge -> vectors -> axis


class Stage(StrEnum):
    """What an item computes. A capture or rollout job has one item per persona whose stage
    is the job's kind; a pipeline job has one item per (stage, persona), plus one per job for
    the stages over the whole dataset (see :mod:`app.stages`)."""

    CAPTURE = "capture"
    ROLLOUT = "rollout"
    GENERATE = "generate"
    JUDGE = "judge"
    MINILM = "minilm"
    VECTORS = "vectors"
    AXIS = "axis"


class WorkerState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"  # an engine is being (re)loaded
    IDLE = "idle"
    BUSY = "busy"
    CLEANING = "cleaning"
    STOPPED = "stopped"


def _table(S) -> dict:
    return {
        # failed from queued: a job can be refused before it ever runs (e.g. bad spec found
        # by the dispatcher); items fail without running only through that job-level path.
        S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
        # queued from running: requeue (worker lost, released at shutdown)
        S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
        S.FAILED: frozenset({S.QUEUED}),  # retry
        S.CANCELLED: frozenset({S.QUEUED}),  # retry
        S.SUCCEEDED: frozenset(),  # final: an artifact exists and is referenced
    }


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = _table(JobState)
ITEM_TRANSITIONS: dict[ItemState, frozenset[ItemState]] = _table(ItemState)

JOB_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
JOB_ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING})
ITEM_TERMINAL = frozenset({ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED})
ITEM_ACTIVE = frozenset({ItemState.QUEUED, ItemState.RUNNING})
TERMINAL = frozenset(s.value for s in JOB_TERMINAL)  # plain strings, for SQL filters
ACTIVE = frozenset(s.value for s in JOB_ACTIVE)


def sources(table: dict, to) -> frozenset:
    """Every state from which ``to`` may be reached according to ``table``."""
    return frozenset(src for src, targets in table.items() if to in targets)


def allowed(table: dict, frm, to) -> bool:
    return to in table.get(frm, frozenset())
