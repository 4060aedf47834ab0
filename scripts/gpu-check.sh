#!/usr/bin/env bash
# The GPU proof, run on the lent GPU machine after staging vLLM (see ../shared/gpu/README.md):
#   call 1 (carry .gpu-stage/a):                 bash .gpu-stage/a/unpack.sh
#   call 2 (carry .gpu-stage/b .gpu-stage/c):    bash scripts/gpu-check.sh tests
#   call 3 (same machine, same carry):           bash scripts/gpu-check.sh bench-0.6b
#   call 4:                                      bash scripts/gpu-check.sh bench-8b
# .gpu-stage/c holds this project's own Python deps as py3.12 wheels (scripts/gpu-stage-deps.sh).
# Logs and JSON results go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-tests}
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
. .gpu-stage/b/env.sh || exit 5
. .gpu-stage/c/env.sh || exit 5
export VLLM_USE_V2_MODEL_RUNNER=0 CHATSPACE_GPU_OUT="$OUT" HF_HOME=/tmp/hf
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
stamp=$(date -u +%Y%m%dT%H%MZ)
case "$phase" in
  tests)
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    export CHATSPACE_GPU_MODELS=/tmp/gpu-models
    for f in test_gpu_cleanup:170 test_gpu_parity:400; do  # own processes: cleanup reads NVML
      t=${f#*:}; f=${f%:*}
      timeout "$t" python3 -m pytest -m gpu "tests/gpu/$f.py" -v -p no:cacheprovider \
        --junitxml="$OUT/$f.xml" > "$OUT/$f.log" 2>&1
      echo "$f rc=$?"; tail -25 "$OUT/$f.log"
    done
    ;;
  bench-0.6b|bench-8b)
    shape=${phase#bench-}
    timeout 570 python3 bench/engine_overhead.py --shape "qwen3-$shape" --dtype bfloat16 \
      --json "$OUT/bench-${card}-qwen3-${shape}-${stamp}.json" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench-$shape.log" | tail -60
    ;;
  *) echo "unknown phase $phase (tests | bench-0.6b | bench-8b)" >&2; exit 2 ;;
esac
