"""The job loop: claim a job's items and run them until none is left. No Celery here.

A task carries only a job id. It may be delivered twice (a Redis re-delivery, a reconciler
re-enqueue, two workers on one queue): every item is taken with a Postgres lease
(``claim_item``: SKIP LOCKED, attempt counter) and completed only by the holder of that
attempt, so a duplicate task finds nothing to claim, or claims other personas of the same
job in parallel, and never runs an item twice.

One loop (:func:`_run`) serves both kinds of job; what differs is a small steps object:
:class:`ItemSteps` (capture, rollout: one item per persona, all on the engine) and
:class:`PipelineSteps` (one item per (stage, persona), the engine only for generate and
capture). A capture or rollout persona's store step (vectors, serialisation, upload) runs in a
background thread while the next persona is claimed and streamed (:class:`_Stores`), and the
item completes when its artifact's checksum is back. On the vLLM engine the personas' streams
also span each other: the next persona is claimed the moment the current one's samples are all
in the engine, and its samples join the same vLLM run (:class:`workers.engine.lanes.
SharedStream`), so the batch never drains at a persona's tail; at most two are in flight. A
pipeline's generate items span the same way (``lane_stages``).
Errors map to states in the loop: OOM after the last halving → ``failed(oom)``;
cancel → the item is released and the job ends ``cancelled``; a failed engine load → a
``load_failed`` event on the job (:mod:`workers.loadfail`); anything else → the item is
failed and retried up to ``max_item_attempts``, then the job is ``failed(error)``. After
every job, and every failure, the engine runtime cleans up and checks GPU memory against
its baseline.

:func:`execute_job` takes the worker as an argument (its name, settings, engine runtime and
busy/idle marks: :class:`Worker`), so it runs under the Celery task, or in a test with a fake
engine on SQLite.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from app import jobs
from app.artifacts import read_persona_artifact, recorded_prefix
from app.db import session_scope
from app.errors import EngineOOM, InvalidTransition, RetryableError, SpecInvalid
from app.judge.backend import JudgeRejected
from app.models import Artifact, Job, JobItem
from app.stages import ENGINE_STAGES
from app.storage import get_store
from workers import loadfail, pipeline, testprobe
from workers import stages as runners
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


@dataclass(frozen=True)
class JobHead:
    """The job's columns a loop needs, read once."""

    id: str
    kind: str
    dataset: str
    model: str
    dtype: str
    params: dict
    prefix: str


@dataclass(frozen=True)
class Claimed:
    """An item this worker holds: fenced by ``attempt``."""

    id: int
    attempt: int
    persona: str
    stage: str
    done_key: str | None
    done_sha: str | None


class Steps(Protocol):
    """What differs between the kinds of job; :func:`_run` is the loop they share."""

    oom_fails_rest: bool  # an OOM at the smallest batch fails the personas not yet run
    # when spanning: the stages whose items join the shared run (None: every item); an item of
    # another stage that needs the engine runs only once the shared run is closed
    lane_stages: frozenset[str] | None

    def engine_now(self) -> bool:
        """Load the engine before claiming anything (a failed load then touches no item)."""

    def needs_engine(self, item: Claimed) -> bool: ...

    def spans(self) -> bool:
        """Whether the next item may stream into the engine while this one's last samples are
        still in it (:func:`_run`): only items whose engine use is one stream (of the
        ``lane_stages``)."""

    def run(self, item: Claimed, *, engine, store, worker: Worker, event, progress,
            cancelled) -> tuple[object, dict]:
        """(result with artifact_key, sha256, size, extra, info; more info to record)."""

    def before_finish(self, store) -> None: ...


