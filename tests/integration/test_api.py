"""The status API as a real server on real Postgres: submit validation (every bad input is a
4xx naming the field, and nothing is written or enqueued), job lifecycle routes, workers,
artifacts, health, metrics, auth, and no secret in any answer or log line."""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import func, select

from tests.integration.api_server import S3_SECRET, TOKEN, serve


@pytest.fixture
def api(pg_url, monkeypatch):
    """A real API server on a fresh Postgres database (see api_server.serve)."""
    yield from serve(pg_url, monkeypatch)

OK = {"kind": "capture", "dataset": "traits_sample", "model": "tiny:qwen3", "dtype": "float32",
      "params": {"layers": [1, 3], "max_samples": 2, "batch_size": 4}}
PERSONAS = {"curious", "optimistic", "sycophantic"}  # traits_sample without 'default'


def job_count(api) -> int:
    from app.models import Job

    with api.session() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def rollout(*ops, **params):
    return {**OK, "kind": "rollout", "params": {"steer": list(ops), **params}}


def add_op(**kw):
    return {"op": "add", "layer": 1, "scale": 2.0, "vector": [0.5] * 128, **kw}


def succeeded_capture(api, *, layers=(1, 3), personas=PERSONAS) -> str:
    """A capture job moved to succeeded with one recorded artifact per persona."""
    from app import jobs

    with api.session() as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                              dtype="float32", params={"layers": list(layers)},
                              personas=sorted(PERSONAS))
        job_id = job.id
        for p in personas:
            jobs.record_artifact(s, job_id=job_id, key=f"cs/x/{job_id}/{p}.safetensors",
                                 sha256="0" * 64, size=10)
        jobs.transition_job(s, job_id=job_id, to="running")
        jobs.transition_job(s, job_id=job_id, to="succeeded")
    return job_id


BAD = [({**OK, **change}, field) for change, field in [
    ({"dataset": "no_such_dataset"}, "dataset"),
    ({"dataset": "../etc"}, "dataset"),
    ({"kind": "train"}, "kind"),
    ({"dtype": "int8"}, "dtype"),
    ({"model": "Qwen/Not-Allowed"}, "model"),
    ({"model": "bad model name"}, "model"),
    ({"params": {"layers": [4]}}, "params.layers[0]"),
    ({"params": {"layers": [0, -1]}}, "params.layers[1]"),
    ({"params": {"layers": []}}, "params.layers"),
    ({"params": {"layers": [2, 2]}}, "params.layers[1]"),
    ({"params": {"layers": "some"}}, "params.layers"),
    ({"params": {"max_samples": 0}}, "params.max_samples"),
    ({"params": {"max_samples": "5"}}, "params.max_samples"),
    ({"params": {"batch_size": -1}}, "params.batch_size"),
    ({"params": {"max_tokens": 10**9}}, "params.max_tokens"),
    ({"params": {"temperature": -0.5}}, "params.temperature"),
    ({"params": {"seed": -1}}, "params.seed"),
    ({"params": {"max_sample": 3}}, "params.max_sample"),
    ({"params": {"steer": [add_op()]}}, "params.steer"),  # capture jobs are not steered
    ({"params": {"capture": True}}, "params.capture"),
]]
BAD_ROLLOUT = [
    (rollout({"op": "boost", "layer": 1, "vector": [1.0] * 128}), "params.steer[0].op"),
    (rollout(add_op(layer=9)), "params.steer[0].layer"),
    (rollout(add_op(), add_op(vector=[1.0, 2.0, 3.0])), "params.steer[1].vector"),
    (rollout(add_op(vector=[1.0] * 127 + ["x"])), "params.steer[0].vector[127]"),
    (rollout({"op": "ablate", "layer": 0, "vector": [0.0] * 128}), "params.steer[0].vector"),
    (rollout({"op": "cap", "layer": 0, "vector": [1.0] * 128}), "params.steer[0].min"),
    (rollout({"op": "cap", "layer": 0, "vector": [1.0] * 128, "min": 2, "max": 1}),
     "params.steer[0].min"),
    (rollout(add_op(scale=1e9)), "params.steer[0].scale"),
    (rollout({"op": "add", "layer": 1}), "params.steer[0].vector"),
    (rollout(add_op(colour="red")), "params.steer[0].colour"),
    (rollout(add_op(vector=None, **{"from": {"job_id": "0" * 32, "vector": "pos_neg"}})),
     "params.steer[0].from.job_id"),
    (rollout(add_op(vector=None, **{"from": {"job_id": "abc"}})), "params.steer[0].from.vector"),
    (rollout("not an op"), "params.steer[0]"),
]


