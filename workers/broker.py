"""The Celery app as a client of the broker: built from :class:`app.settings.Settings`, used
to send the job task and to broadcast remote-control commands.

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job's message is acknowledged only
  when its task returns, so a worker killed mid-job leaves the message to be re-delivered.
- ``worker_prefetch_multiplier=1``: a worker holds at most the message it runs; a second job
  waits in the queue for a free GPU instead of behind a busy one.
- A Redis ``visibility_timeout`` longer than the longest job: otherwise Redis re-delivers a
  running job's message to another worker. Even then a re-delivered task must not run an
  item twice, which is what the Postgres leases with their attempt counter guarantee.
- Routing: one queue per (model, dtype) (:func:`app.queues.queue_name`), chosen when a job is
  enqueued (:mod:`workers.dispatch`); tasks carry a job id only, never objects.

The worker side (the task, signals, control commands) is wired onto this same app by
:mod:`workers.celery_app`; senders never need it. The app is built lazily from the current
settings (tests change the environment between runs).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from kombu.exceptions import ChannelError

from app.queues import queue_name
from app.settings import Settings, get_settings
from workers.config import RUN_JOB, nodename

log = logging.getLogger(__name__)


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for long GPU jobs (no task registered: senders send by name)."""
    settings = settings or get_settings()
    transport_options = dict(settings.broker_transport_options())
    if settings.broker.startswith(("redis://", "rediss://")):
        transport_options["visibility_timeout"] = settings.broker_visibility_timeout_s
    celery = Celery("chatspace", broker=settings.broker, set_as_current=False)
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # failures are recorded in Postgres, not re-run
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results live in Postgres and the artifact store
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=queue_name(settings.default_model, settings.default_dtype),
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,
        broker_heartbeat=0,
    )
    return celery


@lru_cache(maxsize=4)
def _cached(key: str) -> Celery:
    return make_app()


def get_app() -> Celery:
    """The app for the current settings (cached per broker configuration)."""
    s = get_settings()
    return _cached(f"{s.broker}|{s.data_dir}")


def send_job(job_id: str, *, queue: str) -> None:
    """Ring the doorbell: the job task for ``job_id`` on ``queue``."""
    get_app().send_task(RUN_JOB, args=[str(job_id)], queue=queue)


def broadcast(command: str, worker: str | None, *, timeout: float) -> list[dict]:
    """Send a ``chatspace_<command>`` control message to one worker (None = all); one reply
    per worker that answered, as ``{"worker": name, **body}``."""
    destination = [nodename(worker)] if worker else None
    replies = get_app().control.broadcast(
        f"chatspace_{command}", destination=destination, reply=True, timeout=timeout)
    return [{"worker": node.split("@", 1)[-1], **(body if isinstance(body, dict) else {"ok": body})}
            for reply in replies or [] for node, body in reply.items()]


BROKER_TIMEOUT_S = 3.0


def queue_lengths(queues) -> dict[str, int | None]:
    """Messages waiting per queue, from the broker (None per queue when it cannot say).
    The reconciler reads it: a queue still holding messages needs no more
    (:mod:`workers.wakeups`)."""
    out: dict[str, int | None] = dict.fromkeys(queues)
    try:
        with get_app().connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            channel = conn.default_channel
            for q in queues:
                out[q] = _length(channel, q)
    except Exception as exc:  # noqa: BLE001 - an unreachable broker: the caller sends nothing
        log.warning("broker queue lengths unavailable: %s", type(exc).__name__)
    return out


def _length(channel, queue: str) -> int:
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except ChannelError:
        return 0  # a queue nobody declared (Redis: no list) holds nothing
