"""The CHATSPACE_WORKER_* contract: what the launcher writes, the worker reads back."""

from __future__ import annotations

import pytest

from workers.config import WORKER_ENV, WorkerEnv, nodename


def test_worker_env_round_trips_through_the_environment(monkeypatch):
    sent = WorkerEnv(name="h-gpu1", gpu="1", model="tiny:qwen3", dtype="float32",
                     queues=["chatspace.tiny_qwen3.float32", "extra"], max_jobs=3,
                     exit_when_idle=True)
    for key, value in sent.to_env().items():
        monkeypatch.setenv(key, value)
    assert WorkerEnv() == sent
    assert sent.to_env()[WORKER_ENV] == "h-gpu1"


def test_empty_variables_mean_unset_except_gpu(monkeypatch):
    cpu = WorkerEnv(name="h-cpu", gpu="").to_env()
    for key, value in cpu.items():
        monkeypatch.setenv(key, value)
    got = WorkerEnv()
    assert got.gpu == "" and got.model is None and got.max_jobs is None
    assert got.queues == [] and got.exit_when_idle is False
    monkeypatch.delenv(WORKER_ENV[:-4] + "GPU")
    assert WorkerEnv().gpu is None  # unset: the worker picks the first visible GPU


def test_nodename():
    assert nodename("h-gpu0") == "chatspace@h-gpu0" and nodename("x@y") == "x@y"


def test_async_scheduling_needs_the_ingraph_path(monkeypatch):
    from pydantic import ValidationError

    from app.settings import EngineSettings

    monkeypatch.setenv("CHATSPACE_ENGINE_ASYNC_SCHEDULING", "1")
    monkeypatch.setenv("CHATSPACE_ENGINE_STEERING_PATH", "eager")
    with pytest.raises(ValidationError, match="CHATSPACE_ENGINE_STEERING_PATH=ingraph"):
        EngineSettings()
    monkeypatch.setenv("CHATSPACE_ENGINE_STEERING_PATH", "ingraph")
    assert EngineSettings().async_scheduling is True


def test_auto_steering_path_is_ingraph_with_async_on_a_gpu_and_eager_elsewhere(monkeypatch):
    from app.settings import Settings
    from workers import gpu, runtime

    for key in ("CHATSPACE_ENGINE_STEERING_PATH", "CHATSPACE_ENGINE_ASYNC_SCHEDULING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(gpu, "visible_gpus", lambda: ["0"])
    assert runtime.steering_path(Settings()) == {"steering_path": "ingraph",
                                                 "async_scheduling": True, "readout": "auto"}
    monkeypatch.setenv("CHATSPACE_ENGINE_TENSOR_PARALLEL_SIZE", "2")
    assert runtime.steering_path(Settings())["steering_path"] == "eager"
    monkeypatch.delenv("CHATSPACE_ENGINE_TENSOR_PARALLEL_SIZE")
    monkeypatch.setenv("CHATSPACE_ENGINE_ASYNC_SCHEDULING", "0")
    assert runtime.steering_path(Settings())["async_scheduling"] is False
    monkeypatch.delenv("CHATSPACE_ENGINE_ASYNC_SCHEDULING")
    monkeypatch.setattr(gpu, "visible_gpus", list)
    assert runtime.steering_path(Settings()) == {"steering_path": "eager",
                                                 "async_scheduling": False, "readout": "auto"}
    monkeypatch.setenv("CHATSPACE_ENGINE_STEERING_PATH", "ingraph")
    assert runtime.steering_path(Settings()) == {"steering_path": "ingraph",
                                                 "async_scheduling": True, "readout": "auto"}
