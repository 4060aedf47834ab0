"""The job loop: claim a job's items and run them until none is left. No Celery here.

A task carries only a job id. It may be delivered twice (a Redis re-delivery, a reconciler
re-enqueue, two workers on one queue): every item is taken with a Postgres lease
(``claim_item``: SKIP LOCKED, attempt counter) and completed only by the holder of that
attempt, so a duplicate task finds nothing to claim, or claims other personas of the same
job in parallel, and never runs an item twice.

A persona's engine part runs here; its store step (vectors, serialisation, upload) runs in a
background thread while the next persona is claimed and streamed (:class:`_Stores`), and the
item completes when its artifact's checksum is back.

Errors map to states here: OOM after the last halving → ``failed(oom)``; cancel → the item
is released and the job ends ``cancelled``; anything else → the item is failed and retried
up to ``max_item_attempts``, then the job is ``failed(error)``. After every job, and every
failure, the engine runtime cleans up and checks GPU memory against its baseline.

:func:`execute_job` takes the worker as an argument (its name, settings, engine runtime and
busy/idle marks: :class:`Worker`), so it runs under the Celery task, or in a test with a fake
engine on SQLite.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from app import jobs
from app.artifacts import read_persona_artifact, recorded_prefix
from app.db import session_scope
from app.errors import EngineOOM, InvalidTransition, RetryableError, SpecInvalid
from app.models import Artifact, Job, JobItem
from app.storage import get_store
from workers import loadfail, pipeline
from workers.batching import JobCancelled
from workers.manifest import finish
from workers.params import JobParams

log = logging.getLogger(__name__)

DB_RETRY_S = 180.0  # how long a worker rides out a database outage before giving up


class Worker(Protocol):
    """What the job loop needs of the worker process that runs it."""

    name: str
    settings: object
    runtime: object  # workers.runtime.EngineRuntime: acquire / cleanup / gpu

    def busy(self, job_id: str) -> None: ...

    def idle(self) -> None: ...


def db_retry(fn, *args, what: str, **kw):
    """Call ``fn``, retrying with backoff while the database is unreachable (a Postgres
    restart): a finished persona's result must not be dropped because the database blinked."""
    deadline = time.monotonic() + DB_RETRY_S
    delay = 0.5
    while True:
        try:
            return fn(*args, **kw)
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("database unavailable during %s (%s); retrying in %.1fs", what,
                        type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def execute_job(job_id: str, *, worker: Worker) -> dict:
    """Claim and run this job's items until none is left; finish the job if it is done."""
    settings = worker.settings
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s: not found; dropping the message", job_id)
            return {"job_id": job_id, "ran": 0, "reason": "not found"}
        if job.state not in ("queued", "running"):
            return {"job_id": job_id, "ran": 0, "reason": f"job is {job.state}"}
        kind, dataset, model, dtype = job.kind, job.dataset, job.model, job.dtype
        params = JobParams.from_dict(job.params)
        prefix = recorded_prefix(job, settings)
    if kind == "pipeline":  # one item per (stage, persona)
        return execute_pipeline(job_id, worker=worker, params=dict(job.params or {}),
                                prefix=prefix)

    def event(kind_: str, data: dict) -> None:
        with session_scope() as s:
            jobs.record_event(s, job_id=job_id, kind=kind_, data={"worker": worker.name, **data})

    runtime = worker.runtime
    try:
        engine = loadfail.load(lambda: runtime.acquire(model, dtype, on_event=event))
    except loadfail.LoadFailed as exc:  # the job says why it is not running
        log.exception("job %s: worker %s could not load %s (%s)", job_id, worker.name, model,
                      dtype)
        loadfail.record([job_id], worker=worker.name, exc=exc)
        return {"job_id": job_id, "ran": 0, "reason": "the model could not be loaded"}
    store = get_store(settings)
    stores = _Stores(job_id, worker)
    try:
        while True:
            claimed = db_retry(_claim, job_id, worker.name, settings.lease_s, what="claim")
            if claimed is None:
                if stores.wait():  # a store that failed re-queued its item: claim it again
                    continue
                break
            item_id, attempt, persona, done_key, done_sha, _ = claimed
            if done_key and done_sha and store.verify(done_key, done_sha):
                db_retry(_complete, job_id, item_id, attempt, worker.name, done_key, done_sha,
                         info=None, what="complete")
                event("item_skipped", {"persona": persona, "artifact_key": done_key})
                continue
            ctx = pipeline.ItemContext(
                job_id=job_id, kind=kind, dataset=dataset, persona=persona, model=model,
                dtype=dtype, params=params, engine=engine, store=store, settings=settings,
                artifact_prefix=prefix, gpu_index=runtime.gpu, on_event=event,
                on_progress=_progress_writer(item_id, attempt),
                should_cancel=_cancel_checker(job_id),
                load_vector=lambda j, p, k, layer: load_vector(store, j, p, k, layer))
            worker.busy(job_id)
            try:
                store_step = pipeline.compute_item(ctx)
            except JobCancelled:
                with session_scope() as s:
                    jobs.release_item(s, item_id=item_id, attempt=attempt, worker=worker.name)
                break
            except EngineOOM as exc:
                _fail(job_id, item_id, attempt, worker.name, "oom", exc, requeue=False,
                      batch_size=exc.batch_size, memory=exc.memory)
                _fail_rest(job_id, worker.name, persona, exc)
                runtime.cleanup(on_event=event)
                break
            except Exception as exc:
                log.exception("job %s persona %s failed", job_id, persona)
                db_retry(_fail, job_id, item_id, attempt, worker.name, "error", exc,
                         requeue=attempt < settings.max_item_attempts, what="fail")
                runtime.cleanup(on_event=event)
                continue
            stores.submit(item_id, attempt, persona, store_step)
        db_retry(finish, job_id, settings=settings, store=store, what="finish")
    finally:
        stores.close()  # a persona being stored when the loop ended on an error completes
        figures = runtime.cleanup(on_event=event)
        if figures.get("memory"):
            event("cleanup", figures)
        worker.idle()
    return {"job_id": job_id, "ran": stores.ran}


class _Stores:
    """Each finished persona's store step (vectors, serialisation, upload: no engine) runs in
    one background thread while the next persona streams through the engine. One at a time:
    a new one waits for the last, so at most one persona's results wait in memory. The item
    is completed only after its store step returned the artifact's checksum; a store that
    fails fails its item (retried like any error). A crash before that re-runs the persona
    into the same key: work is never lost, and no item is done without its artifact."""

    def __init__(self, job_id: str, worker: Worker):
        self.job_id, self.worker = job_id, worker
        self.ran = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._last: Future | None = None

    def submit(self, item_id, attempt, persona: str, step) -> None:
        self.wait()
        self._last = self._pool.submit(self._run, item_id, attempt, persona, step)

    def wait(self) -> bool:
        """Wait for the store step in flight; True when there was one."""
        last, self._last = self._last, None
        if last is not None:
            last.result()  # re-raises only what db_retry gave up on
        return last is not None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _run(self, item_id, attempt, persona: str, step) -> None:
        settings, name = self.worker.settings, self.worker.name
        try:
            result = step()
        except Exception as exc:
            log.exception("job %s persona %s: storing its artifact failed", self.job_id, persona)
            db_retry(_fail, self.job_id, item_id, attempt, name, "error", exc,
                     requeue=attempt < settings.max_item_attempts, what="fail")
            return
        db_retry(_complete, self.job_id, item_id, attempt, name, result.artifact_key,
                 result.sha256, what="complete",
                 info={"size": result.size, "extra": result.extra, **result.info})
        self.ran += 1


def execute_pipeline(job_id: str, *, worker: Worker, params: dict, prefix: str) -> dict:
    """A pipeline job's loop: the same leases, fencing and retries as above; what differs is
    which item is ready (:func:`app.stages.claim`: the stages it needs have succeeded), the
    engine is acquired only when an engine stage is claimed, and a judge outage re-queues
    its item for a later delivery instead of spinning."""
    from app.judge.backend import JudgeRejected
    from app.stages import ENGINE_STAGES
    from workers import stages as runners

    settings = worker.settings
    with session_scope() as s:
        job = s.get(Job, job_id)
        dataset, model, dtype = job.dataset, job.model, job.dtype

    def event(kind_: str, data: dict) -> None:
        with session_scope() as s:
            jobs.record_event(s, job_id=job_id, kind=kind_, data={"worker": worker.name, **data})

    runtime = worker.runtime
    engine: list = []

    def get_engine():
        if not engine:
            engine.append(runtime.acquire(model, dtype, on_event=event))
        return engine[0]

    store = get_store(settings)
    ran = 0
    try:
        while True:
            claimed = db_retry(_claim, job_id, worker.name, settings.lease_s, what="claim")
            if claimed is None:
                break
            item_id, attempt, persona, _, _, stage = claimed
            ctx = runners.StageContext(
                job_id=job_id, stage=stage, persona=persona, dataset=dataset, model=model,
                dtype=dtype, params=params, store=store, settings=settings, prefix=prefix,
                engine=get_engine, gpu_index=runtime.gpu, on_event=event,
                on_progress=_progress_writer(item_id, attempt),
                should_cancel=_cancel_checker(job_id))
            worker.busy(job_id)
            try:
                result = runners.run_stage(ctx)
            except JobCancelled:
                with session_scope() as s:
                    jobs.release_item(s, item_id=item_id, attempt=attempt, worker=worker.name)
                break
            except EngineOOM as exc:
                _fail(job_id, item_id, attempt, worker.name, "oom", exc, requeue=False,
                      batch_size=exc.batch_size, memory=exc.memory)
                runtime.cleanup(on_event=event)
                continue
            except (JudgeRejected, SpecInvalid) as exc:  # no retry fixes these
                db_retry(_fail, job_id, item_id, attempt, worker.name, "error", exc,
                         requeue=False, what="fail")
                continue
            except Exception as exc:
                log.exception("job %s %s/%s failed", job_id, stage, persona)
                requeue = attempt < settings.max_item_attempts
                db_retry(_fail, job_id, item_id, attempt, worker.name, "error", exc,
                         requeue=requeue, what="fail")
                if stage in ENGINE_STAGES:
                    runtime.cleanup(on_event=event)
                if isinstance(exc, RetryableError) and requeue:
                    break  # the judge is down: the item waits queued for a later delivery
                continue
            db_retry(_complete, job_id, item_id, attempt, worker.name, result.artifact_key,
                     result.sha256, what="complete",
                     info={"size": result.size, "extra": result.extra, "stage": stage,
                           **result.info})
            ran += 1
        with session_scope() as s:
            rows = s.execute(select(JobItem.stage, JobItem.persona, JobItem.state).where(
                JobItem.job_id == job_id)).all()
        if rows and all(r.state == "succeeded" for r in rows):
            runners.write_judge_summary(store, prefix,
                                        {r.persona for r in rows if r.stage == "judge"})
        db_retry(finish, job_id, settings=settings, store=store, what="finish")
    finally:
        if engine:
            figures = runtime.cleanup(on_event=event)
            if figures.get("memory"):
                event("cleanup", figures)
        worker.idle()
    return {"job_id": job_id, "ran": ran}


def _claim(job_id, worker, lease_s):
    with session_scope() as s:
        item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=lease_s)
        if item is None:
            return None
        return (item.id, item.attempt, item.persona, item.artifact_key, item.artifact_sha256,
                item.stage)


