"""A real API server for the API/CLI/fuzz tests: uvicorn in a thread on a free port, on a
fresh Postgres database (migrated), a Redis broker URL, the local artifact store, bearer
tokens, and recorders in place of the Celery enqueue and remote control."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx

TOKEN = "tok-3c1f0b9e5a7d2468"
S3_SECRET = "s3-secret-8e2d41f7c9"


class Recorder:
    """Stands in for ``workers.dispatch.enqueue_job``: remembers every id (and reason) it was
    given."""

    def __init__(self):
        self.ids: list[str] = []
        self.reasons: list[str] = []

    def __call__(self, job_id: str, *, reason: str = "submitted") -> None:
        self.ids.append(job_id)
        self.reasons.append(reason)


class FakeControl:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def release(self, name):
        self.calls.append(("release", name))
        return [{"worker": name, "ok": True, "deferred": False}]

    def reload(self, name):
        self.calls.append(("reload", name))
        return [{"worker": name, "ok": True, "deferred": True, "state": "busy"}]


@dataclass
class Server:
    url: str
    settings: object
    enqueued: Recorder
    control: FakeControl
    http: httpx.Client = field(repr=False)

    def session(self):
        from app.db import default_factory, session_scope

        return session_scope(default_factory(self.settings.db_url))


def start(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start")
        time.sleep(0.05)
    return server, thread


def serve(pg_url: str, monkeypatch):
    """Generator behind each test module's ``api`` fixture: yields a running Server."""
    from app.api import create_app
    from app.db import dispose_all, upgrade
    from app.settings import get_settings
    from tests.conftest import REDIS_BASE, free_port

    monkeypatch.setenv("CHATSPACE_DATABASE_URL", pg_url)
    # the API only reads the broker (connection check, queue depth): db 0 is shared safely
    monkeypatch.setenv("CHATSPACE_BROKER_URL", f"{REDIS_BASE}/0")
    monkeypatch.setenv("CHATSPACE_API_TOKENS", json.dumps([TOKEN, "another-token"]))
    monkeypatch.setenv("CHATSPACE_ALLOWED_MODELS",
                       json.dumps(["tiny:qwen3", "tiny:llama", "org/reported"]))
    monkeypatch.setenv("CHATSPACE_S3_SECRET_ACCESS_KEY", S3_SECRET)  # never used: no bucket
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(pg_url)
    enqueued, control = Recorder(), FakeControl()
    port = free_port()
    server, thread = start(create_app(settings, enqueue=enqueued, control=control), port)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    try:
        yield Server(url, settings, enqueued, control, http)
    finally:
        http.close()
        server.should_exit = True
        thread.join(10)
        dispose_all()
