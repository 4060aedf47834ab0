"""A steering sweep end to end on the embedded default, through the real CLI (subprocesses
with nothing configured but a data directory and a datasets root): a capture job, then a
sweep over 5 scales x 2 personas steered by its ``pos_neg`` vector on the real vLLM engine
(tiny Qwen3), then ``chatspace-jobs sweep`` printing the table and saving the plot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SAMPLES = Path(__file__).resolve().parents[2] / "app" / "samples" / "traits_sample"
SCALES = [-8.0, -4.0, 0.0, 4.0, 8.0]


def _dataset(root: Path) -> None:
    """traits_sample with two personas (and its default prompts)."""
    dst = root / "traits_pair"
    (dst / "instructions").mkdir(parents=True)
    shutil.copy(SAMPLES / "questions.jsonl", dst / "questions.jsonl")
    for name in ("curious", "optimistic", "default"):
        shutil.copy(SAMPLES / "instructions" / f"{name}.json", dst / "instructions")


def _cli(env, cwd, *args, timeout=900):
    exe = Path(sys.executable).with_name("chatspace-jobs")
    proc = subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    logs = sorted((Path(env["CHATSPACE_DATA_DIR"]) / "logs").glob("*.log"))
    detail = (args, proc.stdout[-3000:], proc.stderr[-3000:],
              "\n".join(p.read_text()[-3000:] for p in logs) or "no worker log")
    assert proc.returncode == 0, detail
    return proc


def _start_worker(env, cwd, log: Path) -> subprocess.Popen:
    """One local worker for both jobs (one engine start), in its own session so the test can
    end it and everything it started."""
    import time

    exe = Path(sys.executable).with_name("chatspace-jobs")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(exe), "worker", "--model", "tiny:qwen3", "--dtype",
                                 "float32", "--name", "sweep-e2e"], env=env, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # registered and heartbeating: submits will use it
        if proc.poll() is not None:
            raise AssertionError(f"worker exited: {log.read_text()[-3000:]}")
        shown = subprocess.run([str(exe), "workers", "--json"], env=env, cwd=cwd,
                               capture_output=True, text=True, check=False)
        if shown.returncode == 0 and any(w.get("alive") for w in json.loads(shown.stdout)):
            return proc
        time.sleep(2)
    raise AssertionError(f"worker never came up: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_sweep_five_scales_two_personas_on_the_embedded_default(tmp_path, monkeypatch):
    data, datasets = tmp_path / "data", tmp_path / "datasets"
    _dataset(datasets)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "CHATSPACE_DATA_DIR": str(data), "CHATSPACE_DATASETS_ROOT": str(datasets),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    common = ["--max-samples", "6", "--max-tokens", "8", "--seed", "0"]
    _cli(env, tmp_path, "db", "upgrade")  # the worker starts before any CLI call migrates
    worker = _start_worker(env, tmp_path, data / "logs" / "sweep-worker.log")
    try:
        _jobs(env, tmp_path, common, data, monkeypatch)
    finally:
        _stop(worker)


def _jobs(env, tmp_path, common, data, monkeypatch):
    datasets = Path(env["CHATSPACE_DATASETS_ROOT"])
    cap = _cli(env, tmp_path, "submit", "traits_pair", "--layers", "1,2", *common, "--wait")
    capture_id = cap.stdout.split()[0]
    sweep = _cli(env, tmp_path, "submit", "traits_pair", "--kind", "rollout", "--steer-from",
                 capture_id, "--vector", "pos_neg", "--layers", "2", "--scales",
                 ",".join(f"{s:g}" for s in SCALES), "--normalize", *common, "--wait")
    sweep_id = sweep.stdout.split()[0]
    # the grid size is printed at submit, before anything runs
    assert "sweep: 5 grid points x 2 personas (12 samples) = 60 requests" in sweep.stderr

    plot = tmp_path / "plot.png"
    shown = _cli(env, tmp_path, "sweep", sweep_id, "-o", str(plot), "--json")
    table = json.loads(shown.stdout)
    assert table["complete"] and table["state"] == "succeeded"
    rows = table["rows"]
    assert len(rows) == 10
    assert sorted({r["persona"] for r in rows}) == ["curious", "optimistic"]
    for persona in ("curious", "optimistic"):
        mine = [r for r in rows if r["persona"] == persona]
        assert [r["scale"] for r in mine] == SCALES and all(r["layer"] == 2 for r in mine)
    for r in rows:
        assert r["n"] == 6 and 1 <= r["mean_response_tokens"] <= 8
        assert r["judge_mean"] is None and r["refusal_rate"] is None and r["minilm_mean"] is None
    assert all(not v["computed"] and v["reason"] for v in table["scores"].values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    human = _cli({**env, "COLUMNS": "160"}, tmp_path, "sweep", sweep_id, "--no-plot")
    assert "tokens" in human.stdout and "judge" in human.stdout and "null" in human.stdout
    assert human.stdout.count("L2_s") == 10

    # What the worker stored, read with this process's settings on the same data directory.
    from app.db import session_scope
    from app.models import Job
    from app.settings import get_settings
    from app.storage import get_store

    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(data))
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", str(datasets))
    get_settings.cache_clear()
    with session_scope() as s:
        manifest_key = s.get(Job, sweep_id).manifest_key
    store = get_store(get_settings())
    manifest = json.loads(store.get_bytes(manifest_key))
    kinds = {e["kind"] for e in manifest["artifacts"]}
    assert {"persona", "jsonl", "sweep_summary", "sweep_plot"} <= kinds
    for e in manifest["artifacts"]:
        assert store.verify(e["key"], e["sha256"]), e
    plot_entry = next(e for e in manifest["artifacts"] if e["kind"] == "sweep_plot")
    assert store.get_bytes(plot_entry["key"]) == plot.read_bytes()
    responses = {}
    for r in rows:
        lines = [json.loads(x) for x in store.get_bytes(r["responses_key"]).decode().splitlines()]
        assert len(lines) == 6 and {x["point"] for x in lines} == {r["point"]}
        (op,) = {json.dumps(x["steer"], sort_keys=True) for x in lines}
        op = json.loads(op)[0]
        assert op["scale"] == r["scale"] and op["normalize"] is True
        assert op["from"] == {"job_id": capture_id, "vector": "pos_neg",
                              "persona": r["persona"], "layer": 2}
        responses[(r["persona"], r["scale"])] = [x["response"] for x in lines]
    # the same prompts at every grid point; the strongest steering changes what is generated
    for persona in ("curious", "optimistic"):
        assert responses[(persona, 8.0)] != responses[(persona, 0.0)] or \
            responses[(persona, -8.0)] != responses[(persona, 0.0)]