def _complete(job_id, item_id, attempt, worker, key, sha, *, info) -> None:
    try:
        with session_scope() as s:
            jobs.complete_item(s, item_id=item_id, attempt=attempt, worker=worker,
                               artifact_key=key, artifact_sha256=sha)
            if info is not None:
                jobs.record_artifact(s, job_id=job_id, item_id=item_id, key=key, sha256=sha,
                                     size=info.get("size"), meta=info)
    except InvalidTransition:
        # Our lease was taken over (we were presumed dead): the new holder writes the same key.
        log.warning("job %s item %s attempt %s: lost the lease; result dropped", job_id,
                    item_id, attempt)


def _fail(job_id, item_id, attempt, worker, kind, exc, *, requeue, **figures) -> None:
    try:
        with session_scope() as s:
            jobs.fail_item(s, item_id=item_id, attempt=attempt, worker=worker, failure_kind=kind,
                           error=str(exc)[:2000], requeue=requeue, **figures)
    except InvalidTransition:
        log.warning("job %s item %s: lost the lease before recording failure", job_id, item_id)


def _fail_rest(job_id, worker, persona, exc) -> None:
    """After a persona ran out of memory even at the smallest batch, its job fails now: the
    personas not yet run are failed (kind ``oom``, naming the persona and the sizes) rather
    than each spending the same halvings on a GPU that just proved too small. A retry of the
    job queues them again and keeps every persona already done."""
    reason = f"not run: persona {persona!r} ran out of memory ({str(exc)[:500]})"
    with session_scope() as s:
        ids = s.execute(select(JobItem.id).where(JobItem.job_id == job_id,
                                                 JobItem.state == "queued")
                        .order_by(JobItem.position)).scalars().all()
        for item_id in ids:
            try:
                jobs.transition_item(s, item_id=item_id, to="failed", allowed_from=["queued"],
                                     worker=worker, failure_kind="oom", error=reason)
            except InvalidTransition:
                continue  # claimed by another worker a moment ago; it finishes on its own


