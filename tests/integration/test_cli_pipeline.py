"""``chatspace-jobs submit --judge`` and ``--responses PATH`` in-process on the embedded
default: the job is a pipeline with per-stage progress; a responses folder is checked line
by line, uploaded to the artifact store and read from there; mistakes exit 2 naming the
file, line and field, with nothing submitted."""

from __future__ import annotations

import json

from tests.integration.test_cli import ok_json, run  # noqa: F401  (fixture)


def _line(label, p, q, answer="Hello there.") -> str:
    return json.dumps({"system_prompt": "", "prompt_index": p, "question_index": q,
                       "question": "How?", "label": label,
                       "conversation": [{"role": "user", "content": "How?"},
                                        {"role": "assistant", "content": answer}]})


def test_judge_and_responses_in_process(run, monkeypatch, tmp_path):  # noqa: F811
    from app.db import dispose_all
    from app.settings import get_settings
    from app.storage import get_store

    monkeypatch.delenv("CHATSPACE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    job = ok_json(run("submit", "traits_sample", "--judge", "some-judge", "--max-samples", "2",
                      "--json"))
    assert job["kind"] == "pipeline" and job["state"] == "queued"
    st = ok_json(run("status", job["id"], "--json"))["progress"]
    assert list(st["stages"]) == ["generate", "capture", "judge", "vectors"]
    assert st["stages"]["judge"]["items"] == 3 and st["items_total"] == 12
    assert {p["stage"] for p in st["personas"]} == set(st["stages"])

    given = tmp_path / "given"
    given.mkdir()
    (given / "curious.jsonl").write_text(_line("pos", 0, 0) + "\n" + _line("neg", 0, 0) + "\n")
    r = run("submit", "traits_sample", "--judge", "j", "--responses", str(given))
    assert r.exit_code == 2 and "optimistic" in r.stderr and "params.responses" in r.stderr
    (given / "optimistic.jsonl").write_text(_line("pos", 0, 0) + "\n")
    (given / "sycophantic.jsonl").write_text('{"label": "odd"}\n')
    r = run("submit", "traits_sample", "--judge", "j", "--responses", str(given))
    assert r.exit_code == 2 and "sycophantic.jsonl line 1: field 'label'" in r.stderr
    (given / "sycophantic.jsonl").write_text(_line("pos", 1, 2) + "\n")
    job = ok_json(run("submit", "traits_sample", "--judge", "j", "--responses", str(given),
                      "--json"))
    prefix = job["params"]["responses_prefix"]
    assert prefix.startswith("uploads/") and job["params"]["stages"] == [
        "capture", "judge", "vectors"]
    store = get_store(get_settings())
    assert store.get_bytes(f"{prefix}/curious.jsonl") == (given / "curious.jsonl").read_bytes()
    jobs = ok_json(run("list", "--json"))
    assert len(jobs) == 2  # the refused submits wrote nothing
    dispose_all()
