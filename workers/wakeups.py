"""Broker messages are wake-ups; Postgres is the truth. How many to send, and when.

A message carries only a job id. The worker that takes it claims that job's items from
Postgres (leases, SKIP LOCKED) until none is left, so a message is a doorbell, not a unit of
work: a duplicate costs one empty claim, a missing one leaves idle workers idle. Two rules
follow, one per way this went wrong:

- **Spread at once.** A submit or retry sends one message per queued item, up to the number
  of live workers consuming the job's queue (:func:`submit_wakeups`). One message per job
  left a second idle worker waiting 30–45 s for the reconciler.
- **Bounded by the open work.** The reconciler (:func:`plan`) looks at a queue only when the
  broker says it is EMPTY — a waiting message means a worker will get there — and then sends
  one message to each job that has queued items and no live holder, plus one per idle live
  consumer to the jobs that have more queued items than holders. It never sends into a
  non-empty queue, so the queue never holds more than (jobs waiting + idle workers) messages
  from it, however long the backlog lasts. Re-sending every waiting job every 30 s grew one
  queue 18 → 612 during a 20-job burst.

Reconcilers run in every worker; on Postgres they take turns through a transaction-scoped
advisory lock (:func:`reconcile`), so two of them never both see the queue empty and both
fill it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text

from app.db import session_scope
from app.models import Job, JobItem, Worker
from app.settings import get_settings

log = logging.getLogger(__name__)
RECONCILE_LOCK = 0x63737263  # "csrc": pg_try_advisory_xact_lock key shared by reconcilers


@dataclass
class Wakeup:
    job_id: str
    queue: str
    messages: int
    why: str


def live_workers(session, *, now: datetime | None = None) -> list:
    """Workers with a heartbeat younger than ``worker_stale_s`` that are not stopped."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=get_settings().worker_stale_s)
    return list(session.execute(select(Worker).where(
        Worker.state != "stopped", Worker.heartbeat_at >= cutoff)).scalars())


def consumers(workers: list, queue: str) -> list:
    return [w for w in workers if queue in (w.queues or [])]


def holders(session) -> set[str]:
    """Names of workers holding a running item right now (a lease in Postgres)."""
    return set(session.execute(select(JobItem.lease_owner).where(
        JobItem.state == "running", JobItem.lease_owner.is_not(None)).distinct()).scalars())


def idle(workers: list, busy: set[str]) -> list:
    """Workers ready to take a job now: engine loaded and idle, no job, no item held."""
    return [w for w in workers
            if w.state == "idle" and not w.current_job_id and w.name not in busy]


def submit_wakeups(session, *, job_id: str, queue: str) -> int:
    """Messages for a job just submitted or retried: one per queued item, up to the number
    of live consumers of its queue; at least one (a worker started later finds it)."""
    queued = session.execute(select(func.count()).select_from(JobItem).where(
        JobItem.job_id == job_id, JobItem.state == "queued")).scalar_one()
    return max(1, min(int(queued), len(consumers(live_workers(session), queue))))


def plan(session, *, queue_of: Callable[[object, list], str],
         queue_length: Callable[[str], int | None]) -> list[Wakeup]:
    """The wake-ups the reconciler sends now (see the module doc). ``queue_of(job, live)``
    picks a job's queue; ``queue_length(queue)`` is the broker's count of waiting messages
    (None when the broker cannot say: nothing is sent to that queue)."""
    workers = live_workers(session)
    live_names = {w.name for w in workers}
    busy = holders(session)
    queued_n = (select(JobItem.job_id, func.count().label("n"))
                .where(JobItem.state == "queued").group_by(JobItem.job_id).subquery())
    rows = session.execute(
        select(Job, queued_n.c.n).join(queued_n, queued_n.c.job_id == Job.id)
        .where(Job.state.in_(("queued", "running")), Job.cancel_requested.is_(False))
        .order_by(Job.created_at, Job.id)).all()
    if not rows:
        return []
    held: dict[str, int] = defaultdict(int)
    for job_id, owner in session.execute(select(JobItem.job_id, JobItem.lease_owner).where(
            JobItem.state == "running", JobItem.job_id.in_([j.id for j, _ in rows]))).all():
        if owner in live_names:
            held[str(job_id)] += 1
    by_queue: dict[str, list[tuple[object, int]]] = defaultdict(list)
    for job, n in rows:
        by_queue[queue_of(job, workers)].append((job, int(n)))
    out: list[Wakeup] = []
    for queue, waiting in by_queue.items():
        pending = queue_length(queue)
        if pending is None or pending > 0:
            continue  # a message is waiting (or the broker cannot say): workers get there
        pool = consumers(workers, queue)
        if not pool:
            continue  # nobody to wake; a worker that starts reconciles for itself
        budget = len(idle(pool, busy))
        plan_n: dict[str, int] = {}
        for job, _n in waiting:
            if not held[str(job.id)]:
                plan_n[str(job.id)] = 1
                budget -= 1
        for job, n in waiting:
            if budget <= 0:
                break
            extra = min(n - plan_n.get(str(job.id), 0), budget)
            if extra > 0:
                plan_n[str(job.id)] = plan_n.get(str(job.id), 0) + extra
                budget -= extra
        for job, _n in waiting:
            k = plan_n.get(str(job.id), 0)
            if k:
                why = "no live holder" if not held[str(job.id)] else "idle workers"
                out.append(Wakeup(str(job.id), queue, k, why))
    return out


def reconcile(*, queue_of: Callable[[object, list], str],
              send: Callable[[str, str, int, str], None],
              queue_lengths: Callable[[list[str]], dict[str, int | None]]) -> list[Wakeup]:
    """One reconciler round: plan under the shared lock, then ``send(job_id, queue, n, why)``
    for each wake-up before the lock is released. ``queue_lengths(queues)`` asks the broker
    (:func:`workers.broker.queue_lengths`). Returns what was sent."""
    sent: list[Wakeup] = []
    cache: dict[str, int | None] = {}

    def length(queue: str) -> int | None:
        if queue not in cache:
            cache.update(queue_lengths([queue]))
        return cache[queue]

    with session_scope() as s:
        pg = s.get_bind().dialect.name == "postgresql"
        if pg and not s.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                {"k": RECONCILE_LOCK}).scalar():
            return []  # another worker's reconciler is in its round
        wakeups = plan(s, queue_of=queue_of, queue_length=length)
        if pg:  # send while the lock is held; SQLite: after, since send() writes an event
            sent = _send_all(wakeups, send)
    return sent if pg else _send_all(wakeups, send)


def _send_all(wakeups: list[Wakeup], send) -> list[Wakeup]:
    sent = []
    for w in wakeups:
        try:
            send(w.job_id, w.queue, w.messages, w.why)
            sent.append(w)
        except Exception:
            log.exception("reconciler could not wake job %s", w.job_id)
    return sent
