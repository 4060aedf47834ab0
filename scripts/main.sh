#!/usr/bin/env bash
# Set up .venv/ (idempotent) and run the main job on the embedded default: a capture job over the
# shipped `traits_sample` dataset with a tiny generated Qwen3 model, on SQLite, a filesystem
# broker, a local worker and a local artifact folder (all under the per-user data folder:
# ~/.local/share/chatspace-jobs on Linux, or $CHATSPACE_DATA_DIR). Prints where the artifacts
# are. Extra arguments go to `chatspace-jobs submit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/chatspace-jobs submit traits_sample --wait "$@"
.venv/bin/chatspace-jobs artifacts ls
