"""Submit-time checks without a database: params, steering ops, model names, model shapes
from every cheap source, and the API's error-location formatting."""

from __future__ import annotations

import json
import math

import pytest

from app.errors import SpecInvalid
from app.modelinfo import ModelInfo, from_config, resolve
from app.settings import Settings
from app.submit import check_model, check_params, check_steer_op, validate

TINY = ModelInfo(4, 128, "tiny model")


def field_of(fn, *args, **kw) -> str:
    with pytest.raises(SpecInvalid) as err:
        fn(*args, **kw)
    return err.value.field


def test_params_are_normalised():
    out = check_params({"layers": [3, 1], "max_samples": 5, "temperature": 0, "seed": 7},
                       kind="capture", info=TINY)
    assert out == {"layers": [1, 3], "max_samples": 5, "temperature": 0.0, "seed": 7}
    assert check_params({"layers": "all"}, kind="capture", info=TINY) == {}
    assert check_params({"layers": [99]}, kind="capture", info=None) == {"layers": [99]}


@pytest.mark.parametrize(("params", "field"), [
    ({"layers": [4]}, "params.layers[0]"),
    ({"layers": [True]}, "params.layers[0]"),
    ({"layers": []}, "params.layers"),
    ({"layers": [1, 1]}, "params.layers[1]"),
    ({"batch_size": 0}, "params.batch_size"),
    ({"batch_size": 10**6}, "params.batch_size"),
    ({"max_tokens": 2.5}, "params.max_tokens"),
    ({"temperature": math.inf}, "params.temperature"),
    ({"temperature": 1000}, "params.temperature"),
    ({"top_p": 0}, "params.top_p"),
    ({"seed": 2**64}, "params.seed"),
    ({"capture": True}, "params.capture"),  # capture jobs always capture
])
def test_bad_params(params, field):
    assert field_of(check_params, params, kind="capture", info=TINY) == field


def test_layer_hint_names_the_source_of_the_shape():
    with pytest.raises(SpecInvalid) as err:
        check_params({"layers": [7]}, kind="capture", info=ModelInfo(6, 64, "worker w3"))
    assert "6 layers (0..5)" in err.value.hint and "worker w3" in err.value.hint


def test_steer_ops():
    op = check_steer_op({"op": "cap", "layer": 2, "vector": [1] * 128, "max": 3}, "s", TINY)
    assert op == {"op": "cap", "layer": 2, "scale": 1.0, "max": 3.0, "vector": [1.0] * 128}
    ref = check_steer_op({"op": "add", "layer": 1, "from": {"job_id": "j", "vector": "pos_neg"}},
                         "s", TINY)
    assert ref["from"] == {"job_id": "j", "vector": "pos_neg"}
    # unknown shape: any length passes here; the engine checks it again at load
    assert len(check_steer_op({"op": "add", "layer": 50, "vector": [1.0] * 7}, "s", None)
               ["vector"]) == 7


@pytest.mark.parametrize(("op", "field"), [
    ({"op": "add", "layer": 1, "vector": [1.0] * 127}, "s.vector"),
    ({"op": "add", "layer": 1, "vector": [1.0] * 127 + [math.nan]}, "s.vector[127]"),
    ({"op": "add", "layer": 1, "vector": []}, "s.vector"),
    ({"op": "ablate", "layer": 1, "vector": [0] * 128}, "s.vector"),
    ({"op": "cap", "layer": 1, "vector": [1] * 128, "min": 1, "max": 0}, "s.min"),
    ({"op": "add", "layer": 4, "vector": [1] * 128}, "s.layer"),
    ({"op": "add", "vector": [1] * 128}, "s.layer"),
    ({"op": "add", "layer": 1, "vector": [1] * 128, "scale": math.inf}, "s.scale"),
    ({"op": "add", "layer": 1, "vector": [1] * 128, "from": {"job_id": "j"}}, "s.vector"),
    ({"op": "rotate", "layer": 1, "vector": [1] * 128}, "s.op"),
    ({"op": "add", "layer": 1, "vector": [1] * 128, "extra": 1}, "s.extra"),
    ([1, 2], "s"),
])
def test_bad_steer_ops(op, field):
    assert field_of(check_steer_op, op, "s", TINY) == field


def test_models_allowed_by_settings():
    assert check_model("Qwen/Qwen3-32B", Settings()) == "Qwen/Qwen3-32B"
    limited = Settings(allowed_models=["tiny:qwen3"])
    assert field_of(check_model, "Qwen/Qwen3-32B", limited) == "model"
    assert field_of(check_model, "a b", Settings()) == "model"
    assert field_of(check_model, "../../etc", Settings()) == "model"
    assert check_model("/models/Qwen3-8B", Settings()) == "/models/Qwen3-8B"  # a local folder
    assert field_of(check_model, "/models/../etc", Settings()) == "model"
    assert field_of(check_model, "//host/x", Settings()) == "model"


