"""Dataset format, validation messages, named-dataset resolution and judge scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.datasets import (
    list_datasets,
    load_dataset,
    load_dataset_at,
    load_scores,
    validate_dataset,
)
from app.errors import DatasetInvalid, DatasetNotFound, SpecInvalid
from app.settings import Settings

TRAIT = {"instruction": [{"pos": "Be upbeat.", "neg": "Be gloomy."},
                         {"pos": "See the bright side.", "neg": "See the dark side."}],
         "eval_prompt": "Rate {question} {answer}"}
QUESTIONS = [{"question": "How are you?", "id": 0}, {"question": "What now?", "id": 1}]


def write_ds(root: Path, name="ds", personas=None, questions=QUESTIONS, sub="instructions"):
    d = root / name
    (d / sub).mkdir(parents=True, exist_ok=True)
    for pname, body in (personas if personas is not None else {"upbeat": TRAIT}).items():
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        (d / sub / f"{pname}.json").write_bytes(raw)
    if questions is not None:
        raw = questions if isinstance(questions, bytes) else "\n".join(
            json.dumps(q) for q in questions).encode()
        (d / "questions.jsonl").write_bytes(raw)
    return d


def settings_for(root: Path) -> Settings:
    return Settings(datasets_root=str(root))


def only_problem(path: Path):
    problems = validate_dataset(path)
    assert len(problems) == 1, problems
    return problems[0], str(problems[0])


# ------------------------------------------------------------------------- shipped samples


def test_shipped_samples_load():
    traits = load_dataset("traits_sample")
    assert traits.kind == "traits"
    assert set(traits.personas) == {"optimistic", "sycophantic", "curious", "default"}
    assert len(traits.questions) == 10
    for name in ("optimistic", "sycophantic", "curious"):
        p = traits.personas[name]
        assert 3 <= len(p.instructions) <= 5 and all("neg" in i for i in p.instructions)
        assert "{question}" in p.eval_prompt and "{answer}" in p.eval_prompt
    roles = load_dataset("roles_sample")
    assert roles.kind == "roles" and "default" in roles.personas
    assert len([p for p in roles.personas if p != "default"]) == 3
    assert roles.personas["default"].instructions[0] == {"pos": ""}
    assert validate_dataset("traits_sample") == [] and validate_dataset("roles_sample") == []


def test_list_datasets_counts():
    summaries = {s.name: s for s in list_datasets()}
    assert summaries["traits_sample"].kind == "traits"
    assert summaries["traits_sample"].personas == 4
    ds = load_dataset("traits_sample")
    assert summaries["traits_sample"].samples == sum(len(ds.samples(p)) for p in ds.personas)
    assert summaries["traits_sample"].has_default and summaries["traits_sample"].questions == 10
    assert summaries["roles_sample"].kind == "roles"


def test_samples_keys_order_and_pairing():
    ds = load_dataset("traits_sample")
    s = ds.samples("optimistic")
    assert s == ds.samples("optimistic")  # deterministic
    n_pairs = len(ds.personas["optimistic"].instructions)
    assert len(s) == 10 * 2 * n_pairs == ds.sample_count("optimistic")
    assert [x.key for x in s[:3]] == ["pos_p0_q0", "neg_p0_q0", "pos_p0_q1"]
    first = s[0]
    assert first.system_prompt == ds.personas["optimistic"].instructions[0]["pos"]
    assert first.question == ds.questions[0].text
    assert s[1].system_prompt == ds.personas["optimistic"].instructions[0]["neg"]
    assert len({x.key for x in s}) == len(s)
    assert [x.key for x in ds.samples("optimistic", max_samples=4)] == [x.key for x in s[:4]]
    # the default persona is captured once per job; asked for, it pairs per prompt/question
    paired = ds.samples("optimistic", include_default=True)
    assert [x.key for x in paired[:3]] == ["pos_p0_q0", "neg_p0_q0", "default_p0_q0"]
    assert paired[2].system_prompt == ""  # default prompt 0: no system prompt
    roles = load_dataset("roles_sample")
    assert {x.label for x in roles.samples("default")} == {"default"}
    assert {x.label for x in roles.samples("stage_magician")} == {"pos"}
    n_default = len(ds.personas["default"].instructions)
    assert ds.job_sample_count() == 10 * (sum(2 * len(p.instructions) for n, p in
                                              ds.personas.items() if n != "default")
                                          + n_default)
    assert ds.job_sample_count(personas=["optimistic"], questions=3) == 3 * (2 * n_pairs
                                                                             + n_default)


def test_questions_cap_keeps_the_first_n_as_question_count_does():
    ds = load_dataset("traits_sample")
    s = ds.samples("optimistic", questions=3)
    assert {x.question_index for x in s} == {0, 1, 2}
    assert len(s) == 3 * 2 * len(ds.personas["optimistic"].instructions)


def test_root_level_persona_files_and_own_questions(tmp_path):
    # persona-subspace trait files: persona files in the folder, their own question lists.
    body = dict(TRAIT, questions=["Q one?", "Q two?", "Q three?"])
    write_ds(tmp_path, personas={"upbeat": body}, questions=None, sub=".")
    ds = load_dataset("ds", settings=settings_for(tmp_path))
    assert ds.questions == []
    assert [q.text for q in ds.personas["upbeat"].questions] == ["Q one?", "Q two?", "Q three?"]
    assert len(ds.samples("upbeat")) == 2 * 3 * 2


def test_any_single_jsonl_is_the_shared_questions(tmp_path):
    d = write_ds(tmp_path, questions=None)
    (d / "extraction_questions.jsonl").write_text(json.dumps({"question": "Hi?", "id": "a"}))
    ds = load_dataset_at(d)
    assert [(q.index, q.id, q.text) for q in ds.questions] == [(0, "a", "Hi?")]


# ------------------------------------------------------------------------------ validation


def test_missing_instruction(tmp_path):
    d = write_ds(tmp_path, personas={"upbeat": {"eval_prompt": "x"}})
    p, text = only_problem(d)
    assert (p.file, p.persona, p.field) == ("instructions/upbeat.json", "upbeat", "instruction")
    assert "upbeat.json" in text and "upbeat" in text and "instruction" in text


def test_missing_neg_in_a_pair(tmp_path):
    bad = {"instruction": [{"pos": "a", "neg": "b"}, {"pos": "c"}]}
    p, text = only_problem(write_ds(tmp_path, personas={"upbeat": bad}))
    assert p.field == "instruction[1].neg" and "missing instruction" in text


def test_wrong_types(tmp_path):
    bad = {"instruction": [{"pos": 3, "neg": "b"}], "eval_prompt": ["x"]}
    problems = validate_dataset(write_ds(tmp_path, personas={"upbeat": bad}))
    fields = {p.field: str(p) for p in problems}
    assert "must be a string, not int" in fields["instruction[0].pos"]
    assert "eval_prompt" in fields
    assert all("instructions/upbeat.json" in s for s in fields.values())


def test_instruction_not_a_list(tmp_path):
    p, text = only_problem(write_ds(tmp_path, personas={"upbeat": {"instruction": "be nice"}}))
    assert p.field == "instruction" and "non-empty list" in text


def test_empty_questions(tmp_path):
    p, text = only_problem(write_ds(tmp_path, personas={"upbeat": TRAIT}, questions=None))
    assert (p.persona, p.field) == ("upbeat", "questions") and "empty questions" in text
    p, text = only_problem(write_ds(tmp_path, name="ds2", questions=b"\n\n"))
    assert p.file == "questions.jsonl" and "empty questions" in text


def test_bad_json_reports_line_and_column(tmp_path):
    raw = b'{\n  "instruction": [\n    {"pos": "a", "neg": "b"},,\n  ]\n}'
    p, text = only_problem(write_ds(tmp_path, personas={"upbeat": raw}))
    assert p.file == "instructions/upbeat.json" and p.persona == "upbeat"
    assert "line 3 column" in text


def test_bad_json_line_in_questions(tmp_path):
    raw = b'{"question": "a", "id": 0}\n{"question": "b", "id": 1\n'
    p, text = only_problem(write_ds(tmp_path, questions=raw))
    assert p.file == "questions.jsonl" and "line 2" in text


def test_duplicate_question_ids(tmp_path):
    qs = QUESTIONS + [{"question": "Again?", "id": 1}]
    p, text = only_problem(write_ds(tmp_path, questions=qs))
    assert (p.file, p.field) == ("questions.jsonl", "id")
    assert "duplicate id 1" in text and "line 3" in text and "line 2" in text


def test_question_wrong_types(tmp_path):
    qs = [{"question": 5, "id": 0}, {"question": "ok", "id": [1]}]
    problems = validate_dataset(write_ds(tmp_path, questions=qs))
    assert [p.field for p in problems] == ["question", "id"]
    assert "line 1" in str(problems[0]) and "line 2" in str(problems[1])


def test_non_utf8(tmp_path):
    raw = json.dumps(TRAIT).encode().replace(b"upbeat", b"upb\xe9at")
    p, text = only_problem(write_ds(tmp_path, personas={"upbeat": raw}))
    assert p.file == "instructions/upbeat.json" and "not UTF-8" in text and "0xe9" in text


def test_mixed_kinds(tmp_path):
    d = write_ds(tmp_path, personas={"upbeat": TRAIT, "pirate": {"instruction": [{"pos": "Arr"}]}})
    _, text = only_problem(d)
    assert "one kind" in text


def test_load_raises_dataset_invalid_with_all_problems(tmp_path):
    write_ds(tmp_path, personas={"upbeat": {"instruction": []}, "b": {}})
    with pytest.raises(DatasetInvalid) as ei:
        load_dataset("ds", settings=settings_for(tmp_path))
    assert len(ei.value.problems) == 2
    assert "instructions/b.json" in str(ei.value) and "and 1 more" in str(ei.value)
    assert ei.value.field == "instruction"


def test_invalid_dataset_listed_as_invalid(tmp_path):
    write_ds(tmp_path, name="good")
    write_ds(tmp_path, name="bad", personas={"x": b"{"})
    got = {s.name: s for s in list_datasets(settings=settings_for(tmp_path))}
    assert got["good"].kind == "traits" and got["good"].samples == 2 * 2 * 2
    assert got["bad"].kind == "invalid" and got["bad"].problems == 1


# ------------------------------------------------------------------------- name resolution


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", "/etc/passwd", "", "x" * 200,
                                  "a\\b", ".hidden", "a..b"])
def test_names_cannot_escape_root(tmp_path, name):
    write_ds(tmp_path)
    with pytest.raises(SpecInvalid) as ei:
        load_dataset(name, settings=settings_for(tmp_path))
    assert ei.value.field == "dataset"


def test_unknown_name_lists_available(tmp_path):
    write_ds(tmp_path, name="alpha")
    write_ds(tmp_path, name="beta")
    with pytest.raises(DatasetNotFound) as ei:
        load_dataset("gamma", settings=settings_for(tmp_path))
    assert ei.value.field == "dataset" and "alpha, beta" in str(ei.value)


def test_symlink_out_of_root_refused(tmp_path):
    outside = write_ds(tmp_path / "outside")
    root = tmp_path / "root"
    root.mkdir()
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SpecInvalid, match="outside"):
        load_dataset("sneaky", settings=settings_for(root))


def test_datasets_root_from_environment(tmp_path, monkeypatch):
    from app.settings import get_settings

    write_ds(tmp_path, name="env_ds")
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", str(tmp_path))
    get_settings.cache_clear()
    assert load_dataset("env_ds").kind == "traits"
    with pytest.raises(DatasetNotFound):
        load_dataset("traits_sample")


def test_unknown_persona(tmp_path):
    ds = load_dataset("traits_sample")
    with pytest.raises(DatasetNotFound) as ei:
        ds.samples("grumpy")
    assert ei.value.field == "persona" and "optimistic" in str(ei.value)


# ---------------------------------------------------------------------------------- scores


def test_scores_loaded_when_present(tmp_path):
    d = write_ds(tmp_path)
    assert load_scores(load_dataset_at(d), "upbeat") is None
    (d / "extract_scores").mkdir()
    (d / "extract_scores" / "upbeat.json").write_text(json.dumps(
        {"pos_p0_q0": 88, "neg_p0_q0": "REFUSAL", "pos_p1_q1": 12.5}))
    ds = load_dataset_at(d)
    assert ds.scores_dir and ds.scores_dir.endswith("extract_scores")
    assert load_scores(ds, "upbeat") == {"pos_p0_q0": 88.0, "neg_p0_q0": "REFUSAL",
                                         "pos_p1_q1": 12.5}


def test_bad_score_value_names_file_and_key(tmp_path):
    d = write_ds(tmp_path)
    (d / "extract_scores").mkdir()
    (d / "extract_scores" / "upbeat.json").write_text(json.dumps({"pos_p0_q0": "high"}))
    with pytest.raises(DatasetInvalid) as ei:
        load_scores(load_dataset_at(d), "upbeat")
    assert "extract_scores/upbeat.json" in str(ei.value) and ei.value.field == "pos_p0_q0"
