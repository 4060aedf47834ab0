"""The measured figures of GPU tests, for the closing notes: one JSON line per measurement."""

from __future__ import annotations

import json
import os
from pathlib import Path


def record(test: str, **figures) -> None:
    """Append to $CHATSPACE_TEST_GPU_OUT/gpu-figures.jsonl (set by scripts/gpu-check.sh), pass or
    fail; a no-op without it."""
    out = os.environ.get("CHATSPACE_TEST_GPU_OUT")
    if out:
        with open(Path(out) / "gpu-figures.jsonl", "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")
