"""Named datasets under an S3 root, through the S3-compatible test server (moto)."""

from __future__ import annotations

import json

import pytest

from app.datasets import SAMPLES_DIR, list_datasets, load_dataset, load_scores, validate_dataset
from app.errors import DatasetInvalid, DatasetNotFound, SpecInvalid


@pytest.fixture
def s3_root(s3_bucket, monkeypatch):
    from app.settings import get_settings
    from app.storage import s3_client

    client = s3_client(get_settings().s3)
    for f in SAMPLES_DIR.rglob("*"):
        if f.is_file():
            key = f"datasets/{f.relative_to(SAMPLES_DIR).as_posix()}"
            client.put_object(Bucket=s3_bucket, Key=key, Body=f.read_bytes())
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", f"s3://{s3_bucket}/datasets")
    get_settings.cache_clear()
    return client, s3_bucket


def test_samples_load_from_s3_like_local(s3_root, monkeypatch):
    remote = load_dataset("traits_sample")
    assert remote.root.startswith("s3://") and remote.kind == "traits"
    monkeypatch.delenv("CHATSPACE_DATASETS_ROOT")
    from app.settings import get_settings

    get_settings.cache_clear()
    local = load_dataset("traits_sample")
    assert remote.personas == local.personas and remote.questions == local.questions
    assert remote.samples("curious") == local.samples("curious")


def test_list_datasets_on_s3(s3_root):
    got = {s.name: s for s in list_datasets()}
    assert set(got) == {"traits_sample", "roles_sample"}
    assert got["roles_sample"].kind == "roles" and got["roles_sample"].personas == 4
    assert got["roles_sample"].samples == 3 * 50 + 50  # the default persona once per job


def test_scores_and_problems_on_s3(s3_root):
    client, bucket = s3_root
    assert load_scores(load_dataset("roles_sample"), "stage_magician") is None
    client.put_object(Bucket=bucket, Key="datasets/roles_sample/extract_scores/stage_magician.json",
                      Body=json.dumps({"pos_p0_q0": 3, "default_p0_q0": 1}).encode())
    ds = load_dataset("roles_sample")
    assert ds.scores_dir == f"s3://{bucket}/datasets/roles_sample/extract_scores"
    assert load_scores(ds, "stage_magician") == {"pos_p0_q0": 3.0, "default_p0_q0": 1.0}

    client.put_object(Bucket=bucket, Key="datasets/broken/instructions/x.json", Body=b"{\"a\": 1}")
    client.put_object(Bucket=bucket, Key="datasets/broken/questions.jsonl",
                      Body=b'{"question": "q", "id": 0}')
    problems = validate_dataset("broken")
    assert [(p.file, p.persona, p.field) for p in problems] == [
        ("instructions/x.json", "x", "instruction")]
    with pytest.raises(DatasetInvalid, match="instructions/x.json"):
        load_dataset("broken")


def test_unknown_and_escaping_names_on_s3(s3_root):
    with pytest.raises(DatasetNotFound, match="roles_sample, traits_sample"):
        load_dataset("traits_240")
    with pytest.raises(SpecInvalid):
        load_dataset("../datasets")