def test_validate_refuses_before_touching_the_database():
    from app.api.schemas import JobSubmit

    settings = Settings()
    for body, field in (({"dataset": "traits_sample", "kind": "x"}, "kind"),
                        ({"dataset": "traits_sample", "dtype": "fp8"}, "dtype"),
                        ({"dataset": "missing"}, "dataset")):
        assert field_of(validate, None, JobSubmit(**body), settings=settings) == field
    cols = validate(None, JobSubmit(dataset="traits_sample", params={"layers": [0]}),
                    settings=settings)
    assert cols["model"] == "tiny:qwen3" and cols["dtype"] == "float32"
    # the default persona is one item, first: captured once for every vector against it
    assert cols["personas"][0] == "default"
    assert sorted(cols["personas"][1:]) == ["curious", "optimistic", "sycophantic"]


def test_model_shapes_from_configs(tmp_path, monkeypatch):
    assert resolve("tiny:gemma3") == ModelInfo(4, 128, "tiny model")
    assert resolve("org/unknown", settings=Settings(data_dir=tmp_path)) is None
    # a local folder
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"num_hidden_layers": 28, "hidden_size": 1024}))
    assert resolve(str(local)).num_layers == 28
    # the Hugging Face hub cache
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-32B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"num_hidden_layers": 64, "hidden_size": 5120}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    info = resolve("Qwen/Qwen3-32B")
    assert (info.num_layers, info.hidden_size) == (64, 5120) and "snapshots" in info.source
    # multimodal configs nest the text model
    nested = from_config({"text_config": {"num_hidden_layers": 34, "hidden_size": 2560}},
                         source="x")
    assert (nested.num_layers, nested.hidden_size) == (34, 2560)
    assert from_config({"hidden_size": 8}, source="x") is None


@pytest.mark.parametrize(("loc", "field"), [
    (("body", "params", "steer", 0, "vector"), "params.steer[0].vector"),
    (("body", "params", "layers", "list[int]", 2), "params.layers[2]"),
    (("query", "limit"), "limit"),
    (("body",), "body"),
])
def test_error_locations_become_dotted_fields(loc, field):
    from app.api.errors import field_path

    assert field_path(loc) == field


def test_personas_questions_and_model_name_at_submit(tmp_path):
    from app.api.schemas import JobSubmit
    from tests.release_data import write_release

    settings = Settings(datasets_root=str(write_release(tmp_path)))
    cols = validate(None, JobSubmit(dataset="roles", params={
        "personas": ["poet"], "questions": 2, "model_name": "Qwen"}), settings=settings)
    assert cols["personas"] == ["default", "poet"]
    assert cols["params"] == {"personas": ["poet"], "questions": 2, "model_name": "Qwen"}
    rollout = validate(None, JobSubmit(dataset="roles", kind="rollout",
                                       params={"personas": ["poet"]}), settings=settings)
    assert rollout["personas"] == ["poet"]  # no default item outside capture
    for params, field in (({"personas": ["poett"]}, "params.personas"),
                          ({"personas": []}, "params.personas"),
                          ({"questions": 0}, "params.questions"),
                          ({"model_name": "{x}"}, "params.model_name")):
        assert field_of(validate, None, JobSubmit(dataset="roles", params=params),
                        settings=settings) == field, params


def test_a_prompt_longer_than_the_context_is_refused_at_submit(tmp_path):
    from app.api.schemas import JobSubmit
    from tests.release_data import write_release

    data = write_release(tmp_path)
    f = data / "traits" / "instructions" / "calm.json"
    body = json.loads(f.read_text())
    body["instruction"][3]["neg"] = "Be tense. " * 20_000  # 200 kB: more than 4096 tokens
    f.write_text(json.dumps(body))
    settings = Settings(datasets_root=str(data))
    with pytest.raises(SpecInvalid) as err:
        validate(None, JobSubmit(dataset="traits"), settings=settings)
    msg = str(err.value)
    assert "instructions/calm.json" in msg and "'calm'" in msg and "instruction[3].neg" in msg
    assert "context is 4096" in msg
    # another persona chosen: the long one is not in the job, nothing refused
    ok = validate(None, JobSubmit(dataset="traits", params={"personas": ["brave"]}),
                  settings=settings)
    assert ok["personas"] == ["brave"]


def test_axis_from_must_name_a_job():
    from app.api.schemas import JobSubmit

    assert field_of(validate, None, JobSubmit(dataset="traits_sample",
                                              params={"axis_from": "nope"}),
                    settings=Settings()) == "params.axis_from"
    assert field_of(validate, None, JobSubmit(dataset="traits_sample", kind="rollout",
                                              params={"axis_from": "nope"}),
                    settings=Settings()) == "params.axis_from"
