"""Tiny random models for engine tests, one per family, built once per test session.

``tiny_model("qwen3")`` returns the directory of a model ``workers.engine.tiny`` built (fp32
safetensors, trained tokenizer, chat template); vLLM and transformers both load it. Building
takes well under a second per family once transformers is imported, so nothing is kept
across sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from workers.engine.tiny import FAMILIES, ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_models_dir) -> Callable[[str], Path]:
    """Factory: ``tiny_model(family) -> Path`` (family as in ``tiny.FAMILIES`` or
    ``tiny:<family>``); each family is built on first use and reused for the session."""

    def get(family: str) -> Path:
        return ensure_tiny_model(family if family.startswith("tiny:") else f"tiny:{family}",
                                 tiny_models_dir)

    return get


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    """Parametrize a test over every supported family."""
    return request.param