def execute_job(job_id: str, *, worker: Worker) -> dict:
    """Claim and run this job's items until none is left; finish the job if it is done."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s: not found; dropping the message", job_id)
            return {"job_id": job_id, "ran": 0, "reason": "not found"}
        if job.state not in ("queued", "running"):
            return {"job_id": job_id, "ran": 0, "reason": f"job is {job.state}"}
        head = JobHead(id=job_id, kind=job.kind, dataset=job.dataset, model=job.model,
                       dtype=job.dtype, params=dict(job.params or {}),
                       prefix=recorded_prefix(job, worker.settings))
    steps = PipelineSteps(head) if head.kind == "pipeline" else ItemSteps(head)
    return _run(head, worker=worker, steps=steps)


class ItemSteps:
    """A capture or rollout job: one item per persona, every item on the engine; after an
    OOM at the smallest batch the personas not yet run fail too (:func:`_fail_rest`)."""

    oom_fails_rest = True
    lane_stages = None

    def __init__(self, head: JobHead):
        self.head = head
        self.params = JobParams.from_dict(head.params)

    def engine_now(self) -> bool:
        return True

    def needs_engine(self, item: Claimed) -> bool:
        return True

    def spans(self) -> bool:
        """Capture, and rollout without a sweep: a persona's engine use is one stream (a
        sweep calls ``generate``, which a shared run would refuse)."""
        return self.head.kind == "capture" or (self.head.kind == "rollout"
                                               and not self.params.sweep)

    def run(self, item: Claimed, *, engine, store, worker, event, progress, cancelled):
        h = self.head
        ctx = pipeline.ItemContext(
            job_id=h.id, kind=h.kind, dataset=h.dataset, persona=item.persona, model=h.model,
            dtype=h.dtype, params=self.params, engine=engine(), store=store,
            settings=worker.settings, artifact_prefix=h.prefix, gpu_index=worker.runtime.gpu,
            on_event=event, on_progress=progress, should_cancel=cancelled,
            load_vector=lambda j, p, k, layer: load_vector(store, j, p, k, layer))
        return pipeline.compute_item(ctx), {}  # its store step runs in the background

    def before_finish(self, store) -> None:
        pass


class PipelineSteps:
    """A pipeline job: one item per (stage, persona); which item is ready is
    :func:`app.stages.claim`'s business (the stages it needs have succeeded). The engine is
    loaded when an engine stage still has work (generate, capture); judge, vectors and axis
    items run without it. After an OOM the other items go on (what needs the failed item is
    failed by :func:`app.stages.fail_blocked`)."""

    oom_fails_rest = False
    # generate: one stream per persona (workers.pipeline.generate_and_capture); capture calls
    # the engine's capture in batches, which a shared run would refuse
    lane_stages = frozenset({"generate"})

    def __init__(self, head: JobHead):
        self.head = head
        self.probe = testprobe.from_env()  # None outside the resume tests

    def engine_now(self) -> bool:
        """Whether an engine stage has work left (queued or running anywhere): then the
        engine is loaded before anything is claimed, as for a single-stage job."""
        with session_scope() as s:
            return s.execute(select(JobItem.id).where(
                JobItem.job_id == self.head.id,
                JobItem.stage.in_([st.value for st in ENGINE_STAGES]),
                JobItem.state.in_(("queued", "running"))).limit(1)).first() is not None

    def needs_engine(self, item: Claimed) -> bool:
        return item.stage in ENGINE_STAGES

    def spans(self) -> bool:
        """Generate items span each other (claimed in chain order, every persona's generate
        comes before any capture); the other stages run one at a time."""
        return True

    def run(self, item: Claimed, *, engine, store, worker, event, progress, cancelled):
        h = self.head
        if self.probe is not None:
            engine = self.probe.watch(item.stage, item.persona, engine)
        ctx = runners.StageContext(
            job_id=h.id, stage=item.stage, persona=item.persona, dataset=h.dataset,
            model=h.model, dtype=h.dtype, params=h.params, store=store,
            settings=worker.settings, prefix=h.prefix, engine=engine,
            gpu_index=worker.runtime.gpu, on_event=event, on_progress=progress,
            should_cancel=cancelled)
        return runners.run_stage(ctx), {"stage": item.stage}

    def before_finish(self, store) -> None:
        """Every item done: the judge summary over every judged persona."""
        with session_scope() as s:
            rows = s.execute(select(JobItem.stage, JobItem.persona, JobItem.state).where(
                JobItem.job_id == self.head.id)).all()
        if rows and all(r.state == "succeeded" for r in rows):
            runners.write_judge_summary(store, self.head.prefix,
                                        {r.persona for r in rows if r.stage == "judge"})


class _Engine:
    """The job's engine, loaded on first need; a failed load is recorded on the job
    (:mod:`workers.loadfail`: a ``load_failed`` event, the job's last error, the job failed
    after ``max_load_failures``) whichever kind of job asked for it."""

    def __init__(self, head: JobHead, worker: Worker, event):
        self.head, self.worker, self.event = head, worker, event
        self.engine = None

    def load(self) -> bool:
        if self.engine is not None:
            return True
        h, runtime = self.head, self.worker.runtime
        try:
            self.engine = loadfail.load(lambda: runtime.acquire(h.model, h.dtype,
                                                                 on_event=self.event))
        except loadfail.LoadFailed as exc:  # the job says why it is not running
            log.exception("job %s: worker %s could not load %s (%s)", h.id, self.worker.name,
                          h.model, h.dtype)
            loadfail.record([h.id], worker=self.worker.name, exc=exc)
            return False
        return True

    def __call__(self):
        if self.engine is None:
            raise RuntimeError("the engine was not loaded for this item")
        return self.engine


def _run(head: JobHead, *, worker: Worker, steps: Steps) -> dict:
    """The loop both kinds of job share: claim (Postgres lease, attempt fence), run,
    complete or fail, until nothing is claimable; then finish the job if it is done.

    Errors map to states here (:meth:`_Loop.settle`): OOM after the last halving -> ``failed(oom)``;
    cancel -> the item is released; a spec error or a rejected judge request -> failed (no
    retry fixes them); anything else -> failed and retried up to ``max_item_attempts``, and a
    transient outage (:class:`RetryableError`, the judge down) leaves its item queued for a
    later delivery instead of spinning. A failed engine load claims nothing (or gives the item
    back) and is recorded on the job by :class:`_Engine`; the message is dropped and the
    reconciler wakes a worker for the job again.

    Spanning (``steps.spans``, on the vLLM engine: capture, plain rollout, a pipeline's
    generate items): each persona's engine part runs in a thread on a lane of one shared vLLM
    run (:class:`workers.engine.lanes.SharedStream`); the moment its samples are all in the
    engine the next persona (an item of ``steps.lane_stages``) is claimed and starts
    streaming into the same run, so vLLM's batch never drains at a persona's tail. At most
    two personas are in flight; each is settled (completed, stored, failed, released) on its
    own, in claim order, exactly as without spanning. A cleanup after a failure waits until the other persona's engine part
    is over (it may restart the engine)."""
    job_id, settings, runtime = head.id, worker.settings, worker.runtime

    def event(kind_: str, data: dict) -> None:
        with session_scope() as s:
            jobs.record_event(s, job_id=job_id, kind=kind_, data={"worker": worker.name, **data})

    engine = _Engine(head, worker, event)
    if steps.engine_now() and not engine.load():
        return {"job_id": job_id, "ran": 0, "reason": "the model could not be loaded"}
    store = get_store(settings)
    stores = _Stores(job_id, worker)
    loop = _Loop(head, worker, steps, engine, store, stores, event)
    ahead: _Running | None = None
    try:
        while True:
            if ahead is not None:
                cur, ahead = ahead, None
            else:
                item = loop.claim()
                if item is _NO_ENGINE:
                    stores.close()
                    return {"job_id": job_id, "ran": loop.ran + stores.ran,
                            "reason": "the model could not be loaded"}
                if item is None:
                    if stores.wait():  # a store that failed re-queued its item: claim it again
                        continue
                    break
                cur = loop.start(item)
            if cur.view is not None:
                cur.fed.wait()  # its samples are all in the engine, or it ended
                if not cur.future.done():
                    nxt = loop.claim(stages=steps.lane_stages)
                    if isinstance(nxt, Claimed):
                        ahead = loop.start(nxt, after=cur.item.persona)
            stop, clean = loop.settle(cur)
            if clean:
                if ahead is not None:
                    wait([ahead.future])  # never clean (or restart) under a running persona
                loop.quiesce()
                runtime.cleanup(on_event=event)
            if stop:
                if ahead is not None:
                    _, clean = loop.settle(ahead)
                    ahead = None
                    if clean:
                        loop.quiesce()
                        runtime.cleanup(on_event=event)
                break
        stores.close()
        steps.before_finish(store)
        db_retry(finish, job_id, settings=settings, store=store, what="finish")
    finally:
        if ahead is not None:  # the loop ended on an error with the next persona running
            try:
                loop.settle(ahead)
            except Exception:
                log.exception("job %s: persona %s could not be settled", job_id,
                              ahead.item.persona)
        loop.close()
        stores.close()  # a persona being stored when the loop ended on an error completes
        if engine.engine is not None:
            figures = runtime.cleanup(on_event=event)
            if figures.get("memory"):
                event("cleanup", figures)
        worker.idle()
    return {"job_id": job_id, "ran": loop.ran + stores.ran}


_NO_ENGINE = object()


@dataclass
class _Running:
    """An item whose run was started: ``fed`` is set when its samples are all in the engine
    (spanning) or when it ended; ``view`` is its lane of the shared run (None: not spanning)."""

    item: Claimed
    future: Future
    fed: threading.Event
    view: object | None
    after: str | None = None


class _Loop:
    """:func:`_run`'s steps: claim, start, settle."""

    def __init__(self, head: JobHead, worker: Worker, steps: Steps, engine: _Engine, store,
                 stores: _Stores, event):
        self.head, self.worker, self.steps, self.engine = head, worker, steps, engine
        self.store, self.stores, self.event = store, stores, event
        self.ran = 0
        self.spans = steps.spans() and worker.settings.engine.span_personas
        self._shared = None  # workers.engine.lanes.SharedStream, made on first use
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="item")

    def claim(self, stages: frozenset[str] | None = None):
        """The next item to run (of ``stages``, when given): a Claimed, None (nothing
        claimable) or ``_NO_ENGINE`` (the engine could not be loaded; the item was given
        back). Items whose artifact is already in the store with its checksum are completed
        on the way."""
        h, name = self.head, self.worker.name
        while True:
            item = db_retry(_claim, h.id, name, self.worker.settings.lease_s, stages,
                            what="claim")
            if item is None:
                return None
            if (item.done_key and item.done_sha
                    and self.store.verify(item.done_key, item.done_sha)):
                db_retry(_complete, h.id, item.id, item.attempt, name, item.done_key,
                         item.done_sha, info=None, what="complete")
                self.event("item_skipped", {"persona": item.persona,
                                            "artifact_key": item.done_key})
                continue
            if self.steps.needs_engine(item) and not self.engine.load():
                db_retry(_release, item, name, what="release")
                return _NO_ENGINE
            return item

    def _lane(self, fed: threading.Event):
        """A lane of the shared run when this job spans personas on the vLLM engine."""
        if not self.spans or self.engine.engine is None:
            return None
        # here, not at the top: the vLLM engine's modules load torch, which the job loop
        # does not need for a job that never reaches this (pipeline stages, a judge worker)
        from workers.engine.lanes import SharedStream

        eng = self.engine()
        if not SharedStream.supports(eng):
            return None
        if self._shared is None or self._shared.engine is not eng:  # a restart: a new engine
            self._shared = SharedStream(eng)
        return self._shared.view(on_fed=fed.set)

    def start(self, item: Claimed, *, after: str | None = None) -> _Running:
        """Run the item: on a pool thread with a lane of the shared run when spanning, else
        here (the result waits in a finished future)."""
        self.worker.busy(self.head.id)
        fed = threading.Event()
        view = None
        if self.steps.needs_engine(item):
            lanes = self.steps.lane_stages
            if lanes is None or item.stage in lanes:
                view = self._lane(fed)
            else:  # it calls the engine itself: the shared run must be closed first
                self.quiesce()
        kw = {"engine": self.engine if view is None else (lambda: view), "store": self.store,
              "worker": self.worker, "event": self.event,
              "progress": _progress_writer(item.id, item.attempt),
              "cancelled": _cancel_checker(self.head.id)}
        if view is not None:
            fut = self._pool.submit(self.steps.run, item, **kw)
            fut.add_done_callback(lambda _: fed.set())
            return _Running(item, fut, fed, view, after)
        fut = Future()
        try:
            fut.set_result(self.steps.run(item, **kw))
        except Exception as exc:  # noqa: BLE001 - settled like a thread's error
            fut.set_exception(exc)
        fed.set()
        return _Running(item, fut, fed, None)

    def settle(self, r: _Running) -> tuple[bool, bool]:
        """Wait for a started item and record its outcome: (stop the loop, clean up the
        engine). A capture or rollout persona's store step goes to the background
        (:class:`_Stores`); the item completes when it returns."""
        h, item, name = self.head, r.item, self.worker.name
        settings = self.worker.settings
        try:
            result, info = r.future.result()
        except JobCancelled:
            db_retry(_release, item, name, what="release")
            return True, False
        except EngineOOM as exc:
            _fail(h.id, item.id, item.attempt, name, "oom", exc, requeue=False,
                  batch_size=exc.batch_size, memory=exc.memory)
            if self.steps.oom_fails_rest:
                _fail_rest(h.id, name, item.persona, exc)
            return self.steps.oom_fails_rest, True
        except (JudgeRejected, SpecInvalid) as exc:  # no retry fixes these
            log.warning("job %s %s/%s failed: %s", h.id, item.stage, item.persona, exc)
            db_retry(_fail, h.id, item.id, item.attempt, name, "error", exc, requeue=False,
                     what="fail")
            return False, self.steps.needs_engine(item)
        except Exception as exc:
            log.exception("job %s %s/%s failed", h.id, item.stage, item.persona)
            requeue = item.attempt < settings.max_item_attempts
            db_retry(_fail, h.id, item.id, item.attempt, name, "error", exc, requeue=requeue,
                     what="fail")
            # the judge is down: the item waits queued for a later delivery
            return isinstance(exc, RetryableError) and requeue, self.steps.needs_engine(item)
        if r.view is not None:  # when its samples were in the engine: the overlap, on record
            self.event("item_stream", {"persona": item.persona, "stage": item.stage,
                                       "claimed_during": r.after,
                                       **r.view.timing})
        if callable(result):  # a store step: vectors, serialisation, upload off the engine
            self.stores.submit(item.id, item.attempt, item.persona, result, info)
            return False, False
        db_retry(_complete, h.id, item.id, item.attempt, name, result.artifact_key,
                 result.sha256, what="complete",
                 info={"size": result.size, "extra": result.extra, **info, **result.info})
        self.ran += 1
        return False, False

    def quiesce(self) -> None:
        """With no item running: wait until the shared run is closed (the engine then serves
        ``generate`` again, and a cleanup may restart it)."""
        if self._shared is not None and not self._shared.join(timeout=60.0):
            log.warning("job %s: the shared engine run did not close within 60 s", self.head.id)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.quiesce()


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

    def submit(self, item_id, attempt, persona: str, step, info: dict | None = None) -> None:
        self.wait()
        self._last = self._pool.submit(self._run, item_id, attempt, persona, step, info or {})

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

    def _run(self, item_id, attempt, persona: str, step, info: dict) -> None:
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
                 info={"size": result.size, "extra": result.extra, **info, **result.info})
        self.ran += 1


def _claim(job_id, worker, lease_s, stages=None) -> Claimed | None:
    with session_scope() as s:
        item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=lease_s, stages=stages)
        if item is None:
            return None
        return Claimed(id=item.id, attempt=item.attempt, persona=item.persona, stage=item.stage,
                       done_key=item.artifact_key, done_sha=item.artifact_sha256)


def _release(item: Claimed, worker: str) -> None:
    try:
        with session_scope() as s:
            jobs.release_item(s, item_id=item.id, attempt=item.attempt, worker=worker)
    except InvalidTransition:
        log.warning("item %s attempt %s: lost the lease before giving it back", item.id,
                    item.attempt)


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
