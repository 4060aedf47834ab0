"""Sweep submission through the real API server on real Postgres: every bad grid is a 4xx
naming the field with nothing written or enqueued; a good one reports its grid size."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.integration.api_server import serve

PERSONAS = ("curious", "optimistic", "sycophantic")
BASE = {"kind": "rollout", "dataset": "traits_sample", "model": "tiny:qwen3", "dtype": "float32",
        "params": {"max_samples": 4}}


@pytest.fixture
def api(pg_url, monkeypatch):
    yield from serve(pg_url, monkeypatch)


def job_count(api) -> int:
    from app.models import Job

    with api.session() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def capture_job(api, *, state="succeeded", layers=(1, 2), vectors=("pos_neg",)) -> str:
    """A capture job in ``state`` with one recorded artifact per persona naming its vectors."""
    from app import jobs

    with api.session() as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                              dtype="float32", params={"layers": list(layers)},
                              personas=list(PERSONAS))
        job_id = job.id
        for p in PERSONAS:
            shapes = {"activations": [4, len(layers), 128],
                      **{f"vectors.{v}": [len(layers), 128] for v in vectors}}
            jobs.record_artifact(s, job_id=job_id, key=f"cs/x/{job_id}/{p}.safetensors",
                                 sha256="0" * 64, size=10, meta={"shapes": shapes})
        if state != "queued":
            jobs.transition_job(s, job_id=job_id, to="running")
        if state not in ("queued", "running"):
            jobs.transition_job(s, job_id=job_id, to=state)
    return job_id


def body(**sweep):
    return {**BASE, "params": {**BASE["params"], "sweep": sweep}}


def test_bad_grids_name_the_field_and_enqueue_nothing(api):
    good = capture_job(api)
    running = capture_job(api, state="running")
    other_vectors = capture_job(api, vectors=("pos_default",))
    add = {"source": good, "vector": "pos_neg", "layers": [2], "scales": [-4, 0, 4]}
    cases = [
        (body(**{**add, "scales": []}), "params.sweep.scales"),
        (body(**{**add, "scales": [1, 2, 1]}), "params.sweep.scales[2]"),
        (body(**{**add, "scales": [1, "x"]}), "params.sweep.scales[1]"),
        (body(**{**add, "layers": []}), "params.sweep.layers"),
        (body(**{**add, "layers": "all"}), "params.sweep.layers"),
        (body(**{**add, "layers": [4]}), "params.sweep.layers[0]"),  # tiny Qwen3 has 4 layers
        (body(**{**add, "layers": [2, 2]}), "params.sweep.layers[1]"),
        (body(**{**add, "layers": [0]}), "params.sweep.layers[0]"),  # not captured by source
        (body(**{**add, "vector": "pos_neg_50"}), "params.sweep.vector"),
        (body(**{**add, "source": other_vectors}), "params.sweep.vector"),
        (body(**{**add, "source": running}), "params.sweep.source"),
        (body(**{**add, "source": "f" * 32}), "params.sweep.source"),
        (body(**{**add, "normalize": "yes"}), "params.sweep.normalize"),
        (body(**{**add, "colour": 1}), "params.sweep.colour"),
        (body(**{**add, "cap_axis": good}), "params.sweep.source"),  # both forms at once
        (body(layers=[2], scales=[1]), "params.sweep.source"),  # neither
        (body(cap_axis=good, layers=[2], cap_percentiles=[]), "params.sweep.cap_percentiles"),
        (body(cap_axis=good, layers=[2], cap_percentiles=[5, 5]),
         "params.sweep.cap_percentiles[1]"),
        (body(cap_axis=good, layers=[2], cap_percentiles=[101]),
         "params.sweep.cap_percentiles[0]"),
        (body(cap_axis=running, layers=[2], cap_percentiles=[5]), "params.sweep.cap_axis"),
        (body(cap_axis=good, layers=[2], cap_percentiles=[5], scales=[1]),
         "params.sweep.scales"),
        ({**body(**add), "kind": "capture"}, "params.sweep"),
        ({**BASE, "params": {"sweep": add, "steer": [{"op": "add", "layer": 1,
                                                       "vector": [1.0] * 128}]}},
         "params.steer"),
    ]
    before = job_count(api)
    for request, field in cases:
        r = api.http.post("/jobs", json=request)
        assert 400 <= r.status_code < 500, (field, r.text)
        assert r.json()["field"] == field, (field, r.json())
        assert r.json()["message"]
    assert api.enqueued.ids == [] and job_count(api) == before


def test_a_good_sweep_reports_its_grid_size(api):
    good = capture_job(api)
    r = api.http.post("/jobs", json=body(source=good, vector="pos_neg", layers=[1, 2],
                                         scales=[-8, -4, 0, 4, 8], normalize=True))
    assert r.status_code == 201, r.text
    sweep = r.json()["params"]["sweep"]
    assert sweep["form"] == "add" and sweep["normalize"] is True
    # 2 layers x 5 scales, 3 personas x 4 samples each
    assert sweep["grid"] == {"points": 10, "personas": 3, "samples": 12, "requests": 120}
    cap = api.http.post("/jobs", json=body(cap_axis=good, layers=[2],
                                           cap_percentiles=[1, 5, 25]))
    assert cap.status_code == 201, cap.text
    assert cap.json()["params"]["sweep"]["grid"]["points"] == 3
    assert api.enqueued.ids == [r.json()["id"], cap.json()["id"]]
    # not a sweep / not finished: the sweep routes answer with the field, never a 500
    plain = api.http.post("/jobs", json=BASE).json()["id"]
    assert api.http.get(f"/jobs/{plain}/sweep").status_code == 409
    assert api.http.get(f"/jobs/{r.json()['id']}/sweep").json()["rows"] == []
    assert api.http.get(f"/jobs/{r.json()['id']}/sweep.png").status_code == 404


def test_a_sweep_takes_a_judge_and_refuses_what_the_judge_cannot_use(api):
    """--judge on a sweep is stored for the worker (app/sweepscore.py); a rollout without a
    sweep still refuses it, a sweep still refuses stages/responses, and an empty judge
    model is named; nothing is enqueued for the bad ones."""
    good = capture_job(api)
    add = {"source": good, "vector": "pos_neg", "layers": [2], "scales": [-4, 0, 4]}
    before = job_count(api)
    for request, field in [
        ({**BASE, "params": {**BASE["params"], "judge": "j"}}, "params.judge"),
        ({**body(**add), "params": {**body(**add)["params"], "stages": ["judge"]}},
         "params.stages"),
        ({**body(**add), "params": {**body(**add)["params"], "judge": " "}}, "params.judge"),
    ]:
        r = api.http.post("/jobs", json=request)
        assert 400 <= r.status_code < 500, (field, r.text)
        assert r.json()["field"] == field, (field, r.json())
    assert api.enqueued.ids == [] and job_count(api) == before
    r = api.http.post("/jobs", json={**body(**add), "params": {
        **body(**add)["params"], "judge": "judge-m", "judge_reply_retries": 1}})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "rollout"
    assert r.json()["params"]["judge"] == "judge-m"
    assert r.json()["params"]["judge_reply_retries"] == 1


def test_minilm_from_names_a_pipeline_job_with_a_classifier(api):
    """params.sweep.minilm_from: a job whose minilm stage succeeded, over the same dataset;
    anything else is a 4xx naming the field, nothing enqueued."""
    from app import stages
    from app.models import JobItem

    good = capture_job(api)
    add = {"source": good, "vector": "pos_neg", "layers": [2], "scales": [0, 4]}

    def pipeline(dataset: str, minilm_state: str) -> str:
        with api.session() as s:
            job = stages.create_pipeline_job(
                s, dataset=dataset, model="tiny:qwen3", dtype="float32",
                params={"stages": ["generate", "minilm"]},
                items=[("generate", "curious"), ("minilm", "*")])
            job_id = str(job.id)
            for item in s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars():
                item.state = "succeeded" if item.stage == "generate" else minilm_state
                item.artifact_key = f"cs/x/{job_id}/{item.stage}.json"
                item.artifact_sha256 = "0" * 64
        return job_id

    before = job_count(api)
    for source in ("f" * 32, good, pipeline("traits_sample", "failed"),
                   pipeline("roles_sample", "succeeded")):
        r = api.http.post("/jobs", json=body(**add, minilm_from=source))
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["field"] == "params.sweep.minilm_from", r.json()
    assert api.enqueued.ids == [] and job_count(api) == before + 2  # the two pipeline rows
    ok = pipeline("traits_sample", "succeeded")
    r = api.http.post("/jobs", json=body(**add, minilm_from=ok))
    assert r.status_code == 201, r.text
    assert r.json()["params"]["sweep"]["minilm_from"] == ok
