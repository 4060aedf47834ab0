"""The cap form of a sweep with a real Celery worker, Postgres, Redis and the S3-compatible
server: a capture job over a roles dataset, then a sweep capping on its assistant axis at
three percentiles. The transformers backend runs the model (it starts in a second; the vLLM
path of the fan-out is covered by test_sweep_e2e.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration import worker_helpers as h
from tests.integration.test_worker_e2e import services  # noqa: F401 - the fixture
from tests.scripted_openai import Action, ScriptedServer, answer_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _submit(kind: str, params: dict) -> str:
    from app.api.schemas import JobSubmit
    from app.db import session_scope
    from app.settings import get_settings
    from app.submit import submit_job
    from workers.dispatch import enqueue_job

    with session_scope() as s:
        job = submit_job(s, request=JobSubmit(kind=kind, dataset="roles_sample",
                                              model=h.MODEL, dtype=h.DTYPE, params=params),
                         settings=get_settings(), enqueue=lambda _id: None)
        job_id = str(job.id)
    enqueue_job(job_id)
    return job_id


def _judge_reply(answer: str) -> int:
    return len(answer) % 5  # 0..2 score, 3 too (roles 0..3), 4 off the scale: unparseable


def test_cap_sweep_floors_the_axis_projection_at_the_percentiles(services,  # noqa: F811
                                                                 monkeypatch, request):
    from app import sweeps
    from app.artifacts import read_persona_artifact
    from app.settings import get_settings
    from app.storage import get_store
    from app.sweeps import axis_from_means, cap_thresholds

    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    # the judge: a scripted OpenAI-compatible server on 127.0.0.1 (tests/scripted_openai.py)
    # scoring each answer by its length on the roles scale, 3 (off the 0..3 scale) unparseable
    srv = ScriptedServer(lambda req, n: Action(
        text=str(_judge_reply(answer_of(req["messages"][0]["content"])))))
    srv.__enter__()
    request.addfinalizer(lambda: srv.__exit__(None, None, None))
    monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", srv.base_url)
    common = {"max_samples": 4, "max_tokens": 6, "temperature": 0.0, "seed": 0}
    capture_id = _submit("capture", {**common, "layers": [1, 2]})
    procs.append(h.start_worker("sweep-cap", logs))
    assert h.wait_for(capture_id, log_dir=logs, worker=procs[-1])["state"] == "succeeded"
    sweep_id = _submit("rollout", {**common, "sweep": {
        "cap_axis": capture_id, "layers": [2], "cap_percentiles": [1, 5, 25]}})
    row = h.wait_for(sweep_id, log_dir=logs, worker=procs[-1])
    assert row["state"] == "succeeded", row

    store = get_store(get_settings())
    # the thresholds the worker used are the percentiles of the stored projections
    caps = h.job_row(capture_id)["items"]
    per = {}
    for item in caps:
        art = read_persona_artifact(store.get_bytes(item["key"], expect_sha256=item["sha256"]))
        per[item["persona"]] = (art.activations, list(art.keys))
    idx = [int(x) for x in art.metadata["layers"]].index(2)
    axis, _ = axis_from_means(per, idx)
    want = dict(zip([1.0, 5.0, 25.0], cap_thresholds(per, idx, axis, [1, 5, 25])))
    for item in row["items"]:
        summary = json.loads(store.get_bytes(item["key"], expect_sha256=item["sha256"]))
        points = summary["points"]
        assert [p["percentile"] for p in points] == [1.0, 5.0, 25.0]
        for p in points:
            assert p["threshold"] == pytest.approx(want[p["percentile"]], rel=1e-6)
            lines = [json.loads(x) for x in store.get_bytes(p["responses_key"]).decode()
                     .splitlines()]
            assert len(lines) == p["n"] == 4
            (op,) = lines[0]["steer"]
            assert op["op"] == "cap" and op["min"] == p["threshold"]
            assert op["axis"]["job_id"] == capture_id
            assert np.isclose(op["axis"]["norm"], float(np.linalg.norm(axis)))
        assert all(p["judge_mean"] is None for p in points)
    manifest = store.read_manifest(row["items"][0]["key"].rsplit("/sweep/", 1)[0])
    assert {"sweep_summary", "sweep_plot"} <= {e["kind"] for e in manifest["artifacts"]}

    # the same grid with --judge: every point judged by the worker through the scripted server
    judged_id = _submit("rollout", {**common, "judge": "judge-m", "judge_reply_retries": 1,
                                    "sweep": {"cap_axis": capture_id, "layers": [2],
                                              "cap_percentiles": [1, 5, 25]}})
    row = h.wait_for(judged_id, log_dir=logs, worker=procs[-1])
    assert row["state"] == "succeeded", row
    sent = 0
    for item in row["items"]:
        summary = json.loads(store.get_bytes(item["key"], expect_sha256=item["sha256"]))
        assert summary["scores"]["judge"]["computed"] is True
        assert summary["scores"]["judge"]["model"] == "judge-m"
        for p in summary["points"]:
            replies = [_judge_reply(json.loads(x)["response"]) for x in
                       store.get_bytes(p["responses_key"]).decode().splitlines()]
            scored = [v for v in replies if v <= 3]
            assert p["judge_mean"] == (pytest.approx(sum(scored) / len(scored)) if scored
                                       else None)
            assert p["refusal_rate"] == (pytest.approx(scored.count(0) / len(scored))
                                         if scored else None)
            j = p["judge"]
            assert j["unparseable"] == len(replies) - len(scored)  # counted, not dropped
            assert j["judged"] + j["unparseable"] == p["n"] == 4
            assert j["requests"] == len(scored) + 2 * j["unparseable"]  # 1 reply retry
            assert j["tokens"]["total"] == 13 * j["requests"]
            sent += j["requests"]
    assert sent == len(srv.received)
    table = json.loads(store.get_bytes(sweeps.summary_keys(
        row["items"][0]["key"].rsplit("/sweep/", 1)[0])[0]))
    assert table["scores"]["judge"]["computed"] and table["plotted"][0] == "judge_mean"
    print("sample row:", json.dumps(table["rows"][0], sort_keys=True))