def _progress_writer(item_id, attempt):
    """Progress rows at most every 0.5 s (and always at the end of the persona)."""
    last = [0.0]

    def write(done: int, total: int) -> None:
        now = time.monotonic()
        if done not in (0, total) and now - last[0] < 0.5:
            return
        last[0] = now
        try:
            with session_scope() as s:
                jobs.progress(s, item_id=item_id, done=done, total=total)
        except Exception:
            log.warning("progress of item %s not written", item_id, exc_info=True)

    return write


CANCEL_CHECK_S = 0.5  # a cancel is read from the database at most this often


def _cancel_checker(job_id):
    """The pipeline asks between engine steps and per finished sample: the answer is read
    from the database at most every ``CANCEL_CHECK_S`` (and stays True once seen)."""
    last = {"at": float("-inf"), "value": False}

    def cancelled() -> bool:
        def read():
            with session_scope() as s:
                job = s.get(Job, job_id)
                return job is None or job.state == "cancelled" or bool(
                    getattr(job, "cancel_requested", False))

        now = time.monotonic()
        if not last["value"] and now - last["at"] >= CANCEL_CHECK_S:
            last["value"] = db_retry(read, what="cancel check")
            last["at"] = now
        return last["value"]

    return cancelled


def load_vector(store, job_id: str, persona: str, vector_key: str, layer: int) -> list[float]:
    """One layer of a derived vector from an earlier capture job's persona artifact."""
    with session_scope() as s:
        row = s.execute(select(Artifact).where(Artifact.job_id == job_id,
                                               Artifact.key.like(f"%/{persona}.safetensors"))
                        ).scalars().first()
        if row is None:
            raise SpecInvalid(f"job {job_id} has no artifact for persona {persona!r}",
                              field="params.steer.from")
        key, sha = row.key, row.sha256
    art = read_persona_artifact(store.get_bytes(key, expect_sha256=sha))
    vectors = art.vectors
    if vector_key not in vectors:
        raise SpecInvalid(f"artifact {key} has no vector {vector_key!r}",
                          field="params.steer.from.vector", hint=f"one of {sorted(vectors)}")
    layers = [int(x) for x in art.metadata["layers"]]
    if layer not in layers:
        raise SpecInvalid(f"artifact {key} has no layer {layer}",
                          field="params.steer.from.layer", hint=f"captured layers: {layers}")
    return [float(x) for x in vectors[vector_key][layers.index(layer)]]
