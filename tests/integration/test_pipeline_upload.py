"""``chatspace-jobs submit DATASET --responses ./folder`` against a remote API: the CLI checks
the files, uploads them through ``PUT /uploads/responses/<id>/<persona>`` (checked again
there), the API keeps them in its artifact store, and the capture and judge stages of the
job read them from there.

Real parts: a real API server (uvicorn on 127.0.0.1, Postgres), the CLI speaking HTTP to
it with a data directory of its own (so an upload can reach the API's store only over
HTTP), a real Celery worker (transformers backend, tiny model) on Redis, and a scripted
OpenAI-compatible judge on 127.0.0.1 that records what it is asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.integration import worker_helpers as h
from tests.integration.test_cli import api, ok_json, run  # noqa: F401  (fixtures)
from tests.scripted_openai import Action, ScriptedServer, answer_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GIVEN = {  # persona -> (label, prompt index, question index, answer)
    "curious": [("pos", 0, 0, "Ooh, what a puzzle. Why would tides be twice a day?"),
                ("neg", 0, 0, "Tides happen. That is all."),
                ("default", 0, 0, "Tides come from the moon's pull on the oceans.")],
    "optimistic": [("pos", 0, 1, "It will turn out wonderfully, you'll see!"),
                   ("neg", 0, 1, "It will probably go wrong.")],
}


def _line(label, p, q, answer, question="How do tides work?") -> str:
    return json.dumps({"system_prompt": "", "prompt_index": p, "question_index": q,
                       "question": question, "label": label,
                       "conversation": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}]})


def _write(folder: Path) -> dict[str, bytes]:
    folder.mkdir(exist_ok=True)
    blobs = {}
    for persona, rows in GIVEN.items():
        blobs[persona] = "".join(_line(*r) + "\n" for r in rows).encode()
        (folder / f"{persona}.jsonl").write_bytes(blobs[persona])
    return blobs


def test_a_responses_folder_is_uploaded_through_the_api_and_read_by_the_stages(
        api, run, tmp_path, monkeypatch):  # noqa: F811
    from app.artifacts import read_persona_artifact
    from app.responses import upload_id
    from app.storage import get_store

    server_data = Path(os.environ["CHATSPACE_DATA_DIR"])
    store = get_store(api.settings)  # the API's artifact store
    given = tmp_path / "given"
    blobs = _write(given)
    upload = upload_id(blobs)
    submit = ("submit", "traits_sample", "--model", h.MODEL, "--dtype", h.DTYPE, "--judge",
              "judge-m", "--personas", "curious,optimistic", "--responses", str(given))
    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(tmp_path / "cli-data"))

    # a bad line: exit 2 naming the file, line and field; nothing uploaded, nothing submitted
    (given / "optimistic.jsonl").write_text(_line("pos", 0, 1, "Yes!") + "\n"
                                            + '{"label": "odd", "prompt_index": 0}\n')
    r = run(*submit, url=api.url)
    assert r.exit_code == 2, r.output
    assert f"{given / 'optimistic.jsonl'} line 2: field 'label'" in r.stderr, r.stderr
    assert api.enqueued.ids == [] and not store.list("uploads/")
    assert api.http.get("/jobs").json()["jobs"] == []

    # the API checks every line itself (a client that skips the check), and refuses other
    # content under a name already used, and callers without the token
    url = f"/uploads/responses/{upload}/optimistic"
    bad = api.http.put(url, content=b'{"label": "pos", "question": "q"}\n')
    assert bad.status_code == 422, bad.text
    body = bad.json()
    assert body["field"] == "optimistic.jsonl" and "line 1: field 'prompt_index'" in body[
        "message"], body
    assert httpx.put(api.url + url, content=blobs["optimistic"]).status_code == 401
    monkeypatch.setattr("app.responses.MAX_UPLOAD_BYTES", 100)
    big = api.http.put(url, content=blobs["optimistic"])
    assert big.status_code == 413 and big.json()["field"] == "optimistic.jsonl", big.text
    monkeypatch.setattr("app.responses.MAX_UPLOAD_BYTES", 256 * 1024 * 1024)
    assert not store.list("uploads/")

    # the good files: uploaded byte for byte into the API's store, the job reads them there
    _write(given)
    job = ok_json(run(*submit, "--json", url=api.url))
    assert job["kind"] == "pipeline" and job["params"]["stages"] == ["capture", "judge",
                                                                      "vectors"]
    assert job["params"]["responses"] == job["params"]["responses_prefix"] == f"uploads/{upload}"
    for persona, blob in blobs.items():
        assert store.get_bytes(f"uploads/{upload}/{persona}.jsonl") == blob
    assert not list((tmp_path / "cli-data").rglob("*.jsonl"))  # nothing stored client-side
    again = api.http.put(url, content=blobs["optimistic"])  # a retried upload: the same
    assert again.status_code == 200 and again.json()["samples"] == 2, again.text
    clash = api.http.put(url, content=blobs["curious"])
    assert clash.status_code == 409 and clash.json()["field"] == "upload_id", clash.text

    # a real worker runs it: capture of the given conversations, judge of the given answers
    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(server_data))
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    monkeypatch.setenv("CHATSPACE_ENGINE_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("CHATSPACE_JUDGE_API_KEY", "sk-upload-test-key")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    from app.settings import get_settings
    from workers.dispatch import enqueue_job

    with ScriptedServer(lambda req, n: Action(text="80")) as srv:
        monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", srv.base_url)
        get_settings.cache_clear()
        worker = h.start_worker("upload-w", tmp_path / "logs")
        try:
            enqueue_job(job["id"])  # the test API's enqueue only records
            row = h.wait_for(job["id"], timeout=300, log_dir=tmp_path / "logs", worker=worker)
        finally:
            h.stop(worker)
        asked = sorted(answer_of(p) for p in srv.prompts())
    assert row["state"] == "succeeded", row
    assert asked == sorted(r[3] for rows in GIVEN.values() for r in rows)  # each once
    prefix = row["manifest_key"].rsplit("/", 1)[0]
    for persona, rows in GIVEN.items():
        art = read_persona_artifact(store.get_bytes(f"{prefix}/activations/{persona}.safetensors"))
        assert list(art.keys) == [f"{lab}_p{p}_q{q}" for lab, p, q, _ in rows]
        scores = json.loads(store.get_bytes(f"{prefix}/scores/{persona}.json"))
        assert scores == dict.fromkeys(art.keys, 80)
    assert not store.list(f"{prefix}/responses/")  # nothing generated
    status = api.http.get(f"/jobs/{job['id']}").json()
    assert {s: v["succeeded"] for s, v in status["progress"]["stages"].items()} == {
        "capture": 2, "judge": 2, "vectors": 2}
