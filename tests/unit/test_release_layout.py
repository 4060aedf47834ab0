"""The reader on the public release's layout (synthetic data shaped like it), and, when the
release's own files are on this machine, on the release itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.datasets import list_datasets, load_dataset, load_dataset_at, validate_dataset
from app.errors import DatasetNotFound, SpecInvalid
from app.prompts import model_display_name
from app.settings import Settings
from tests.release_data import write_release

RELEASE = Path(os.environ.get("CHATSPACE_RELEASE_DATA",
                              "/work/shared/data/assistant-axis-a989619/data"))


def test_shared_questions_one_level_up_drive_capture(tmp_path):
    data = write_release(tmp_path, n_questions=6, n_own=4)
    traits = load_dataset("traits", settings=Settings(datasets_root=str(data)))
    assert traits.kind == "traits" and len(traits.questions) == 6
    brave = traits.personas["brave"]
    assert [q.text for q in brave.questions] == [f"Shared question number {i}?" for i in range(6)]
    assert len(brave.eval_questions) == 4  # the file's own: evaluation questions
    assert traits.sample_count("brave") == 5 * 6 * 2
    evals = traits.samples("brave", purpose="eval")
    assert {s.question for s in evals} == {f"Own brave question {j}?" for j in range(4)}


def test_roles_with_instruction_only_default_and_model_name(tmp_path):
    data = write_release(tmp_path)
    roles = load_dataset_at(data / "roles")
    assert roles.kind == "roles" and "default" in roles.personas
    assert roles.personas["default"].eval_questions == []
    with pytest.raises(SpecInvalid, match="model_name"):
        roles.samples("default")  # never sent with the braces in it
    prompts = [s.system_prompt for s in roles.samples("default", questions=1,
                                                       model_name=model_display_name(
                                                           "Qwen/Qwen3-32B"))]
    assert prompts == ["", "You are an assistant.", "You are a model.", "You are Qwen.",
                       "Answer as yourself."]
    custom = roles.samples("default", questions=1, model_name="Claude")
    assert custom[3].system_prompt == "You are Claude."
    # 5 pos x 6 questions per role, the default persona once
    assert roles.job_sample_count() == 2 * 5 * 6 + 5 * 6


def test_display_name_follows_the_public_short_name():
    assert model_display_name("google/gemma-2-27b-it") == "Gemma"
    assert model_display_name("meta-llama/Llama-3.3-70B-Instruct") == "Llama"
    assert model_display_name("tiny:qwen3") == "Qwen"
    assert model_display_name("org/Phi-4-mini") == "Phi"


def test_unknown_placeholder_is_a_problem_naming_file_persona_field(tmp_path):
    data = write_release(tmp_path)
    f = data / "roles" / "instructions" / "pirate.json"
    body = json.loads(f.read_text())
    body["instruction"][2]["pos"] = "You are {user_name}'s pirate."
    f.write_text(json.dumps(body))
    problems = validate_dataset(data / "roles")
    assert [(p.file, p.persona, p.field) for p in problems] == [
        ("instructions/pirate.json", "pirate", "instruction[2].pos")]
    assert "{user_name}" in str(problems[0])


def test_ls_lists_the_good_ones_beside_a_symlink_out_and_a_broken_folder(tmp_path):
    root = tmp_path / "root"
    data = write_release(tmp_path / "rel")
    root.mkdir()
    (root / "good").symlink_to(data / "traits")  # inside the root? no: outside, refused
    os.symlink(data / "roles", root / "outside")
    inside = write_release(root / "inner", top="x")
    (root / "traits_ok").symlink_to(inside / "traits")
    (root / "broken").mkdir()
    (root / "broken" / "instructions").mkdir()
    (root / "broken" / "instructions" / "a.json").write_bytes(b"\xff\xfe{")
    got = {d.name: d for d in list_datasets(settings=Settings(datasets_root=str(root)))}
    assert got["outside"].kind == "invalid" and "outside" in got["outside"].error
    assert got["good"].kind == "invalid"
    assert got["broken"].kind == "invalid" and "UTF-8" in got["broken"].error
    assert got["traits_ok"].kind == "traits" and got["traits_ok"].personas == 3


def test_a_missing_pullable_name_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("traits_240", settings=Settings(datasets_root=str(tmp_path)))
    assert "chatspace-jobs datasets pull traits_240" in str(e.value)


@pytest.mark.skipif(not RELEASE.is_dir(), reason="the release's data/ folder is not here")
def test_the_release_as_published_reads_and_counts():
    settings = Settings(datasets_root=str(RELEASE))
    traits, roles = (load_dataset(n, settings=settings) for n in ("traits", "roles"))
    assert (traits.kind, len(traits.personas), len(traits.questions)) == ("traits", 240, 240)
    assert (roles.kind, len(roles.personas), len(roles.questions)) == ("roles", 276, 240)
    assert "default" not in traits.personas and "default" in roles.personas
    some = next(p for p in traits.personas)
    assert traits.sample_count(some) == 2400  # 5 pos + 5 neg prompts x 240 questions
    assert roles.sample_count("pirate" if "pirate" in roles.personas else "aberration") == 1200
    assert roles.job_sample_count() == 275 * 1200 + 1200
    assert all(len(p.eval_questions) >= 40 for n, p in traits.personas.items())
    defaults = [s.system_prompt for s in roles.samples("default", questions=1,
                                                       model_name="Qwen")]
    assert not any("{" in s for s in defaults) and "You are Qwen." in defaults
    assert validate_dataset(RELEASE / "traits") == [] and validate_dataset(RELEASE / "roles") == []
