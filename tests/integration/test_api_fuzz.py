"""Property-based fuzz of the running API from its own OpenAPI spec (schemathesis): valid and
invalid inputs for every operation, authenticated, against real Postgres. No answer may be a
5xx, and every error answer has the one error shape. Bounded: a few hundred cases in all."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.integration.api_server import TOKEN, serve

EXAMPLES_PER_OPERATION = 12  # x 2 modes x 15 operations: at most 360 cases
BUDGET_S = 60.0
# /readyz answers 503 when a dependency is down by contract; all are up here, so no
# operation may answer 5xx.
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(pg_url, monkeypatch):
    yield from serve(pg_url, monkeypatch)


def _seed(api) -> str:
    """Rows for the fuzz to find: a job with items and events, a worker, an artifact."""
    from app import jobs
    from app.storage import get_store

    with api.session() as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                              dtype="float32", personas=["curious", "optimistic"],
                              artifact_prefix="chatspace/tiny_qwen3/traits_sample/float32/j")
        jobs.upsert_worker(s, name="w0", model="tiny:qwen3", dtype="float32", state="idle")
        job_id = job.id
    get_store(api.settings).put_bytes("chatspace/tiny_qwen3/traits_sample/float32/j/a.bin", b"x")
    return job_id


def test_no_input_gives_a_server_error(api):
    _seed(api)
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", headers=AUTH)
    failures: list[str] = []
    seen = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            if time.monotonic() - started > BUDGET_S:
                break

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal seen
                seen += 1
                resp = case.call(base_url=api.url, headers=AUTH, timeout=15)
                if resp.status_code >= 500:
                    failures.append(f"{resp.status_code} {case.method} {case.formatted_path} "
                                    f"query={case.query!r} body={str(case.body)[:200]}: "
                                    f"{resp.text[:200]}")
                elif resp.status_code >= 400:
                    body = resp.json()
                    assert {"error", "message", "field", "hint"} <= set(body), resp.text

            try:
                check()
            except Unsatisfiable:  # no input of this operation can be made invalid (e.g. /healthz)
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert seen >= 100, f"only {seen} cases ran"
    assert not failures, "\n".join(failures[:10])
