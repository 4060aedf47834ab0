#!/usr/bin/env bash
# Set up .venv/ (idempotent) and run the whole test suite. pytest's "no tests ran" (exit 5)
# is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The import contracts in pyproject.toml ([tool.importlinter]): a broken one fails the run.
.venv/bin/lint-imports --no-cache || { echo "import contracts broken (lint-imports)" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
