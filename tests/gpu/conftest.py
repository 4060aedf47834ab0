"""GPU tests: run on the lent GPU machine by scripts/gpu-check.sh; skipped where CUDA is absent."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu-check.sh on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_models_dir(tmp_path_factory):
    base = os.environ.get("CHATSPACE_TEST_GPU_MODELS")
    return base if base else str(tmp_path_factory.mktemp("gpu-models"))
