"""Both engine backends implement the one Engine protocol the worker's runtime calls (the
reference backend lacked ``shutdown()``: a traceback on every worker shutdown)."""

from __future__ import annotations

import inspect

import pytest

from workers.engine.engine import SteeringEngine
from workers.engine.hf import HFBackend
from workers.engine.protocol import ENGINE_METHODS, Engine


@pytest.mark.parametrize("backend", [SteeringEngine, HFBackend])
def test_backend_declares_every_engine_method(backend):
    for name in ENGINE_METHODS:
        assert callable(getattr(backend, name, None)), f"{backend.__name__} lacks {name}()"
    assert hasattr(backend, "tokenizer") or "tokenizer" in inspect.getsource(backend.__init__)


def test_hf_backend_shuts_down_and_satisfies_the_protocol(tmp_path):
    from workers.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model("tiny:qwen3", tmp_path)
    engine = HFBackend(path, dtype="float32")
    assert isinstance(engine, Engine)
    engine.shutdown()
    engine.shutdown()  # idempotent: the runtime may call it after a failed job, then at exit
    assert engine.model is None and engine._handles == []
