"""The worker loop of a pipeline job: claim the next ready (stage, persona), run it, record.

The same lease discipline as a capture job's loop (:func:`workers.tasks.execute_job`): an
item is taken with a guarded UPDATE and an attempt counter, completed only by the holder of
that attempt, failed and re-queued up to ``max_item_attempts``. What differs: which item is
ready depends on the stages it needs (:func:`app.stages.claim`), the engine is acquired only
when an engine stage (generate, capture) is claimed, and a judge outage
(:class:`app.judge.JudgeUnavailable`) re-queues its item without burning the engine.
"""

from __future__ import annotations

import logging

from app.errors import EngineOOM, RetryableError
from app.judge.backend import JudgeRejected
from workers.batching import JobCancelled

log = logging.getLogger(__name__)


def run_pipeline_job(job_id: str, *, worker) -> dict:
    from app import jobs
    from app.artifacts import job_prefix
    from app.db import session_scope
    from app.models import Job
    from app.stages import ENGINE_STAGES
    from app.storage import get_store
    from workers import stages as runners
    from workers.tasks import (
        _cancel_checker,
        _complete,
        _fail,
        _progress_writer,
        db_retry,
        finish,
    )

    settings = worker.settings
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in ("queued", "running"):
            return {"job_id": job_id, "ran": 0, "reason": "not runnable"}
        dataset, model, dtype = job.dataset, job.model, job.dtype
        params = dict(job.params or {})
        prefix = job.artifact_prefix or job_prefix(settings, model=model, dataset=dataset,
                                                   dtype=dtype, job_id=job_id)

    def event(kind_: str, data: dict) -> None:
        with session_scope() as s:
            jobs.record_event(s, job_id=job_id, kind=kind_, data={"worker": worker.name, **data})

    runtime = worker.runtime
    engine = []

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
            item_id, attempt, stage, persona = claimed
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
            except JudgeRejected as exc:  # a wrong key, model or URL: no retry helps
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
                    break  # the judge is down: leave the item queued for a later delivery
                continue
            db_retry(_complete, job_id, item_id, attempt, worker.name, result.artifact_key,
                     result.sha256, what="complete",
                     info={"size": result.size, "extra": result.extra, "stage": stage,
                           **result.info})
            ran += 1
        db_retry(finish, job_id, settings=settings, store=store, what="finish")
    finally:
        if engine:
            figures = runtime.cleanup(on_event=event)
            if figures.get("memory"):
                event("cleanup", figures)
        worker.idle()
    return {"job_id": job_id, "ran": ran}


def _claim(job_id, worker, lease_s):
    from app import jobs
    from app.db import session_scope

    with session_scope() as s:
        item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=lease_s)
        if item is None:
            return None
        return item.id, item.attempt, item.stage, item.persona

