"""Persona artifact: safetensors round trip, metadata, validation, and the .pt export."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest

from app.artifacts import build_persona_artifact, read_header, read_persona_artifact, to_pt
from app.errors import StorageError
from app.vectors import derive_vectors

L, H = 4, 6


@pytest.fixture
def built():
    rng = np.random.default_rng(0)
    keys = [f"{lab}_p{p}_q{q}" for p in range(2) for q in range(3) for lab in ("pos", "neg")]
    acts = rng.normal(size=(len(keys), L, H)).astype(np.float32)
    vs = derive_vectors(acts, keys, kind="traits")
    spans = {"prompt_mean": rng.normal(size=acts.shape)}
    data, meta = build_persona_artifact(
        activations=acts, keys=keys, vectors=vs, layers=[0, 2, 4, 6], model="tiny:qwen3",
        dtype="bfloat16", dataset="traits_sample", persona="optimistic", extra_spans=spans)
    return data, meta, acts, keys, vs, spans


def test_round_trip(built):
    data, meta, acts, keys, vs, spans = built
    art = read_persona_artifact(data)
    np.testing.assert_array_equal(art.activations, acts)
    assert art.keys == keys
    assert set(art.vectors) == {"pos_neg"}
    np.testing.assert_allclose(art.vectors["pos_neg"], vs.vectors["pos_neg"])
    np.testing.assert_allclose(art.contrast, vs.contrast)
    np.testing.assert_allclose(art.spans["prompt_mean"], spans["prompt_mean"].astype(np.float32))
    assert art.metadata == meta


def test_metadata_contents(built):
    data, meta, *_ = built
    assert meta["schema_version"] == 1 and meta["layers"] == [0, 2, 4, 6]
    assert meta["model"] == "tiny:qwen3" and meta["dtype"] == "bfloat16"
    assert meta["counts"]["pos_neg"] == 6 and meta["contrast_of"] == "pos_neg"
    assert meta["shapes"]["activations"] == [12, L, H]
    assert meta["shapes"]["vectors.pos_neg"] == [L, H]
    assert read_header(data) == meta
    # The file is plain safetensors: its header is JSON, no pickle anywhere.
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert set(header) - {"__metadata__"} == {
        "activations", "vectors.pos_neg", "contrast", "spans.prompt_mean"}


def test_shape_mismatches_are_refused():
    acts = np.zeros((2, L, H))
    kw = {"layers": list(range(L)), "model": "m", "dtype": "float32", "dataset": "d",
          "persona": "p"}
    with pytest.raises(ValueError, match="activations"):
        build_persona_artifact(activations=acts, keys=["pos_p0_q0"], vectors={}, **kw)
    with pytest.raises(ValueError, match="vector 'x'"):
        build_persona_artifact(activations=acts, keys=["pos_p0_q0", "neg_p0_q0"],
                               vectors={"x": np.zeros((L, H + 1))}, **kw)


def test_garbage_is_not_an_artifact():
    with pytest.raises(StorageError):
        read_persona_artifact(b"\x00" * 4)
    from safetensors.numpy import save

    with pytest.raises(StorageError):
        read_persona_artifact(save({"a": np.zeros(2, np.float32)}))


def test_pt_export(built):
    torch = pytest.importorskip("torch")
    data, _meta, acts, keys, vs, _ = built
    blob = to_pt(read_persona_artifact(data))
    obj = torch.load(io.BytesIO(blob), weights_only=True)
    assert {"activations", "contrast", "metadata"} <= set(obj)
    assert list(obj["activations"]) == keys
    for i, k in enumerate(keys):
        assert obj["activations"][k].shape == (L, H)
        np.testing.assert_array_equal(obj["activations"][k].numpy(), acts[i])
    np.testing.assert_allclose(obj["contrast"].numpy(), vs.contrast)
    assert obj["metadata"]["persona"] == "optimistic"
    np.testing.assert_allclose(obj["vectors"]["pos_neg"].numpy(), vs.vectors["pos_neg"])
