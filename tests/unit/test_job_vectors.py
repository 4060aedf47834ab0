"""A capture job's end: the default persona captured once, vectors against it finished from
the stored files, the assistant axis with projections, and missing scores reported.

Items run through the real pipeline (prompts, datasets, artifacts, local store) on the
deterministic fake engine of test_pipeline_capture; the expected numbers come from
app.vectors.derive_all over the same stored activations put in one table (the public
scripts' view, itself checked against the scripts in test_vectors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from app.artifacts import read_persona_artifact
from app.datasets import SAMPLES_DIR
from app.settings import get_settings
from app.storage import get_store
from app.vectors import assistant_axis, derive_all, project
from tests.unit.test_pipeline_capture import HIDDEN as HIDDEN_
from tests.unit.test_pipeline_capture import N_LAYERS, FakeEngine
from workers import pipeline
from workers.jobvectors import AXIS_FILE, VECTORS_FILE, derive_job
from workers.params import JobParams


def run_job(dataset: str, personas, **params):
    settings = get_settings()
    store = get_store(settings)
    engine = FakeEngine()
    events, items = [], {}
    for persona in personas:
        ctx = pipeline.ItemContext(
            job_id="job-9", kind="capture", dataset=dataset, persona=persona,
            model="tiny:qwen3", dtype="float32",
            params=JobParams.from_dict({"batch_size": 64, "max_tokens": 24, **params}),
            engine=engine, store=store, settings=settings,
            on_event=lambda k, d: events.append((k, d)), free_memory=lambda: None)
        items[persona] = pipeline.run_item(ctx).artifact_key
    prefix = next(iter(items.values())).rsplit("/", 1)[0]
    job = SimpleNamespace(id="job-9", dataset=dataset, model="tiny:qwen3", dtype="float32")
    stored = derive_job(job=job, items=items, prefix=prefix, store=store,
                        on_event=lambda k, d: events.append((k, d)))
    arts = {p: read_persona_artifact(store.get_bytes(k)) for p, k in items.items()}
    return store, prefix, stored, arts, events


def combined(arts, persona):
    a, d = arts[persona], arts["default"]
    return np.concatenate([a.activations, d.activations]), list(a.keys) + list(d.keys)


@pytest.fixture
def scored_traits(tmp_path, monkeypatch):
    """traits_sample with a score file for one persona, two of its keys left out."""
    root = tmp_path / "datasets"
    shutil.copytree(SAMPLES_DIR / "traits_sample", root / "traits_scored")
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", str(root))
    get_settings.cache_clear()
    return root / "traits_scored"


def test_traits_default_once_and_pos_default_at_the_end(scored_traits):
    from app.datasets import load_dataset

    ds = load_dataset("traits_scored")
    keys = [s.key for s in ds.samples("optimistic", questions=4)]
    dkeys = [s.key for s in ds.samples("default", questions=4)]
    rng = np.random.default_rng(0)
    scores = {k: int(rng.integers(0, 101)) for k in keys + dkeys}
    scores["neg_p0_q1"] = "REFUSAL"  # drops q1's pos-default pair of prompt 0 too
    for gone in ("pos_p1_q2", "default_p2_q3"):
        del scores[gone]
    (scored_traits / "extract_scores").mkdir()
    (scored_traits / "extract_scores" / "optimistic.json").write_text(json.dumps(scores))

    store, prefix, stored, arts, events = run_job("traits_scored",
                                                  ["default", "optimistic", "curious"],
                                                  questions=4, layers=[0, 2])
    assert arts["optimistic"].keys == keys  # no default samples in a persona's own file
    assert arts["default"].keys == dkeys  # captured once
    from safetensors.numpy import load

    got = load(store.get_bytes(f"{prefix}/{VECTORS_FILE}"))
    acts, allkeys = combined(arts, "optimistic")
    want = derive_all(acts, allkeys, kind="traits", scores=scores)
    for name in ("pos_default", "pos_default_50"):
        np.testing.assert_allclose(got[f"optimistic.{name}"], want[name], rtol=1e-5, atol=1e-6)
    for name in ("pos_neg", "pos_neg_50", "pos_70", "pos_40_70"):
        np.testing.assert_allclose(arts["optimistic"].vectors[name], want[name], rtol=1e-5,
                                   atol=1e-6)
    acts, allkeys = combined(arts, "curious")  # no scores: the unfiltered pairs
    np.testing.assert_allclose(got["curious.pos_default"],
                               derive_all(acts, allkeys, kind="traits")["pos_default"],
                               rtol=1e-5, atol=1e-6)
    # the partly scored file is kept, its gaps reported with keys; the unscored persona too
    meta = arts["optimistic"].metadata["scores"]
    assert meta["present"] and meta["missing_keys"] == 2
    assert sorted(meta["missing_examples"]) == ["default_p2_q3", "pos_p1_q2"]
    kinds = dict(events)
    assert kinds["scores_missing"]["without_file"] == ["curious"]
    item_event = next(d for k, d in events if k == "scores_missing" and "persona" in d)
    assert item_event["persona"] == "optimistic" and item_event["missing_keys"] == 2
    report = json.loads(store.get_bytes(f"{prefix}/{AXIS_FILE}"))
    assert report["axis"] is None and "roles" in report["axis_reason"]
    assert {o["key"].rsplit("/", 1)[1] for o in stored} == {VECTORS_FILE, AXIS_FILE}


def test_roles_axis_and_projections():
    store, prefix, _, arts, events = run_job(
        "roles_sample", ["default", "stage_magician", "lighthouse_keeper"], questions=5,
        min_count=5)
    from safetensors.numpy import load

    got = load(store.get_bytes(f"{prefix}/{VECTORS_FILE}"))
    report = json.loads(store.get_bytes(f"{prefix}/{AXIS_FILE}"))
    # no scores: no role has a pos_3, so the axis is over pos_all and says so
    assert report["axis_of"].startswith("pos_all") and report["n_roles"] == 2
    default_mean = arts["default"].activations.astype(np.float64).mean(0)
    roles = {p: arts[p].activations.astype(np.float64).mean(0)
             for p in ("stage_magician", "lighthouse_keeper")}
    axis, _ = assistant_axis(default_mean, roles)
    np.testing.assert_allclose(got["axis"], axis, rtol=1e-5, atol=1e-5)
    assert list(got["axis"].shape) == report["axis_shape"] == [
        arts["default"].activations.shape[1], arts["default"].activations.shape[2]]
    np.testing.assert_allclose(report["projections"]["lighthouse_keeper"],
                               project(roles["lighthouse_keeper"], axis), rtol=1e-4, atol=1e-5)
    assert set(report["projections"]) == {"default", "stage_magician", "lighthouse_keeper"}
    assert ("axis", {"axis_shape": report["axis_shape"], "axis_of": report["axis_of"],
                     "n_roles": 2, "excluded": 0}) in events


def test_export_assistant_axis_files_feed_the_public_steps(tmp_path, monkeypatch):
    """Export a scored roles job, then run plain-loop readings of 4_vectors.py and 5_axis.py
    (tests/unit/test_vectors) on the exported .pt files: the same axis as the job's."""
    import torch

    from app.export import export_assistant_axis
    from tests.unit.test_vectors import ref_axis, ref_mean_vector, ref_pos_3_vector

    root = tmp_path / "datasets"
    shutil.copytree(SAMPLES_DIR / "roles_sample", root / "roles_scored")
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", str(root))
    get_settings.cache_clear()
    from app.datasets import load_dataset

    ds = load_dataset("roles_scored")
    rng = np.random.default_rng(1)
    (root / "roles_scored" / "extract_scores").mkdir()
    scores = {}
    for role in ("stage_magician", "lighthouse_keeper"):
        scores[role] = {s.key: int(rng.choice([1, 2, 3, 3, 3]))
                        for s in ds.samples(role, questions=5)}
        (root / "roles_scored" / "extract_scores" / f"{role}.json").write_text(
            json.dumps(scores[role]))
    store, prefix, _, _, _ = run_job(
        "roles_scored", ["default", "stage_magician", "lighthouse_keeper"], questions=5,
        min_count=3)
    keys = [o.key for o in store.list(prefix + "/")]
    out = tmp_path / "export"
    written = export_assistant_axis(keys, fetch=store.get_bytes, out=out)
    assert {Path(w).name for w in written} >= {"default.pt", "stage_magician.pt", "axis.pt"}
    acts = {p: torch.load(out / "activations" / f"{p}.pt", weights_only=True)
            for p in ("default", "stage_magician", "lighthouse_keeper")}
    assert all(k.startswith("pos_p") for k in acts["default"])  # 1_generate's label
    assert all(v.shape == (N_LAYERS, HIDDEN_) for v in acts["default"].values())
    # 4_vectors.py: pos_3 per role (min_count 3), mean for default; 5_axis.py: the axis
    role_vecs = [ref_pos_3_vector({k: v.numpy() for k, v in acts[r].items()}, scores[r], 3)
                 for r in ("stage_magician", "lighthouse_keeper")]
    default_vec = ref_mean_vector({k: v.numpy() for k, v in acts["default"].items()})
    axis_pt = torch.load(out / "axis.pt", weights_only=True)
    want = ref_axis([default_vec], role_vecs)
    assert np.abs(want).max() > 1e-3  # responses differ, so the axis is not trivially zero
    np.testing.assert_allclose(axis_pt.numpy(), want, rtol=1e-5, atol=1e-5)
    vec = torch.load(out / "vectors" / "stage_magician.pt", weights_only=True)
    assert vec["type"] == "pos_3" and vec["role"] == "stage_magician"


