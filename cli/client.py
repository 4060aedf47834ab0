"""One client interface over two transports: HTTP to a running API, or the same API app
in-process (the embedded default, no server to start).

Both speak to :func:`app.api.create_app` through httpx, so the CLI sees the same JSON, the
same validation and the same error bodies either way; only the transport differs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from app.errors import ChatspaceError

log = logging.getLogger(__name__)
TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 600.0  # a persona's responses file may be a few hundred MB


class ApiError(ChatspaceError):
    """An error answer from the API (or no answer): one line for the user (``str(exc)``)."""

    def __init__(self, status: int, body: dict | None = None, message: str | None = None):
        self.status = status
        self.body = body or {}
        super().__init__(message or self.body.get("message") or f"HTTP {status}",
                         field=self.body.get("field"), hint=self.body.get("hint"))

    @property
    def user_error(self) -> bool:
        return 400 <= self.status < 500


class Client:
    """The API's operations as methods returning decoded JSON."""

    def __init__(self, http: httpx.Client, *, where: str, store=None):
        self.http = http
        self.where = where
        self._store = store  # in-process only: read artifacts directly

    # ---- plumbing
    def _call(self, method: str, path: str, **kw) -> Any:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(0, message=f"cannot reach the API at {self.where}: "
                                      f"{type(exc).__name__}") from None
        self._raise_for(resp)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    @staticmethod
    def _raise_for(resp) -> None:
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"message": resp.text[:200] or resp.reason_phrase}
            raise ApiError(resp.status_code, body if isinstance(body, dict) else None)

    @staticmethod
    def _q(**params) -> dict:
        return {k: v for k, v in params.items() if v is not None}

    # ---- jobs
    def submit(self, body: dict) -> dict:
        return self._call("POST", "/jobs", json=body)

    def jobs(self, **filters) -> list[dict]:
        return self._call("GET", "/jobs", params=self._q(**filters))["jobs"]

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}")

    def events(self, job_id: str, *, after: int | None = None) -> list[dict]:
        return self._call("GET", f"/jobs/{job_id}/events", params=self._q(after=after))["events"]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/retry")

    def sweep(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}/sweep")

    def sweep_png(self, job_id: str) -> bytes:
        try:
            resp = self.http.request("GET", f"/jobs/{job_id}/sweep.png")
        except httpx.HTTPError as exc:
            raise ApiError(0, message=f"cannot reach the API at {self.where}: "
                                      f"{type(exc).__name__}") from None
        self._raise_for(resp)
        return resp.content

    # ---- uploads
    def upload_responses(self, upload: str, persona: str, data: bytes) -> dict:
        """One persona's responses file into the artifact store (app.api.uploads)."""
        slow = {} if self.where == "in-process" else {"timeout": UPLOAD_TIMEOUT_S}
        return self._call("PUT", f"/uploads/responses/{upload}/{persona}", content=data,
                          headers={"Content-Type": "application/x-ndjson"}, **slow)

    # ---- workers, datasets, health
    def workers(self) -> list[dict]:
        return self._call("GET", "/workers")["workers"]

    def control(self, command: str, name: str) -> dict:
        return self._call("POST", f"/workers/{name}/{command}")

    def datasets(self) -> list[dict]:
        return self._call("GET", "/datasets")["datasets"]

    def ready(self) -> dict:
        return self._call("GET", "/readyz")

    # ---- artifacts
    def artifacts(self, *, job: str | None = None, prefix: str | None = None) -> dict:
        return self._call("GET", "/artifacts", params=self._q(job=job, prefix=prefix))

    def artifact_meta(self, key: str) -> dict:
        return self._call("GET", "/artifacts/meta", params={"key": key})

    def artifact_url(self, key: str, *, expires_s: int = 3600) -> dict:
        return self._call("GET", "/artifacts/url", params={"key": key, "expires_s": expires_s})

    def download(self, key: str, path: Path) -> int:
        """Fetch one artifact to ``path`` (through its URL; a file:// URL is read locally)."""
        if self._store is not None:
            return self._store.download_file(key, path).size
        url = self.artifact_url(key)["url"]
        if url.startswith("file://"):
            data = Path(unquote(urlparse(url).path)).read_bytes()
            path.write_bytes(data)
            return len(data)
        size = 0
        with httpx.stream("GET", url, timeout=TIMEOUT_S) as resp:
            if resp.status_code >= 400:
                raise ApiError(resp.status_code, message=f"download of {key} failed")
            with open(path, "wb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
                    size += len(chunk)
        return size


def http_client(url: str, token: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT_S)
    return Client(http, where=url)


def wiring():
    """(enqueue, control) for an API served by this process: the workers' Celery dispatch
    and remote control when they import, else a logged no-op enqueue and no control."""
    try:
        from workers.dispatch import enqueue_job
    except ImportError as exc:
        log.warning("workers.dispatch unavailable (%s): jobs stay queued in the database "
                    "until a worker's reconciler sends them", exc)

        def enqueue_job(job_id: str, *, reason: str = "submitted") -> None:
            log.warning("job %s not enqueued: no dispatcher", job_id)
    try:
        from workers import control
    except ImportError as exc:
        log.warning("workers.control unavailable (%s): release/reload answer 503", exc)
        control = None
    return enqueue_job, control


def in_process_client(settings) -> Client:
    """The API app in this process on the configured database (migrated on first use when
    it is the embedded SQLite file)."""
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.storage import get_store

    if settings.embedded:
        from app.db import upgrade

        upgrade(settings.db_url)
    enqueue, control = wiring()
    app = create_app(settings, enqueue=enqueue, control=control)
    token = settings.api_tokens[0].get_secret_value() if settings.api_tokens else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = TestClient(app, base_url="http://in-process", headers=headers,
                      raise_server_exceptions=False)
    return Client(http, where="in-process", store=get_store(settings))
