"""Malformed submissions and dataset files against the running service.

Every one is refused with a 4xx whose body names the field (``field`` in the one error
shape), nothing is written or enqueued (job rows and Redis queue lengths unchanged), and the
service stays healthy afterwards.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.reliability.checks import Figures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OK = {"kind": "capture", "dataset": "traits_sample", "model": "tiny:qwen3", "dtype": "float32",
      "params": {"max_samples": 2, "max_tokens": 4}}


def _with(**over):
    body = json.loads(json.dumps(OK))
    params = over.pop("params", None)
    body.update(over)
    if params is not None:
        body["params"] = {**body["params"], **params}
    return body


def _drop(key):
    body = json.loads(json.dumps(OK))
    body.pop(key)
    return body


ADD = {"op": "add", "layer": 1, "scale": 1.0}
BODIES = {  # name -> (body, field the error must name: exact or prefix)
    "unknown dataset": (_with(dataset="no_such_dataset"), "dataset"),
    "path traversal": (_with(dataset="../../etc"), "dataset"),
    "absolute path dataset": (_with(dataset="/etc/passwd"), "dataset"),
    "dataset oversized": (_with(dataset="d" * 5000), "dataset"),
    "dataset missing": (_drop("dataset"), "dataset"),
    "dataset not a string": (_with(dataset=["traits_sample"]), "dataset"),
    "bad dtype": (_with(dtype="float8"), "dtype"),
    "bad kind": (_with(kind="train"), "kind"),
    "model with ..": (_with(model="../models/x"), "model"),
    "model oversized": (_with(model="m" * 5000), "model"),
    "layer out of range": (_with(params={"layers": [0, 999]}), "params.layers[1]"),
    "negative layer": (_with(params={"layers": [-1]}), "params.layers[0]"),
    "duplicate layer": (_with(params={"layers": [1, 1]}), "params.layers[1]"),
    "empty layers": (_with(params={"layers": []}), "params.layers"),
    "layers as string": (_with(params={"layers": "some"}), "params.layers"),
    "max_samples zero": (_with(params={"max_samples": 0}), "params.max_samples"),
    "max_tokens huge": (_with(params={"max_tokens": 10**9}), "params.max_tokens"),
    "batch_size float": (_with(params={"batch_size": 2.5}), "params.batch_size"),
    "temperature negative": (_with(params={"temperature": -1}), "params.temperature"),
    "top_p zero": (_with(params={"top_p": 0}), "params.top_p"),
    "seed negative": (_with(params={"seed": -5}), "params.seed"),
    "unknown param": (_with(params={"max_sample": 3}), "params.max_sample"),
    "unknown top-level field": (_with(priority=9), "priority"),
    "steer on capture": (_with(params={"steer": [{**ADD, "vector": [0.1] * 128}]}),
                         "params.steer"),
    "wrong-size vector": (_with(kind="rollout", params={"steer": [{**ADD, "vector": [0.1] * 7}]}),
                          "params.steer[0].vector"),
    "NaN in vector": (_with(kind="rollout", params={"steer": [{**ADD, "vector": [0.1] * 127
                                                               + ["NaN"]}]}),
                      "params.steer[0].vector"),
    "unknown steer op": (_with(kind="rollout", params={"steer": [{**ADD, "op": "mul",
                                                                   "vector": [0.1] * 128}]}),
                         "params.steer[0].op"),
    "steer layer out of range": (_with(kind="rollout", params={"steer": [
        {**ADD, "layer": 64, "vector": [0.1] * 128}]}), "params.steer[0].layer"),
    "steer from unknown job": (_with(kind="rollout", params={"steer": [
        {**ADD, "from": {"job_id": "nope", "vector": "pos_neg"}}]}), "params.steer[0].from"),
    "cap min above max": (_with(kind="rollout", params={"steer": [
        {"op": "cap", "layer": 1, "min": 2, "max": 1, "vector": [0.1] * 128}]}),
        "params.steer[0].min"),
}
DATASET_FILES = {  # dataset folder -> {relative path: content}; the error names the dataset
    "ds_bad_json": {"instructions/a.json": "{not json", "questions.jsonl": '{"question":"q","id":0}\n'},
    "ds_no_instruction": {"instructions/a.json": '{"questions": ["q"]}',
                          "questions.jsonl": '{"question":"q","id":0}\n'},
    "ds_bad_questions": {"instructions/a.json": '{"instruction": [{"pos": "p", "neg": "n"}]}',
                         "questions.jsonl": "[1, 2]\n"},
    "ds_instruction_not_list": {"instructions/a.json": '{"instruction": "be nice"}',
                                "questions.jsonl": '{"question":"q","id":0}\n'},
    "ds_only_default": {"instructions/default.json": '{"instruction": [{"pos": ""}]}',
                        "questions.jsonl": '{"question":"q","id":0}\n'},
    "ds_not_utf8": {"instructions/a.json": b"\xff\xfe\x00garbage",
                    "questions.jsonl": '{"question":"q","id":0}\n'},
}


def _queued_messages(redis_url: str) -> int:
    import redis

    r = redis.Redis.from_url(redis_url)
    return sum(r.llen(k) for k in r.keys("*") if r.type(k) == b"list")


def _job_count(http) -> int:
    return len(http.get("/jobs", params={"limit": 1000}).json()["jobs"])


def test_malformed_input_refused_naming_the_field(stack, tmp_path):
    from app.settings import get_settings

    root = get_settings().datasets_root
    for name, files in DATASET_FILES.items():
        for rel, content in files.items():
            path = tmp_path / "datasets" / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    assert str(tmp_path / "datasets") == str(root)
    jobs_before, queued_before = _job_count(stack.http), _queued_messages(stack.redis.url)
    failures = []

    def expect(name, resp, field):
        body = resp.json() if resp.headers.get("content-type", "").startswith(
            "application/json") else {}
        named = str(body.get("field") or "")
        if not (400 <= resp.status_code < 500 and named.startswith(field)):
            failures.append(f"{name}: {resp.status_code} field={named!r} {resp.text[:200]}")

    for name, (body, field) in BODIES.items():
        expect(name, stack.http.post("/jobs", json=body), field)
    for name in DATASET_FILES:
        expect(f"dataset file {name}", stack.http.post("/jobs", json=_with(dataset=name)),
               "dataset")
    raw = {"malformed JSON": b'{"dataset": "traits_sample",', "JSON array": b"[1, 2]",
           "not JSON at all": b"\x00\x01binary"}
    for name, data in raw.items():
        r = stack.http.post("/jobs", content=data, headers={"content-type": "application/json"})
        # A JSON decode error names where the body broke (the API reports "[<char offset>]").
        if not 400 <= r.status_code < 500 or not r.json().get("field"):
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    for name, headers in {"missing auth": {}, "wrong token": {"Authorization": "Bearer nope"},
                          "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"}}.items():
        r = httpx.post(f"{stack.api_url}/jobs", json=OK, headers=headers, timeout=30)
        if r.status_code != 401 or r.json().get("field") != "Authorization":
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    cases = len(BODIES) + len(DATASET_FILES) + len(raw) + 3
    assert cases >= 30
    assert not failures, "\n".join(failures)
    assert _job_count(stack.http) == jobs_before, "a malformed submission wrote a job"
    assert _queued_messages(stack.redis.url) == queued_before, "a malformed submission enqueued"
    assert stack.http.get("/healthz").status_code == 200
    ready = stack.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    good = stack.submit()  # and a good submission still goes through
    assert stack.http.get(f"/jobs/{good}").json()["state"] == "queued"
    Figures(scenario=f"bad input ({cases} malformed cases)", notes=[
        f"{cases} refused with 4xx naming the field; 0 jobs written, 0 messages enqueued"]
            ).record()
