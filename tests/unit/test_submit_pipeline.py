"""Submitting the research chain: ``--judge`` turns a capture into a pipeline job whose
plan is the public pipeline's steps; every rule about stages is checked before anything is
written (no database here: a refused spec never reaches one)."""

from __future__ import annotations

import json

import pytest

from app.errors import SpecInvalid
from app.settings import Settings
from app.spec import JobSpec
from app.submit import validate


def _validate(dataset="traits_sample", settings=None, **params):
    return validate(None, JobSpec(dataset=dataset, params=params),
                    settings=settings or Settings())


def _field(**kw) -> tuple[str, str]:
    with pytest.raises(SpecInvalid) as e:
        _validate(**kw)
    return e.value.field, str(e.value)


def test_judge_makes_the_default_chain():
    cols = _validate(judge="gpt-4.1-mini")
    assert cols["kind"] == "pipeline"
    assert cols["params"]["stages"] == ["generate", "capture", "judge", "vectors"]
    stages = [s for s, _ in cols["items"]]
    assert stages.count("judge") == 3 and "axis" not in stages
    roles = _validate(dataset="roles_sample", judge="j")
    assert roles["params"]["stages"][-1] == "axis" and roles["items"][-1] == ("axis", "*")


def test_judge_model_from_settings(monkeypatch):
    assert _field(stages=["generate", "judge"])[0] == "params.judge"
    monkeypatch.setenv("CHATSPACE_JUDGE_MODEL", "served-judge")
    cols = _validate(stages=["generate", "judge"])
    assert cols["params"]["judge"] == "served-judge"


@pytest.mark.parametrize("params, field, words", [
    ({"stages": ["generate", "train"]}, "params.stages", "unknown stage 'train'"),
    ({"stages": ["judge"], "judge": "j"}, "params.stages", "judge needs responses"),
    ({"stages": ["generate", "vectors"]}, "params.stages", "needs the capture stage"),
    ({"stages": ["generate", "capture", "vectors", "axis"]}, "params.stages", "roles datasets"),
    ({"responses": "abc", "stages": ["generate", "judge"], "judge": "j"}, "params.stages",
     "replace the generate stage"),
])
def test_stage_rules(params, field, words):
    got_field, msg = _field(**params)
    assert got_field == field and words in msg


def test_spec_ranges_refused_by_the_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="judge_reply_retries"):
        JobSpec(dataset="traits_sample", params={"judge": "j", "judge_reply_retries": 11})


def test_rollout_does_not_take_a_judge():
    with pytest.raises(SpecInvalid) as e:
        validate(None, JobSpec(dataset="traits_sample", kind="rollout", params={"judge": "j"}),
                 settings=Settings())
    assert e.value.field == "params.judge"


def test_persona_without_eval_prompt_is_refused(tmp_path, monkeypatch):
    from app.datasets import SAMPLES_DIR

    root = tmp_path / "root"
    (root / "mini" / "instructions").mkdir(parents=True)
    src = SAMPLES_DIR / "traits_sample"
    (root / "mini" / "questions.jsonl").write_bytes((src / "questions.jsonl").read_bytes())
    for name, drop in (("curious", True), ("optimistic", False)):
        data = json.loads((src / "instructions" / f"{name}.json").read_text())
        if drop:
            data.pop("eval_prompt")
        (root / "mini" / "instructions" / f"{name}.json").write_text(json.dumps(data))
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", str(root))
    field, msg = _field(dataset="mini", judge="j")
    assert field == "params.judge" and "curious" in msg and "optimistic" not in msg
    data = json.loads((src / "instructions" / "curious.json").read_text())
    data["eval_prompt"] += " Reply as {score}."
    (root / "mini" / "instructions" / "curious.json").write_text(json.dumps(data))
    field, msg = _field(dataset="mini", judge="j")
    assert field == "params.judge" and "does not fill" in msg and "KeyError" in msg
