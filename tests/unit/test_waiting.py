"""What ``--wait`` says while a job has nothing running, and when it starts a local worker
(cli/waiting.py): pure functions of the API's JSON."""

from __future__ import annotations

from cli import waiting

POOL = "chatspace.tiny_qwen3.float32"


def _job(state="queued", personas=("queued", "queued"), last_error=None):
    return {"id": "j1", "model": "tiny:qwen3", "dtype": "float32", "state": state,
            "last_error": last_error,
            "progress": {"personas": [{"state": s} for s in personas]}}


def _worker(state="idle", alive=True, queues=(POOL,), name="w1"):
    return {"name": name, "state": state, "alive": alive, "queues": list(queues)}


def test_the_note_says_why_nothing_runs():
    assert waiting.note(_job(), [_worker("loading")], waited_s=12.4) == \
        "loading model tiny:qwen3 on w1 (12 s)"
    assert waiting.note(_job(), [_worker("busy")], waited_s=3).startswith(
        "waiting for a worker of tiny:qwen3 (float32)")
    assert waiting.note(_job(), [], waited_s=5, local=True) == \
        "starting worker for tiny:qwen3 (float32) (5 s)"
    none = waiting.note(_job(), [_worker(alive=False), _worker(queues=("other",))], waited_s=1)
    assert none.startswith("no live worker serves tiny:qwen3") and "--model tiny:qwen3" in none
    any_model = waiting.note(_job(), [_worker("loading", queues=("chatspace.any",))], waited_s=0)
    assert any_model.startswith("loading model")
    failed_load = waiting.note(_job(last_error="worker w1 could not load tiny:qwen3: OOM"),
                               [_worker("loading")], waited_s=40)
    assert failed_load.endswith("last error: worker w1 could not load tiny:qwen3: OOM")


def test_no_note_once_something_runs_or_the_job_ended():
    assert waiting.note(_job(personas=("running", "queued")), [], waited_s=1) is None
    assert waiting.note(_job(state="failed"), [], waited_s=1) is None


class _Thread:
    def __init__(self):
        self.alive = True

    def is_alive(self):
        return self.alive


def test_a_local_worker_is_started_again_when_the_last_one_exited():
    started: list[_Thread] = []

    def start(job_id):
        started.append(_Thread())
        return started[-1]

    local = waiting.LocalWorkers(start)
    assert local.ensure(_job(), []) and local.active
    assert not local.ensure(_job(), [])  # the one started is still starting
    started[-1].alive = False  # it exited (say, its load failed) and the job still waits
    assert local.ensure(_job(), []) and local.started == 2
    started[-1].alive = False
    assert not local.ensure(_job(), [_worker()])  # another live worker serves it
    assert not local.ensure(_job(personas=("running",)), [])
    assert not local.ensure(_job(state="failed"), [])
    assert local.started == 2
