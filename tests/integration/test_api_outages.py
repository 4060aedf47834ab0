"""The status API while a dependency is down: it answers, fast, and says what is wrong.

- The S3 server refusing connections (a proxy in front of moto, switched off): ``/readyz``
  answers 503 naming the store within its bound, and the artifact routes answer 503 with
  ``Retry-After`` at once (they used to hang behind the store's 120 s upload retry).
- An S3 endpoint that accepts connections and never answers: ``/readyz`` still answers within
  its bound, saying the store gave no answer.
- The database unreachable: every route that needs it answers 503 with ``Retry-After`` (it
  used to be 500); the routes that do not need it keep answering.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.integration.api_server import TOKEN, FakeControl, Recorder, serve, start
from tests.reliability.services import SwitchableProxy

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUND_S = 2.0  # app.api.deps.DEPENDENCY_TIMEOUT_S
SLACK_S = 1.5  # a loaded 2-core CI machine


def _timed(http: httpx.Client, method: str, path: str, **kw) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = http.request(method, path, **kw)
    return r, time.monotonic() - t0


@pytest.fixture
def proxy(s3_endpoint):
    p = SwitchableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield p
    p.close()


@pytest.fixture
def api_s3(pg_url, s3_bucket, proxy, monkeypatch):
    """The API with its artifacts on the S3 server, reached through the proxy."""
    monkeypatch.setenv("CHATSPACE_S3_ENDPOINT_URL", proxy.url)
    yield from serve(pg_url, monkeypatch)


def test_store_refusing_connections_is_a_fast_503(api_s3, proxy):
    from app.storage import get_store

    api = api_s3
    job = api.http.post("/jobs", json={"dataset": "traits_sample"}).json()
    key = f"{job['artifact_prefix']}/curious.safetensors"
    get_store(api.settings).put_bytes(key, b"bytes")
    api.http.get("/readyz")  # warm: the first call loads botocore's models
    assert api.http.get("/readyz").status_code == 200

    proxy.down()
    ready, took = _timed(api.http, "GET", "/readyz")
    assert ready.status_code == 503 and took < BOUND_S + SLACK_S, (took, ready.text)
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"] == "ok", checks
    assert checks["store"].startswith("error") and "unreachable" in checks["store"], checks
    assert proxy.url in checks["store"]  # names the endpoint to check
    assert ready.headers["retry-after"]
    for path, params in (("/artifacts", {"job": job["id"]}), ("/artifacts", {}),
                         ("/artifacts/meta", {"key": key}), ("/artifacts/url", {"key": key})):
        r, took = _timed(api.http, "GET", path, params=params)
        assert r.status_code == 503 and took < BOUND_S + SLACK_S, (path, took, r.text)
        assert r.json()["error"] == "storage_error" and r.headers["retry-after"], r.text
    assert api.http.get(f"/jobs/{job['id']}").status_code == 200  # the rest still answers

    proxy.up()
    assert api.http.get("/readyz").status_code == 200
    listing = api.http.get("/artifacts", params={"job": job["id"]}).json()
    assert [a["key"] for a in listing["artifacts"]] == [key]


@pytest.fixture
def silent_endpoint():
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_store_that_never_answers_still_gets_an_answer_within_the_bound(
        pg_url, s3_bucket, silent_endpoint, monkeypatch):
    monkeypatch.setenv("CHATSPACE_S3_ENDPOINT_URL", silent_endpoint)
    api = next(gen := serve(pg_url, monkeypatch))
    try:
        api.http.get("/readyz")  # warm
        ready, took = _timed(api.http, "GET", "/readyz")
        assert ready.status_code == 503 and took < BOUND_S + SLACK_S, (took, ready.text)
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["broker"] == "ok", checks
        assert checks["store"] == f"error: no answer within {BOUND_S:g}s", checks
        r, took = _timed(api.http, "GET", "/artifacts")
        # one attempt with a 2 s read timeout, not 5 attempts x 60 s plus a 120 s retry loop
        assert r.status_code == 503 and took < 2 * BOUND_S + SLACK_S, (took, r.text)
    finally:
        gen.close()


def test_database_down_is_503_with_retry_after_on_every_route(monkeypatch, tmp_path):
    from app.api import create_app
    from app.db import dispose_all
    from app.settings import get_settings
    from tests.conftest import free_port

    monkeypatch.setenv("CHATSPACE_DATABASE_URL",
                       f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
    monkeypatch.setenv("CHATSPACE_API_TOKENS", f'["{TOKEN}"]')
    get_settings.cache_clear()
    app = create_app(get_settings(), enqueue=Recorder(), control=FakeControl())
    port = free_port()
    server, thread = start(app, port)
    job = "a" * 32
    needs_db = [("POST", "/jobs", {"dataset": "traits_sample"}), ("GET", "/jobs", None),
                ("GET", f"/jobs/{job}", None), ("GET", f"/jobs/{job}/events", None),
                ("POST", f"/jobs/{job}/cancel", None), ("POST", f"/jobs/{job}/retry", None),
                ("GET", "/workers", None), ("POST", "/workers/w1/release", None),
                ("POST", "/workers/w1/reload", None), ("GET", "/metrics", None),
                ("GET", "/artifacts", {"job": job}), ("GET", f"/jobs/{job}/analysis", None),
                ("POST", f"/jobs/{job}/analysis", None), ("GET", f"/jobs/{job}/sweep", None),
                ("GET", f"/jobs/{job}/sweep.png", None)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as c:
            for method, path, arg in needs_db:
                kw = {"json": arg} if method == "POST" else {"params": arg}
                r, took = _timed(c, method, path, **kw)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.headers["retry-after"] == "5" and took < 5, (path, took)
                body = r.json()
                assert body["error"] == "database_unavailable" and body["hint"], body
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"]
            assert ready.json()["checks"]["database"].startswith("error"), ready.text
            assert c.get("/healthz").status_code == 200  # alive, only not ready
            assert c.get("/datasets").status_code == 200  # needs no database
            line = (b'{"label": "pos", "prompt_index": 0, "question_index": 0, "question": "q",'
                    b' "response": "a"}\n')
            up = c.put(f"/uploads/responses/{'0' * 32}/p", content=line)
            assert up.status_code == 200 and up.json()["samples"] == 1, up.text  # no database
            # the judge pool's OpenAI-compatible routes look up live judge workers
            chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            for method, path, kw in (("POST", "/v1/chat/completions", {"json": chat}),
                                     ("GET", "/v1/models", {})):
                r, took = _timed(c, method, path, **kw)
                assert r.status_code == 503 and took < 5, (path, r.status_code, r.text)
                assert r.headers.get("retry-after"), path
            paths = {r.path for r in app.routes if getattr(r, "include_in_schema", False)}
            covered = {p.replace(job, "{job_id}").replace("w1", "{name}")
                       for _, p, _ in needs_db} | {"/readyz", "/healthz", "/datasets",
                                                   "/uploads/responses/{upload}/{persona}",
                                                   "/v1/chat/completions", "/v1/models"}
            assert paths - covered <= {"/artifacts/meta", "/artifacts/url",  # no database
                                       "/artifacts/content"}, paths - covered
    finally:
        server.should_exit = True
        thread.join(10)
        dispose_all()