@pytest.mark.parametrize(("change", "field"), BAD + BAD_ROLLOUT,
                         ids=[f for _, f in BAD] + [f"rollout-{f}" for _, f in BAD_ROLLOUT])
def test_bad_submission_names_the_field_and_enqueues_nothing(api, change, field):
    r = api.http.post("/jobs", json=change)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()
    assert err["field"] == field, err
    assert err["error"] and err["message"]
    assert api.enqueued.ids == []
    assert job_count(api) == 0


def test_nan_in_a_vector_is_refused(api):
    body = rollout(add_op(vector=[float("nan")] + [1.0] * 127))
    r = api.http.post("/jobs", content=json.dumps(body),
                      headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "params.steer[0].vector[0]", r.text
    assert api.enqueued.ids == [] and job_count(api) == 0


def test_missing_dataset_and_malformed_json(api):
    r = api.http.post("/jobs", json={"kind": "capture"})
    assert r.status_code == 422 and r.json()["field"] == "dataset"
    r = api.http.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid"
    assert api.enqueued.ids == [] and job_count(api) == 0


def test_layers_checked_against_what_a_worker_reported(api):
    from app import jobs

    with api.session() as s:
        jobs.upsert_worker(s, name="w1", model="org/reported", dtype="float16", state="idle",
                           model_info={"num_layers": 2, "hidden_size": 8})
    r = api.http.post("/jobs", json={**OK, "model": "org/reported", "params": {"layers": [2]}})
    assert r.status_code == 422 and r.json()["field"] == "params.layers[0]"
    assert "worker w1" in r.json()["hint"]
    bad_vec = rollout(add_op(layer=1, vector=[1.0] * 128))
    r = api.http.post("/jobs", json={**bad_vec, "model": "org/reported"})
    assert r.json()["field"] == "params.steer[0].vector" and "hidden size 8" in r.json()["message"]
    ok = api.http.post("/jobs", json={**OK, "model": "org/reported", "params": {"layers": [1]}})
    assert ok.status_code == 201, ok.text
    assert api.enqueued.ids == [ok.json()["id"]]


def test_steering_references_must_be_a_succeeded_capture_with_artifacts(api):
    from app import jobs

    with api.session() as s:
        queued = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                                 dtype="float32", personas=sorted(PERSONAS)).id
    partial = succeeded_capture(api, personas={"curious"})
    good = succeeded_capture(api)

    def ref(**src):
        return rollout({"op": "add", "layer": 1, "scale": 3.0,
                        "from": {"vector": "pos_neg", **src}})

    before = job_count(api)
    for body, field in ((ref(job_id=queued), "params.steer[0].from.job_id"),
                        (ref(job_id=partial), "params.steer[0].from.persona"),
                        (ref(job_id=good, layer=2), "params.steer[0].from.layer")):
        r = api.http.post("/jobs", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert job_count(api) == before and api.enqueued.ids == []
    ok = api.http.post("/jobs", json=ref(job_id=partial, persona="curious"))
    assert ok.status_code == 201, ok.text
    ok2 = api.http.post("/jobs", json=ref(job_id=good))
    assert ok2.status_code == 201, ok2.text
    assert ok2.json()["params"]["steer"][0]["from"]["job_id"] == good
    assert api.enqueued.ids == [ok.json()["id"], ok2.json()["id"]]


def test_job_lifecycle_routes(api):
    r = api.http.post("/jobs", json=OK)
    assert r.status_code == 201, r.text
    job = r.json()
    assert api.enqueued.ids == [job["id"]]
    assert job["state"] == "queued" and job["params"]["layers"] == [1, 3]
    # a submitted capture job also captures the default persona, once
    assert {p["persona"] for p in job["progress"]["personas"]} == PERSONAS | {"default"}
    assert job["artifact_prefix"].endswith(f"tiny_qwen3/traits_sample/float32/{job['id']}")

    got = api.http.get(f"/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["progress"]["items_total"] == 4  # + default, once
    assert [j["id"] for j in api.http.get("/jobs", params={"state": "queued"}).json()["jobs"]] \
        == [job["id"]]
    assert api.http.get("/jobs", params={"dataset": "roles_sample"}).json()["jobs"] == []
    assert api.http.get("/jobs", params={"kind": "capture", "model": "tiny:qwen3"}).json()["jobs"]
    events = api.http.get(f"/jobs/{job['id']}/events").json()["events"]
    assert events[0]["kind"] == "state" and events[0]["data"]["to_state"] == "queued"

    assert api.http.post(f"/jobs/{job['id']}/retry").status_code == 409  # not failed yet
    cancelled = api.http.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    retried = api.http.post(f"/jobs/{job['id']}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    assert api.enqueued.ids == [job["id"], job["id"]]
    assert api.enqueued.reasons == ["submitted", "retry"]  # a retry is sent as a retry

    missing = api.http.get("/jobs/" + "f" * 32)
    assert missing.status_code == 404 and missing.json()["field"] == "job_id"
    assert api.http.post("/jobs/" + "f" * 32 + "/cancel").status_code == 404


def test_workers_list_and_remote_control(api):
    from app import jobs

    with api.session() as s:
        jobs.upsert_worker(s, name="gpu-host-gpu0", model="tiny:qwen3", dtype="float32",
                           state="idle", gpu="0", queues=["chatspace.tiny_qwen3.float32"],
                           memory={"used": 2 * 2**30, "total": 80 * 2**30, "baseline": 2**30},
                           model_info={"num_layers": 4, "hidden_size": 128})
    (w,) = api.http.get("/workers").json()["workers"]
    assert w["name"] == "gpu-host-gpu0" and w["alive"] and w["gpu"] == "0"
    assert w["memory"]["total"] == 80 * 2**30 and w["heartbeat_age_s"] < 30
    r = api.http.post("/workers/gpu-host-gpu0/release")
    assert r.status_code == 200 and r.json()["replies"][0]["ok"] is True
    r = api.http.post("/workers/gpu-host-gpu0/reload")
    assert r.json()["replies"][0]["deferred"] is True
    assert api.control.calls == [("release", "gpu-host-gpu0"), ("reload", "gpu-host-gpu0")]
    r = api.http.post("/workers/nobody/release")
    assert r.status_code == 404 and r.json()["field"] == "name"
    assert len(api.control.calls) == 2


def test_worker_control_unconfigured_is_503(api):
    from fastapi.testclient import TestClient

    from app.api import create_app

    with TestClient(create_app(api.settings)) as c:
        r = c.post("/workers/w/release", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 503 and r.json()["error"] == "no_worker_control"


def test_artifacts_routes(api):
    from app.storage import get_store

    job = api.http.post("/jobs", json=OK).json()
    key = f"{job['artifact_prefix']}/curious.safetensors"
    get_store(api.settings).put_bytes(key, b"tensor-bytes")
    listing = api.http.get("/artifacts", params={"job": job["id"]}).json()
    assert [a["key"] for a in listing["artifacts"]] == [key]
    by_prefix = api.http.get("/artifacts", params={"prefix": "chatspace/"}).json()
    assert [a["key"] for a in by_prefix["artifacts"]] == [key]
    meta = api.http.get("/artifacts/meta", params={"key": key}).json()
    assert meta["size"] == len(b"tensor-bytes") and meta["sha256"]
    url = api.http.get("/artifacts/url", params={"key": key}).json()["url"]
    assert url.startswith("file://") and url.endswith("curious.safetensors")
    # the bucket holds more than artifacts (datasets, say): none of it is served
    get_store(api.settings).put_bytes("datasets/traits/a.json", b"{}")
    assert [a["key"] for a in api.http.get("/artifacts").json()["artifacts"]] == [key]
    refused = api.http.get("/artifacts/url", params={"key": "datasets/traits/a.json"}).json()
    assert "artifacts prefix" in refused["message"] and "chatspace/" in refused["hint"]
    for path, params, status, field in (
            ("/artifacts/meta", {"key": "../etc/passwd"}, 422, "key"),
            ("/artifacts/meta", {"key": "a\x00b"}, 422, "key"),
            ("/artifacts/meta", {"key": "chatspace/none"}, 404, "key"),
            ("/artifacts/url", {"key": "chatspace/none"}, 404, "key"),
            ("/artifacts", {"prefix": "/abs"}, 422, "prefix"),
            ("/artifacts", {"prefix": "datasets/"}, 422, "prefix"),
            ("/artifacts", {"prefix": "chats"}, 422, "prefix"),
            ("/artifacts/meta", {"key": "datasets/traits/a.json"}, 422, "key"),
            ("/artifacts/url", {"key": "datasets/traits/a.json"}, 422, "key"),
            ("/artifacts/content", {"key": "datasets/traits/a.json"}, 422, "key"),
            ("/artifacts", {"job": "0" * 32}, 422, "job")):
        r = api.http.get(path, params=params)
        assert r.status_code == status and r.json()["field"] == field, (path, params, r.text)


def test_health_readiness_metrics(api):
    import httpx

    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok", "checks": {}}
    ready = api.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
    api.http.post("/jobs", json=OK)
    text = api.http.get("/metrics").text
    assert 'chatspace_jobs{state="queued"} 1' in text
    assert "chatspace_items_done_total 0" in text and "chatspace_oom_failures_total 0" in text
    assert 'chatspace_queue_depth{queue="chatspace.tiny_qwen3.float32"} 0' in text


def test_readiness_names_the_broken_dependency(api, monkeypatch):
    from fastapi.testclient import TestClient

    from app.api import create_app

    broken = api.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        r = c.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 503
    assert r.json()["checks"]["broker"].startswith("error") and r.json()["checks"]["database"] == "ok"


def test_auth_is_required_everywhere_but_health(api):
    import httpx

    paths = [("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/abc"), ("GET", "/workers"),
             ("GET", "/artifacts"), ("GET", "/metrics"), ("GET", "/readyz"),
             ("GET", "/datasets"), ("POST", "/workers/w/release"), ("GET", "/openapi.json"),
             ("GET", "/docs")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        for method, path in paths:
            r = httpx.request(method, api.url + path, headers=headers, json=OK)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"] == "unauthorized" and r.json()["field"] == "Authorization"
            assert r.headers["www-authenticate"] == "Bearer"
    assert api.enqueued.ids == [] and job_count(api) == 0
    ok = httpx.get(api.url + "/jobs", headers={"Authorization": "Bearer another-token"})
    assert ok.status_code == 200
    assert httpx.get(api.url + "/healthz").status_code == 200
    assert api.http.get("/openapi.json").json()["paths"]["/jobs"]
    assert "swagger" in api.http.get("/docs").text.lower()


def test_docs_open_only_when_the_setting_says_so(api):
    from fastapi.testclient import TestClient

    from app.api import create_app

    opened = api.settings.model_copy(update={"api_docs_public": True})
    with TestClient(create_app(opened)) as c:
        assert c.get("/openapi.json").json()["paths"]["/jobs"]
        assert c.get("/docs").status_code == 200
        assert c.get("/jobs").status_code == 401  # the routes themselves stay closed


def test_no_secret_in_any_answer_or_log_line(api, caplog):
    import httpx

    caplog.set_level(logging.DEBUG)
    answers = [api.http.get("/openapi.json").text,
               httpx.get(api.url + "/jobs", headers={"Authorization": f"Bearer {TOKEN}x"}).text,
               api.http.get("/readyz").text, api.http.get("/metrics").text,
               api.http.post("/jobs", json={**OK, "params": {"seed": S3_SECRET}}).text]
    assert repr(api.settings).count(TOKEN) == 0 and S3_SECRET not in repr(api.settings)
    for text in answers:
        assert TOKEN not in text and S3_SECRET not in text, text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and S3_SECRET not in logged



def test_enqueue_runs_after_commit_and_its_failure_keeps_the_job(api):
    """The enqueue callback sees the job committed (read from another connection); an
    enqueue that raises still leaves a queued job for the reconciler."""
    from app.api import create_app
    from app.models import Job
    from tests.conftest import free_port
    from tests.integration.api_server import start

    seen = []

    def enqueue(job_id):
        with api.session() as s:  # a different connection: sees only committed rows
            job = s.get(Job, job_id)
            seen.append((job_id, job.state if job else None))
        raise ConnectionError("broker down")

    port = free_port()
    server, thread = start(create_app(api.settings, enqueue=enqueue), port)
    try:
        import httpx

        r = httpx.post(f"http://127.0.0.1:{port}/jobs", json=OK,
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    finally:
        server.should_exit = True
        thread.join(10)
    assert r.status_code == 201, r.text
    assert seen == [(r.json()["id"], "queued")]
    assert job_count(api) == 1
