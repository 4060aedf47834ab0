"""The status API (a real ``chatspace-jobs api`` process) while a dependency is down.

- S3 refusing connections: ``/readyz`` answers 503 naming the store within its 2 s bound
  (it answered nothing for 54 s, then "store: ok"), ``/artifacts`` answers 503 at once.
- Postgres stopped: every route that reads the database answers 503 with ``Retry-After``
  (it answered 500), and the API answers 200 again once Postgres is back.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BOUND_S = 2.0


def _timed(http, method: str, path: str, **kw):
    t0 = time.monotonic()
    r = http.request(method, path, **kw)
    return r, time.monotonic() - t0


def _codes(counter: Counter) -> str:
    return ", ".join(f"{code}×{n}" for code, n in sorted(counter.items(), key=str))


def test_readyz_and_artifacts_answer_fast_while_s3_is_down(stack):
    from tests.reliability.checks import Figures

    job = stack.submit()
    stack.http.get("/readyz")  # warm (botocore's models)
    assert stack.http.get("/readyz").status_code == 200
    stack.proxy.down()
    ready, listing = [], []
    codes: Counter = Counter()
    try:
        for _ in range(10):
            r, took = _timed(stack.http, "GET", "/readyz")
            ready.append(took)
            codes[f"readyz {r.status_code}"] += 1
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            assert r.json()["checks"]["store"].startswith("error"), r.text
            assert r.json()["checks"]["database"] == "ok", r.text
            r, took = _timed(stack.http, "GET", "/artifacts", params={"job": job})
            listing.append(took)
            codes[f"artifacts {r.status_code}"] += 1
            assert r.status_code == 503 and r.json()["error"] == "storage_error", r.text
    finally:
        stack.proxy.up()
    assert stack.http.get("/readyz").status_code == 200
    fig = Figures(scenario="S3 refusing connections (API only)", jobs=1)
    fig.measures = {"/readyz latency during S3 outage, max s": round(max(ready), 2),
                    "/readyz latency during S3 outage, median s": round(
                        statistics.median(ready), 2),
                    "GET /artifacts latency during S3 outage, max s": round(max(listing), 2)}
    fig.notes.append(f"answers while S3 was down: {_codes(codes)}")
    fig.record()
    assert max(ready) < BOUND_S + 1.0 and max(listing) < BOUND_S + 1.0, fig.measures


def test_every_route_answers_503_while_postgres_is_down(stack):
    from tests.reliability.checks import Figures

    job = stack.submit()
    routes = [("GET", "/jobs", {}), ("GET", f"/jobs/{job}", {}),
              ("GET", f"/jobs/{job}/events", {}), ("GET", "/workers", {}),
              ("GET", "/metrics", {}), ("GET", "/artifacts", {"params": {"job": job}}),
              ("POST", "/jobs", {"json": {"dataset": "traits_sample", "model": "tiny:qwen3",
                                          "dtype": "float32"}}),
              ("POST", f"/jobs/{job}/cancel", {}), ("GET", "/readyz", {})]
    codes: Counter = Counter()
    slowest = 0.0
    stack.pg.stop("fast")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for method, path, kw in routes:
                r, took = _timed(stack.http, method, path, **kw)
                slowest = max(slowest, took)
                codes[r.status_code] += 1
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.headers.get("retry-after"), (method, path, r.headers)
        assert stack.http.get("/healthz").status_code == 200
    finally:
        stack.pg.start()
    t0 = time.monotonic()
    while stack.http.get("/jobs").status_code != 200:
        assert time.monotonic() - t0 < 30, "the API did not recover with Postgres"
        time.sleep(0.2)
    recovered = time.monotonic() - t0
    assert stack.http.get(f"/jobs/{job}").status_code == 200
    fig = Figures(scenario="Postgres stopped (API only)", jobs=1, recovery_s=round(recovered, 1))
    fig.measures = {"API status codes during Postgres outage": _codes(codes),
                    "API slowest answer during Postgres outage, s": round(slowest, 2)}
    fig.notes.append(f"{len(routes)} routes polled for 5 s; 200 again {recovered:.1f}s after "
                     "Postgres restarted")
    fig.record()
    assert set(codes) == {503}, codes
