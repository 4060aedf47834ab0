"""A pipeline's vectors and axis stages compute and store as a capture job does.

The stages run through ``workers.stages.run_stage`` (generate and capture on the
deterministic fake engine of test_pipeline_capture, the local store); the judge's scores are
written where the judge stage writes them. Expected numbers come from
``app.vectors.derive_all`` and ``assistant_axis`` over the activations the capture stage
stored (each checked against the public scripts in test_vectors); the files are read with
the readers of a capture job's files (``read_vector_sidecar``, ``find_axis``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load

from app.analysis import find_axis
from app.artifacts import read_persona_artifact, read_vector_sidecar
from app.datasets import load_dataset
from app.settings import get_settings
from app.storage import get_store
from app.vectors import assistant_axis, derive_all, project
from tests.unit.test_pipeline_capture import FakeEngine
from workers.jobvectors import AXIS_FILE, VECTORS_FILE
from workers.stages import StageContext, run_stage

PREFIX = "pipe/job-7"


def _run(dataset: str, *, scored: bool, min_count: int = 1):
    settings = get_settings()
    store = get_store(settings)
    engine = FakeEngine()
    ds = load_dataset(dataset, settings=settings)
    personas = [p for p in ds.personas if p != "default"]
    events = []

    def ctx(stage, persona):
        return StageContext(
            job_id="job-7", stage=stage, persona=persona, dataset=dataset, model="tiny:qwen3",
            dtype="float32", params={"max_samples": 8, "batch_size": 64, "max_tokens": 8,
                                     "min_count": min_count},
            store=store, settings=settings, prefix=PREFIX, engine=lambda: engine,
            on_event=lambda k, d: events.append((k, d)))

    for stage in ("generate", "capture"):
        for p in personas:
            run_stage(ctx(stage, p))
    arts = {p: read_persona_artifact(store.get_bytes(f"{PREFIX}/activations/{p}.safetensors"))
            for p in personas}
    scores = {}
    if scored:  # the judge stage's output: 0-3 (roles) or 0-100 (traits) per sample key
        for p, art in arts.items():
            scores[p] = {k: _score(ds.kind, k, i) for i, k in enumerate(art.keys)}
            store.put_bytes(f"{PREFIX}/scores/{p}.json", json.dumps(scores[p]).encode())
    results = {p: run_stage(ctx("vectors", p)) for p in personas}
    return store, ds, arts, scores, results, ctx, events


def _score(kind: str, key: str, i: int):
    """Roles 0-3 in turn over the (pos, default) pairs, default two ahead (pos_3 and
    default_1 both present); traits high for pos, low for neg, middling for default, with a
    REFUSAL now and then (pos_neg_50 and the REFUSAL rule both have work to do)."""
    if kind == "roles":
        return (i // 2 + (2 if key.startswith("default_") else 0)) % 4
    if i % 5 == 4:
        return "REFUSAL"
    return {"pos": 75 + i % 25, "neg": 5 + i % 10, "default": 20 + i % 40}[key.split("_")[0]]


@pytest.mark.parametrize("dataset", ["traits_sample", "roles_sample"])
def test_vectors_stage_stores_the_capture_jobs_vectors(dataset):
    store, ds, arts, scores, results, _, _ = _run(dataset, scored=True)
    for persona, art in arts.items():
        assert results[persona].artifact_key == f"{PREFIX}/vectors/{persona}.safetensors"
        vs, meta = read_vector_sidecar(store.get_bytes(results[persona].artifact_key))
        want = derive_all(art.activations, list(art.keys), kind=ds.kind,
                          scores=scores[persona], min_count=1, persona=persona)
        assert set(vs.vectors) == set(want) and want
        for name, vec in want.items():
            np.testing.assert_array_equal(vs.vectors[name], vec)
        assert not vs.pending  # the default samples are in the persona's own table
        assert meta["persona"] == persona and meta["kind"] == ds.kind
        assert meta["scores"]["present"] and meta["scores"]["missing_keys"] == 0
        assert meta["layers"] == [int(x) for x in art.metadata["layers"]]
        assert results[persona].info["scored"] is True
    if ds.kind == "traits":
        assert any("pos_neg_50" in r.info["vectors"] for r in results.values())
    else:
        assert any("pos_3-default_1" in r.info["vectors"] for r in results.values())


def test_axis_stage_is_the_capture_jobs_axis_over_the_default_samples_once():
    store, _, arts, scores, _, ctx, events = _run("roles_sample", scored=True)
    result = run_stage(ctx("axis", "*"))
    assert result.artifact_key == f"{PREFIX}/{AXIS_FILE}"
    assert [o["key"] for o in result.extra] == [f"{PREFIX}/{VECTORS_FILE}"]
    tensors = load(store.get_bytes(f"{PREFIX}/{VECTORS_FILE}"))
    report = json.loads(store.get_bytes(f"{PREFIX}/{AXIS_FILE}"))

    default_rows = {}
    for art in arts.values():
        for k, row in zip(art.keys, art.activations):
            if k.startswith("default_"):
                default_rows.setdefault(k, row)
    assert default_rows
    default_mean = np.mean([default_rows[k].astype(np.float64) for k in sorted(default_rows)],
                           axis=0)
    roles = {p: derive_all(a.activations, list(a.keys), kind="roles", scores=scores[p],
                           min_count=1, persona=p) for p, a in arts.items()}
    pos3 = {p: v["pos_3"] for p, v in roles.items() if "pos_3" in v}
    assert pos3
    axis, role_mean = assistant_axis(default_mean, pos3)
    np.testing.assert_allclose(tensors["axis"], axis, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tensors["role_mean"], role_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tensors["default_mean"], default_mean, rtol=1e-5, atol=1e-5)
    assert report["roles"] == sorted(pos3) and report["n_roles"] == len(pos3)
    assert report["axis_of"] == "pos_3" and report["job_id"] == "job-7"
    for p, vec in pos3.items():
        np.testing.assert_allclose(report["projections"][p], project(vec, axis), rtol=1e-4,
                                   atol=1e-5)
    assert result.info["roles"] == len(pos3) and result.info["axis"] is True
    assert ("axis", {"axis_shape": list(axis.shape), "axis_of": "pos_3",
                     "n_roles": len(pos3), "excluded": len(arts) - len(pos3)}) in events
    # the readers of a capture job's axis find this one in the manifest's entries
    manifest = {"artifacts": [{"key": result.artifact_key, "kind": "persona"},
                              *({"key": o["key"], "kind": "safetensors"} for o in result.extra)]}
    found = find_axis(store.get_bytes, manifest)
    assert found is not None and found[2] == f"{PREFIX}/{VECTORS_FILE}"
    np.testing.assert_array_equal(found[0], tensors["axis"])


def test_without_judge_scores_the_vectors_say_so_and_the_axis_falls_back_to_pos_all():
    store, _, arts, _, results, ctx, events = _run("roles_sample", scored=False)
    for persona in arts:
        vs, meta = read_vector_sidecar(store.get_bytes(results[persona].artifact_key))
        assert "pos_all" in vs.vectors and "pos_3" not in vs.vectors
        assert meta["scores"]["present"] is False and "skipped" in meta["scores"]
    run_stage(ctx("axis", "*"))
    report = json.loads(store.get_bytes(f"{PREFIX}/{AXIS_FILE}"))
    assert report["axis_of"].startswith("pos_all") and report["n_roles"] == len(arts)
    assert sorted(report["scores_missing"]) == sorted(arts)
    assert any(k == "scores_missing" and d["personas_without_file"] == len(arts)
               for k, d in events)