def test_traits_project_on_an_axis_from_a_roles_job():
    store, prefix, *_ = run_job("roles_sample", ["default", "stage_magician",
                                                 "lighthouse_keeper"], questions=5, min_count=5)
    from safetensors.numpy import load

    axis = load(store.get_bytes(f"{prefix}/{VECTORS_FILE}"))["axis"]
    settings = get_settings()
    engine = FakeEngine()
    items = {}
    for persona in ("default", "curious"):
        ctx = pipeline.ItemContext(
            job_id="job-t", kind="capture", dataset="traits_sample", persona=persona,
            model="tiny:qwen3", dtype="float32",
            params=JobParams.from_dict({"batch_size": 64, "max_tokens": 24, "questions": 3}),
            engine=engine, store=store, settings=settings, free_memory=lambda: None)
        items[persona] = pipeline.run_item(ctx).artifact_key
    tprefix = items["curious"].rsplit("/", 1)[0]
    job = SimpleNamespace(id="job-t", dataset="traits_sample", model="tiny:qwen3",
                          dtype="float32")
    derive_job(job=job, items=items, prefix=tprefix, store=store, axis_from=("job-9", axis))
    report = json.loads(store.get_bytes(f"{tprefix}/{AXIS_FILE}"))
    got = report["axis_from"]["projections"]["curious"]
    art = read_persona_artifact(store.get_bytes(items["curious"]))
    np.testing.assert_allclose(got["pos_neg"], project(art.vectors["pos_neg"], axis),
                               rtol=1e-4, atol=1e-5)
    assert "pos_default" in got and report["axis_from"]["job_id"] == "job-9"
