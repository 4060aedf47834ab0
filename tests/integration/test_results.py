"""Results of a real finished job (Postgres, the S3-compatible server, a real worker): the
Python API over HTTP and straight from the store, the whole-job download (resumable, every
file checked against the manifest), ``artifacts get JOB`` and ``analyze``, the analysis API."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.integration.finished_job import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
PERSONAS = ["curious", "optimistic", "sycophantic"]
ITEMS = sorted(PERSONAS + ["default"])  # the default persona is captured once per job (#10)


@pytest.fixture
def api(finished_job, monkeypatch):
    """The real API (uvicorn on a free port) on the finished job's database and bucket."""
    from app.api import create_app
    from app.db import dispose_all
    from app.settings import get_settings
    from tests.conftest import free_port
    from tests.integration.api_server import start

    finished_job.apply(monkeypatch)
    port = free_port()
    server, thread = start(create_app(get_settings()), port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    dispose_all()


def _store():
    from app.settings import get_settings
    from app.storage import get_store

    return get_store(get_settings())


def test_python_api_reads_the_same_tensors_over_http_and_from_the_store(finished_job, api):
    import torch

    import chatspace_jobs as cj
    from app.artifacts import read_persona_artifact
    from app.settings import get_settings

    over_http = cj.connect(api, TOKEN).job(finished_job.job_id)
    direct = cj.connect(settings=get_settings()).job(finished_job.job_id)
    assert finished_job.job_id in [j["id"] for j in cj.jobs()]
    assert over_http.status()["state"] == "succeeded"
    assert over_http.personas == direct.personas == ITEMS
    # "mean" is the default persona's own vector (assistant-axis 4_vectors.py)
    assert over_http.vector_names() == ["mean", "pos_default", "pos_neg"]
    store = _store()
    for persona in PERSONAS:
        raw = read_persona_artifact(store.get_bytes(f"{finished_job.prefix}/{persona}.safetensors"))
        a, b = over_http.vectors("pos_neg")[persona], direct.vectors("pos_neg")[persona]
        assert a.shape == (4, 128) and torch.equal(a, b)
        assert torch.equal(a, torch.from_numpy(raw.vectors["pos_neg"]))
        assert torch.equal(over_http.vectors("pos_neg", layer=2)[persona], a[2])
        acts = over_http.activations(persona)
        assert acts.tensor.shape == (4, 4, 128) and acts.keys == raw.keys
        assert acts.layers == [0, 1, 2, 3]
        assert torch.equal(acts[raw.keys[1]], torch.from_numpy(raw.activations[1]))
        responses = over_http.responses(persona)
        assert [r["key"] for r in responses] == raw.keys
        assert [r["response"] for r in responses] == raw.metadata["responses"]
    with pytest.raises(KeyError, match="no persona 'nobody'"):
        over_http.activations("nobody")
    with pytest.raises(KeyError, match="was not captured"):
        over_http.vectors("pos_neg", layer=7)
    with pytest.raises(Exception, match="bearer token"):
        cj.connect(api, "wrong-token").jobs()


def test_whole_job_download_is_resumable_and_checks_every_file(finished_job, api, tmp_path):
    from app.errors import ChecksumMismatch
    from app.results import ApiSource, download_job, job_files

    source = ApiSource(api, TOKEN)
    dest = tmp_path / "job"
    first = download_job(source, finished_job.job_id, dest)
    files = job_files(source, source.job(finished_job.job_id))
    assert first.files == len(files) and first.downloaded == first.files and first.skipped == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["job_id"] == finished_job.job_id
    assert manifest["model_config"]["config_sha256"]  # recorded by the worker
    assert manifest["versions"]["torch"] and manifest["params"]["max_samples"] == 4
    for entry in manifest["artifacts"]:
        local = dest / entry["key"].rsplit("/", 1)[-1]
        assert hashlib.sha256(local.read_bytes()).hexdigest() == entry["sha256"]
    assert first.bytes_downloaded == first.bytes_total > 0

    again = download_job(source, finished_job.job_id, dest)
    assert (again.downloaded, again.skipped, again.bytes_downloaded) == (0, first.files, 0)

    (dest / "curious.safetensors").write_bytes(b"corrupt")  # a damaged local copy
    (dest / "optimistic.json").unlink()  # and a missing one
    fixed = download_job(source, finished_job.job_id, dest)
    assert fixed.downloaded == 2 and fixed.skipped == first.files - 2
    entry = next(e for e in manifest["artifacts"] if e["key"].endswith("/curious.safetensors"))
    assert hashlib.sha256((dest / "curious.safetensors").read_bytes()).hexdigest() == \
        entry["sha256"]

    store = _store()  # the stored object changes under the manifest: refused, nothing placed
    key = f"{finished_job.prefix}/sycophantic.json"
    original = store.get_bytes(key)
    store.put_bytes(key, original + b" ", overwrite=True, content_type="application/json")
    try:
        (dest / "sycophantic.json").unlink()
        with pytest.raises(ChecksumMismatch, match="does not match the expected"):
            download_job(source, finished_job.job_id, dest)
        assert not (dest / "sycophantic.json").exists()
        assert not list(dest.glob(".*.part"))
    finally:
        store.put_bytes(key, original, overwrite=True, content_type="application/json")


def test_cli_downloads_a_whole_job_over_the_api_and_from_the_store(finished_job, api, tmp_path,
                                                                    monkeypatch):
    from click.testing import CliRunner

    from cli.main import cli

    monkeypatch.setenv("CHATSPACE_API_TOKEN", TOKEN)
    from app.settings import get_settings

    get_settings.cache_clear()
    runner = CliRunner()
    for args, dest in ((["--api-url", api], tmp_path / "http"), ([], tmp_path / "store")):
        result = runner.invoke(cli, [*args, "artifacts", "get", finished_job.job_id,
                                     "-o", str(dest)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "every file matches the manifest's sha256" in result.output
        assert {p.name for p in dest.glob("*.safetensors")} == (
            {f"{p}.safetensors" for p in ITEMS} | {f"{p}.vectors.safetensors" for p in ITEMS}
            | {"job_vectors.safetensors"})
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(cli, ["artifacts", "get", finished_job.job_id, "-o",
                                 str(tmp_path / "afile")])
    assert result.exit_code == 2 and "needs a folder" in result.output


def test_analysis_is_computed_on_demand_and_uses_the_axis_when_stored(finished_job, api,
                                                                      monkeypatch):
    import httpx
    from safetensors.numpy import save

    import chatspace_jobs as cj

    http = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=120)
    job_id = finished_job.job_id
    store = _store()
    store.delete(f"{finished_job.prefix}/axis.safetensors")
    r = http.post(f"/jobs/{job_id}/analysis", params={"vector": "no_such"})
    assert r.status_code == 409 and r.json()["field"] == "vector"
    r = http.post(f"/jobs/{job_id}/analysis", params={"vector": "pos_neg"})
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["personas"] == PERSONAS and summary["layers"] == [0, 1, 2, 3]
    assert not summary["has_axis"] and "axis_projection.png" not in summary["plots"]
    assert http.get(f"/jobs/{job_id}/analysis").json() == summary
    for layer in summary["per_layer"]:
        assert sum(layer["explained_variance_ratio"]) == pytest.approx(1.0)
    png = http.get("/artifacts/content", params={"key": summary["files"]["pca_layer2.png"]})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert png.headers["x-content-sha256"] == hashlib.sha256(png.content).hexdigest()

    job = cj.connect(api, TOKEN).job(job_id)
    with pytest.raises(LookupError, match="no assistant-axis artifact"):
        job.axis()
    axis = np.random.default_rng(0).normal(size=(4, 128)).astype(np.float32)
    store.put_bytes(f"{finished_job.prefix}/axis.safetensors", save({"axis": axis}))
    try:
        np.testing.assert_array_equal(job.axis().numpy(), axis)
        summary = job.source.analyze(job_id, vector="pos_neg")
        assert summary["has_axis"] and "axis_projection.png" in summary["plots"]
        vectors = job.vectors("pos_neg")
        for entry in summary["per_layer"]:
            a = axis[entry["layer"]].astype(np.float64)
            for persona, vec in vectors.items():
                want = float(vec[entry["layer"]].double().numpy() @ (a / (np.linalg.norm(a)
                                                                          + 1e-8)))
                assert entry["axis_projection"][persona] == pytest.approx(want, rel=1e-5)
    finally:
        store.delete(f"{finished_job.prefix}/axis.safetensors")

    from click.testing import CliRunner

    from app.settings import get_settings
    from cli.main import cli

    monkeypatch.setenv("CHATSPACE_API_TOKEN", TOKEN)
    get_settings.cache_clear()
    out = CliRunner().invoke(cli, ["--api-url", api, "analyze", job_id], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "pos_neg analysis of" in out.output and "pca_layer0.png" in out.output
