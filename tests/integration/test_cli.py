"""The chatspace-jobs CLI against a real API server (HTTP), and in-process on the embedded
default: submit -> status -> list -> events -> artifacts -> cancel/retry, one-line user errors
with exit code 2, and the --wait exit codes (0 succeeded, 3 failed, 4 cancelled)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner

from tests.integration.api_server import TOKEN, serve


@pytest.fixture
def api(pg_url, monkeypatch):
    """A real API server on a fresh Postgres database (see api_server.serve)."""
    yield from serve(pg_url, monkeypatch)


@pytest.fixture
def run(monkeypatch):
    from app.settings import get_settings

    def invoke(*args, url: str | None = None, token: str | None = TOKEN):
        from cli.main import cli

        for key, value in (("CHATSPACE_API_URL", url), ("CHATSPACE_API_TOKEN", token)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return invoke


def ok_json(result):
    assert result.exit_code == 0, (result.exit_code, result.output)
    return json.loads(result.stdout)


def test_submit_status_list_events_artifacts_cancel(api, run, tmp_path):
    from app.storage import get_store

    sub = run("submit", "traits_sample", "--layers", "1,3", "--max-samples", "2", "--json",
              url=api.url)
    job = ok_json(sub)
    assert job["state"] == "queued" and job["params"] == {"layers": [1, 3], "max_samples": 2}
    assert api.enqueued.ids == [job["id"]]

    got = ok_json(run("status", job["id"], "--json", url=api.url))
    assert got["id"] == job["id"] and got["progress"]["items_total"] == 4  # + default, once
    active = ok_json(run("status", "--json", url=api.url))
    assert [j["id"] for j in active] == [job["id"]]
    listed = ok_json(run("list", "--state", "queued", "--json", url=api.url))
    assert [j["id"] for j in listed] == [job["id"]]
    assert ok_json(run("list", "--dataset", "roles_sample", "--json", url=api.url)) == []
    events = ok_json(run("events", job["id"], "--json", url=api.url))
    assert events[0]["data"]["to_state"] == "queued"

    key = f"{job['artifact_prefix']}/curious.safetensors"
    get_store(api.settings).put_bytes(key, b"stored-activations")
    listing = ok_json(run("artifacts", "ls", job["id"], "--json", url=api.url))
    assert [a["key"] for a in listing["artifacts"]] == [key]
    by_prefix = ok_json(run("artifacts", "ls", "chatspace/", "--json", url=api.url))
    assert [a["key"] for a in by_prefix["artifacts"]] == [key]
    out = tmp_path / "a.safetensors"
    got = run("artifacts", "get", key, "-o", str(out), url=api.url)
    assert got.exit_code == 0 and out.read_bytes() == b"stored-activations", got.output
    url = run("artifacts", "url", key, url=api.url)
    assert url.exit_code == 0 and url.stdout.strip().startswith("file://")

    # the human views render without errors and show the job
    for args in (("status", job["id"]), ("status",), ("list",), ("events", job["id"]),
                 ("artifacts", "ls", job["id"]), ("workers",), ("datasets", "ls")):
        r = run(*args, url=api.url)
        assert r.exit_code == 0, (args, r.output)
    assert job["id"][:12] in run("status", url=api.url).stdout
    assert "traits_sample" in run("datasets", "ls", url=api.url).stdout

    cancelled = ok_json(run("cancel", job["id"], "--json", url=api.url))
    assert cancelled["state"] == "cancelled"
    assert run("retry", job["id"], url=api.url).stdout.strip() == f"{job['id']} queued"
    assert api.enqueued.ids == [job["id"], job["id"]]


def test_workers_commands(api, run):
    from app import jobs

    with api.session() as s:
        jobs.upsert_worker(s, name="h-gpu0", model="tiny:qwen3", dtype="float32", state="busy",
                           gpu="0", queues=["chatspace.tiny_qwen3.float32"])
    (w,) = ok_json(run("workers", "--json", url=api.url))
    assert w["name"] == "h-gpu0" and w["alive"]
    r = run("workers", "release", "h-gpu0", url=api.url)
    assert r.exit_code == 0 and r.stdout.strip() == "release h-gpu0: done"
    r = run("workers", "reload", "h-gpu0", url=api.url)
    assert r.stdout.strip() == "reload h-gpu0: deferred until its job ends"
    assert api.control.calls == [("release", "h-gpu0"), ("reload", "h-gpu0")]


@pytest.mark.parametrize(("args", "needle"), [
    (("submit", "no_such_dataset"), "dataset"),
    (("submit", "traits_sample", "--dtype", "int8"), "dtype"),
    (("submit", "traits_sample", "--layers", "1,x"), "--layers"),
    (("submit", "traits_sample", "--layers", "9"), "params.layers[0]"),
    (("submit", "traits_sample", "--max-samples", "0"), "params.max_samples"),
    (("submit", "traits_sample", "--kind", "train"), "--kind"),
    (("status", "f" * 32), "job_id"),
    (("cancel", "f" * 32), "job_id"),
    (("artifacts", "get", "../x"), "key"),
])
def test_user_errors_are_one_line_and_exit_2(api, run, args, needle):
    r = run(*args, url=api.url)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    assert api.enqueued.ids == []


def test_bad_token_and_unreachable_api(api, run):
    r = run("list", url=api.url, token="wrong")
    assert r.exit_code == 2 and "Authorization" in r.stderr and "wrong" not in r.stderr
    from tests.conftest import free_port

    r = run("list", url=f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 1 and r.stderr.startswith("error: cannot reach the API")


def test_steer_file_is_sent_and_checked(api, run, tmp_path):
    ops = tmp_path / "steer.json"
    ops.write_text(json.dumps([{"op": "add", "layer": 2, "scale": 1.5, "vector": [0.1] * 128}]))
    job = ok_json(run("submit", "traits_sample", "--kind", "rollout", "--steer", str(ops),
                      "--json", url=api.url))
    assert job["params"]["steer"][0]["layer"] == 2
    ops.write_text(json.dumps({"steer": [{"op": "add", "layer": 2, "vector": [0.1] * 5}]}))
    r = run("submit", "traits_sample", "--kind", "rollout", "--steer", str(ops), url=api.url)
    assert r.exit_code == 2 and "params.steer[0].vector" in r.stderr
    ops.write_text("{broken")
    r = run("submit", "traits_sample", "--kind", "rollout", "--steer", str(ops), url=api.url)
    assert r.exit_code == 2 and "--steer" in r.stderr


def _finish_when_submitted(api, to: str, **kw) -> threading.Thread:
    """Move the job the CLI submits to ``to`` (through running when needed), from outside."""
    from app import jobs
    from app.models import Job

    def mover():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with api.session() as s:
                job = s.query(Job).first()
                if job is not None:
                    if to == "cancelled":
                        jobs.request_cancel(s, job_id=job.id)
                    else:
                        if to == "succeeded":
                            jobs.transition_job(s, job_id=job.id, to="running")
                        jobs.transition_job(s, job_id=job.id, to=to, **kw)
                    return
            time.sleep(0.2)

    t = threading.Thread(target=mover, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(("to", "kw", "code"), [
    ("succeeded", {}, 0),
    ("failed", {"failure_kind": "oom", "error": "CUDA out of memory at batch 1"}, 3),
    ("cancelled", {}, 4),
])
def test_wait_exit_codes(api, run, to, kw, code):
    mover = _finish_when_submitted(api, to, **kw)
    r = run("submit", "traits_sample", "--wait", url=api.url)
    mover.join(5)
    assert r.exit_code == code, r.output
    if to == "failed":
        assert "failed (oom): CUDA out of memory" in r.stderr


def test_in_process_on_the_embedded_default(run, monkeypatch):
    """No API URL: the same API in-process on the embedded SQLite, migrated on first use."""
    from app.settings import get_settings

    monkeypatch.delenv("CHATSPACE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    assert get_settings().embedded
    names = {d["name"] for d in ok_json(run("datasets", "ls", "--json"))}
    assert {"traits_sample", "roles_sample"} <= names
    job = ok_json(run("submit", "roles_sample", "--max-samples", "1", "--json"))
    assert job["state"] == "queued"
    # three roles and the default persona, captured once
    assert ok_json(run("status", job["id"], "--json"))["progress"]["items_total"] == 4
    assert [j["id"] for j in ok_json(run("list", "--json"))] == [job["id"]]
    kinds = [e["kind"] for e in ok_json(run("events", job["id"], "--json"))]
    assert kinds[0] == "state" and "enqueued" in kinds  # the real dispatch ran after commit
    r = run("submit", "nope")
    assert r.exit_code == 2 and "dataset" in r.stderr
    assert ok_json(run("cancel", job["id"], "--json"))["state"] == "cancelled"
    from app.db import dispose_all

    dispose_all()


@pytest.fixture
def api_s3(pg_url, s3_bucket, monkeypatch):
    """The API on Postgres with artifacts in an S3-compatible server (presigned URLs)."""
    yield from serve(pg_url, monkeypatch)


def test_artifacts_on_s3_download_through_presigned_urls(api_s3, run, tmp_path):
    from app.storage import get_store

    api = api_s3
    key = "chatspace/tiny_qwen3/traits_sample/float32/j1/curious.safetensors"
    get_store(api.settings).put_bytes(key, b"activations-on-s3")
    url = run("artifacts", "url", key, "--expires", "120", url=api.url)
    assert url.exit_code == 0 and url.stdout.startswith("http") and "Signature" in url.stdout
    out = tmp_path / "got.safetensors"
    r = run("artifacts", "get", key, "-o", str(out), url=api.url)
    assert r.exit_code == 0 and out.read_bytes() == b"activations-on-s3", r.output
    assert ok_json(run("ready", url=api.url)) == {
        "status": "ok", "checks": {"database": "ok", "broker": "ok", "store": "ok"}}
    r = run("artifacts", "get", "chatspace/missing", "-o", str(tmp_path / "m"), url=api.url)
    assert r.exit_code == 2 and "key" in r.stderr and not (tmp_path / "m").exists()


def test_worker_command_hands_its_options_to_the_workers_runtime(run, monkeypatch):
    import workers.cli

    seen = {}
    monkeypatch.setattr(workers.cli, "run_worker", lambda **kw: seen.update(kw) or 0)
    r = run("worker", "--model", "tiny:qwen3", "--dtype", "float32", "--gpus", "0,1",
            "--max-jobs", "2", "--exit-when-idle")
    assert r.exit_code == 0, r.output
    assert seen == {"model": "tiny:qwen3", "dtype": "float32", "gpus": "0,1", "queues": None,
                    "name": None, "max_jobs": 2, "exit_when_idle": True, "judge_model": None}


def test_ready_reports_the_broken_dependency(api, run, monkeypatch):
    """In-process on Postgres with an unreachable broker: `ready` names it and exits 1."""
    monkeypatch.setenv("CHATSPACE_BROKER_URL", "redis://127.0.0.1:1/0")
    r = run("ready")
    assert r.exit_code == 1, r.output
    checks = json.loads(r.stdout)["checks"]
    assert checks["database"] == "ok" and checks["broker"].startswith("error")


def test_api_command_serves_with_the_real_dispatch(pg_url, redis_url, tmp_path):
    """`chatspace-jobs api` in its own process: migrated Postgres, Redis broker, the workers'
    dispatch wired in (the job gets an ``enqueued`` event and a message on its queue)."""
    import os
    import subprocess
    import sys

    import httpx
    import redis

    from app.db import upgrade
    from tests.conftest import ROOT, free_port, wait_port

    upgrade(pg_url)
    port = free_port()
    env = {**os.environ, "CHATSPACE_DATABASE_URL": pg_url, "CHATSPACE_BROKER_URL": redis_url,
           "CHATSPACE_API_TOKENS": json.dumps([TOKEN]), "CHATSPACE_DATA_DIR": str(tmp_path)}
    with open(tmp_path / "api.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()",
                                 "api", "--port", str(port)], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=60)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert http.get("/healthz").status_code == 200
        job = http.post("/jobs", json={"dataset": "traits_sample", "params": {"max_samples": 1}})
        assert job.status_code == 201, job.text
        kinds = [e["kind"] for e in http.get(f"/jobs/{job.json()['id']}/events").json()["events"]]
        assert "enqueued" in kinds and "waiting" in kinds  # no live worker serves it yet
        assert redis.Redis.from_url(redis_url).llen("chatspace.tiny_qwen3.float32") == 1
        job_id = job.json()["id"]
        assert http.post(f"/jobs/{job_id}/cancel").json()["state"] == "cancelled"
        assert http.post(f"/jobs/{job_id}/retry").json()["state"] == "queued"
        sent = [e["data"]["reason"] for e in http.get(f"/jobs/{job_id}/events").json()["events"]
                if e["kind"] == "enqueued"]
        assert sent == ["submitted", "retry"], sent  # a retry is recorded as a retry
        r = http.post("/workers/nobody/release")
        assert r.status_code == 404  # control is wired (not 503), the worker is unknown
    finally:
        proc.terminate()
        proc.wait(20)
    text = (tmp_path / "api.log").read_text()
    assert TOKEN not in text and "Traceback" not in text, text[-2000:]
