#!/usr/bin/env bash
# The GPU proof, run on the lent GPU machine after staging vLLM (../shared/gpu/README.md).
#
#   bash scripts/gpu-check.sh PHASE [PHASE ...]       phases run one after another
#
# phases: diag (per-layer fp32 parity report, TF32 on vs off) | cleanup | ingraph | parity (the gpu tests
# on one GPU) | multi (tensor parallel + two pinned workers; needs 2 GPUs) | bench-0.6b | bench-8b
# | kernel (bench/ingraph_kernel.py: the in-graph op alone per mode; KERNEL_ARGS replaces its arguments)
# | job-throughput (bench/job_throughput.py: the real service on the embedded default against the engine
# alone; JOB_SHAPE=qwen3-8b by default, JOB_BENCH_ARGS replaces its arguments, e.g.
# JOB_BENCH_ARGS="--batch-sizes 16,default --questions 120" for the old default side by side)
# CHATSPACE_TEST_GPU_INDEX=N runs the single-GPU phases on GPU N, so two lanes can share a 2-GPU
# machine. Two lanes write the same log names: give each its own OUT. The calls that ran the
# whole proof on 2x H200 (device tool, kind nvidia-h200-x2, back to back: ~23 min of device time):
#   1 (carry .gpu-stage/a):                bash .gpu-stage/a/unpack.sh
#   2 (carry .gpu-stage/b .gpu-stage/c):   (CHATSPACE_TEST_GPU_INDEX=0 bash scripts/gpu-check.sh bench-0.6b &
#                                           CHATSPACE_TEST_GPU_INDEX=1 bash scripts/gpu-check.sh bench-8b; wait)
#   3 (same machine, same carry):          bash scripts/gpu-check.sh multi
#   4:                                     (OUT=$OUT/l0 PARITY_K=float32 CHATSPACE_TEST_GPU_INDEX=0 ... parity &
#                                           OUT=$OUT/l1 PARITY_K="not float32" CHATSPACE_TEST_GPU_INDEX=1 ... parity; wait)
#   diag and cleanup: the same way, one lane each.
# The in-graph path (2026-11-30, 2x H200, ~26 min of device time in all, each after the unpack call):
#   (CHATSPACE_TEST_GPU_INDEX=0 bash scripts/gpu-check.sh ingraph &
#    CHATSPACE_TEST_GPU_INDEX=1 BENCH_ARGS="--paths ingraph --prompts 288 --prompt-len 256 --tokens 128 \
#      --reps 3 --gpu-memory-utilization 0.45 --compiled-share 0.45" bash scripts/gpu-check.sh bench-8b; wait)
#   (... BENCH_ARGS="--paths ingraph --prompts 768 --prompt-len 256 --tokens 128 --reps 3" ... bench-0.6b & ... bench-8b)
# Stop 23 (2x H200, 1,643 s of device time in all, each after the unpack call):
#   (CHATSPACE_TEST_GPU_INDEX=0 BENCH_ARGS="--paths ingraph,ingraph_async --modes plain,capture_all_layers,\
#      steer_all_layers,mixed_8_specs --no-capture-modes --prompts 288 --prompt-len 256 --tokens 128 --reps 2 \
#      --gpu-memory-utilization 0.3 --compiled-share 0.3" bash scripts/gpu-check.sh bench-8b &
#    OUT=$OUT/l1 CHATSPACE_TEST_GPU_INDEX=1 bash scripts/gpu-check.sh ingraph; wait)
#   (CHATSPACE_TEST_GPU_INDEX=0 JOB_SHAPE=qwen3-8b JOB_BENCH_ARGS="--personas 2 --questions 120 --tokens 128 \
#      --batch-sizes default --reps 1" bash scripts/gpu-check.sh job-throughput &
#    OUT=$OUT/l1 CHATSPACE_TEST_GPU_INDEX=1 JOB_SHAPE=qwen3-32b JOB_BENCH_ARGS="--personas 1 --questions 120 \
#      --tokens 128 --batch-sizes default --reps 1 --sequential --cold-samples 32" \
#      bash scripts/gpu-check.sh job-throughput; wait)
# Stop 24 (one H200; INGRAPH_TIMEOUT / BENCH_TIMEOUT keep two phases inside one 600 s call):
#   (INGRAPH_TIMEOUT=330 bash scripts/gpu-check.sh ingraph; BENCH_TIMEOUT=220 BENCH_ARGS="--paths \
#      ingraph_async --modes plain,capture_all_layers,steer_all_layers,mixed_8_specs --no-capture-modes \
#      --prompts 768 --prompt-len 256 --tokens 128 --reps 3" bash scripts/gpu-check.sh bench-0.6b)
#   BENCH_ARGS="--paths ingraph_async,ingraph_async_rpc --modes plain,capture_all_layers,steer_all_layers,\
#      mixed_8_specs --no-capture-modes --prompts 288 --prompt-len 256 --tokens 128 --reps 3 \
#      --gpu-memory-utilization 0.3 --compiled-share 0.3" bash scripts/gpu-check.sh bench-8b
#   Job throughput with personas spanning one run (8B, 3 personas, 479 s):
#   JOB_SHAPE=qwen3-8b JOB_BENCH_ARGS="--personas 3 --questions 120 --tokens 128 --batch-sizes default \
#      --reps 1" bash scripts/gpu-check.sh job-throughput
# Stop 25 (one H200, 1,698 s of device time of 1,800, 271 s of it two failed starts; each after the unpack):
#   BENCH_TIMEOUT=360 BENCH_ARGS="--paths ingraph_async --modes plain,capture_all_layers,steer_all_layers,\
#      mixed_8_specs --no-capture-modes --prompts 288 --prompt-len 256 --tokens 128 --reps 3 \
#      --gpu-memory-utilization 0.45 --compiled-share 0.45" bash scripts/gpu-check.sh bench-8b      (360 s)
#   JOB_SHAPE=qwen3-8b JOB_BENCH_ARGS="--personas 3 --questions 120 --tokens 128 --batch-sizes default \
#      --reps 1" bash scripts/gpu-check.sh job-throughput                                           (459 s)
#   INGRAPH_K=bfloat16 INGRAPH_TIMEOUT=400 bash scripts/gpu-check.sh ingraph                         (215 s)
#   the bench-8b above again with --modes plain,capture_all_layers,steer_all_layers --reps 4       (331 s)
# Stop 26 (one H200, 1,756 s of device time of 1,800; each after the unpack call):
#   KERNEL_TIMEOUT=150 bash scripts/gpu-check.sh kernel; BENCH_TIMEOUT=400 BENCH_ARGS="--paths \
#      ingraph_async --modes plain,steer_1_layer,steer_all_layers,steer_all_zero --no-capture-modes \
#      --prompts 288 --prompt-len 256 --tokens 128 --reps 3 --gpu-memory-utilization 0.45 \
#      --compiled-share 0.45" bash scripts/gpu-check.sh bench-8b                                  (344 s)
#   JOB_SHAPE=qwen3-8b JOB_BENCH_ARGS="--personas 2 --questions 120 --tokens 128 --batch-sizes default \
#      --reps 2" bash scripts/gpu-check.sh job-throughput                                         (487 s)
#   BENCH_TIMEOUT=210 ... bench-0.6b (the four gated modes, --reps 3: 1 rep in 210 s, partial);
#      BENCH_TIMEOUT=330 ... bench-8b (the four gated modes, --reps 3)                            (511 s)
#   BENCH_TIMEOUT=230 ... bench-0.6b --modes plain,steer_all_layers --reps 2: no rep in 230 s  (234 s)
#   The 0.6B phase needs ~300 s for 2 modes and 2 reps: give it a call of its own.
# Still to run (issues #14/#15, one H200, each after the unpack call), in this order:
#   1. the 8B job run above (--personas 2 --reps 2): 0 engine restarts expected with the steady-state
#      budget (0c02553); each job's memory_baseline / engine_restart events are in the JSON;
#   2. the 8B bench with the four gated modes, now without the detokenizer (the default since
#      7c3d27a) and with each mode's generated tokens recorded: BENCH_TIMEOUT=400 BENCH_ARGS="--paths \
#      ingraph_async --modes plain,capture_all_layers,steer_all_layers,mixed_8_specs,steer_all_zero \
#      --no-capture-modes --prompts 288 --prompt-len 256 --tokens 128 --reps 3 \
#      --gpu-memory-utilization 0.45 --compiled-share 0.45" bash scripts/gpu-check.sh bench-8b;
#   3. the 0.6B bench alone in a call: BENCH_TIMEOUT=540 BENCH_ARGS="--paths ingraph_async --modes \
#      plain,capture_all_layers,steer_all_layers,mixed_8_specs --no-capture-modes --prompts 768 \
#      --prompt-len 256 --tokens 128 --reps 2" bash scripts/gpu-check.sh bench-0.6b;
#   4. JOB_SHAPE=qwen3-32b with "--personas 2 --questions 120 --tokens 128 --batch-sizes default
#      --reps 1 --sequential --cold-samples 32".
#   When little device time is left, item 1 at the 0.6B shape checks the same budget rule in ~4 min:
#   JOB_TIMEOUT=300 JOB_SHAPE=qwen3-0.6b JOB_BENCH_ARGS="--personas 2 --questions 60 --tokens 128
#   --batch-sizes default --reps 2" (the worker's log comes back as job-throughput-*-worker.log).
#   Stop 27 ran none of these: 19 starts (nvidia-h200 and nvidia-h100-x1, 01:36-03:08Z) got no
#   machine, at 1,546 s of the session's 1,800 s of device time. Stop 28 began with 255 s left: no
#   call (a fresh start plus the unpack call leave no room for any run).
#   A job-throughput run cut short by JOB_TIMEOUT now stops its worker too (11f3a60: SIGTERM ->
#   SystemExit, 10 s grace, then SIGKILL to the worker's group), so the next call finds the GPU free.
#   On nvidia-h200-x2 when lent: multi (TP=2 against TP=1 on the eager hooks and in-graph).
# The unpack call carries .gpu-stage/a (64.0 MB) with the working tree: at 2.9 MB tracked the two are
# just past the 64 MiB a call may carry; docs/ui-job.png was moved aside for that call this stop.
# .gpu-stage/c holds this project's own Python deps as py3.12 wheels (scripts/gpu-stage-deps.sh).
# Logs, junit XML, gpu-figures.jsonl and the bench JSON go to $OUT (the device tool brings them
# back); the bench JSON belongs in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
. .gpu-stage/b/env.sh || exit 5
. .gpu-stage/c/env.sh || exit 5
# CHATSPACE_TEST_*: the test suite clears every other CHATSPACE_* variable (tests/conftest.py)
export VLLM_USE_V2_MODEL_RUNNER=0 CHATSPACE_TEST_GPU_OUT="$OUT" HF_HOME=/tmp/hf PYTHONUNBUFFERED=1
idx=${CHATSPACE_TEST_GPU_INDEX:-0}
models=/tmp/gpu-models-$idx   # one model folder per lane: two lanes never build the same files
card=$(nvidia-smi -i "$idx" --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
stamp=$(date -u +%Y%m%dT%H%MZ)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Enough tokens per run (~10-15 s) and repetitions that the spread is reported; the 8B shape
# gives both engines 45 % so plain compiled vLLM holds every request's KV cache too.
declare -A BENCH=([0.6b]="--prompts 768 --prompt-len 256 --tokens 128 --reps 3"
                  [8b]="--prompts 288 --prompt-len 256 --tokens 128 --reps 3 \
                        --gpu-memory-utilization 0.45 --compiled-share 0.45")

gpu_tests() {  # name, limit in seconds, pytest target
  local name=$1 limit=$2; shift 2
  echo "== $name on GPU ${CUDA_VISIBLE_DEVICES:-all} =="
  timeout -k 15 "$limit" python3 -m pytest -m gpu "$@" -v -p no:cacheprovider \
    -o faulthandler_timeout=$((limit - 30)) --junitxml="$OUT/$name.xml" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/$name.log" | tail -25
}

for phase in "$@"; do
  case "$phase" in
    diag)
      export CUDA_VISIBLE_DEVICES=$idx
      # DIAG_RUNS: "model f32-precision [attention backend];..." (default: the four below)
      IFS=';' read -ra runs <<< "${DIAG_RUNS:-tiny:qwen3 ieee;tiny:gemma ieee;tiny:llama ieee;tiny:qwen3 tf32}"
      for run in "${runs[@]}"; do
        read -r model f32 attn <<< "$run"; log="$OUT/diag-${model#tiny:}-$f32${attn:+-$attn}"
        timeout 150 python3 scripts/gpu_parity_report.py --model "$model" --dtype float32 ${DIAG_ARGS:-} \
          --env "TRITON_F32_DEFAULT=$f32" ${attn:+--attention $attn} --models-dir "$models" \
          --json "$log.json" > "$log.log" 2>&1
        echo "diag $model $f32 $attn rc=$?"; grep -A45 "^## " "$log.log"
      done ;;
    cleanup)
      export CUDA_VISIBLE_DEVICES=$idx CHATSPACE_TEST_GPU_MODELS=$models
      gpu_tests cleanup 240 tests/gpu/test_gpu_cleanup.py ;;  # own process: reads NVML
    ingraph)  # the in-graph op: kernel vs reference, engine vs eager hooks and transformers
      export CUDA_VISIBLE_DEVICES=$idx CHATSPACE_TEST_GPU_MODELS=$models
      gpu_tests ingraph "${INGRAPH_TIMEOUT:-480}" tests/gpu/test_gpu_ingraph.py ${INGRAPH_K:+-k "$INGRAPH_K"} ;;
    parity)
      export CUDA_VISIBLE_DEVICES=$idx CHATSPACE_TEST_GPU_MODELS=$models
      gpu_tests parity 420 tests/gpu/test_gpu_parity.py ${PARITY_K:+-k "$PARITY_K"} ;;
    multi)
      unset CUDA_VISIBLE_DEVICES; export CHATSPACE_TEST_GPU_MODELS=/tmp/gpu-models-multi
      gpu_tests multi 500 tests/gpu/test_gpu_multi.py ;;
    bench-0.6b|bench-8b)
      export CUDA_VISIBLE_DEVICES=$idx
      shape=${phase#bench-}
      timeout "${BENCH_TIMEOUT:-570}" python3 bench/engine_overhead.py --shape "qwen3-$shape" --dtype bfloat16 \
        --json "$OUT/bench-${card}-qwen3-${shape}-${stamp}.json" ${BENCH_ARGS:-${BENCH[$shape]}} \
        > "$OUT/bench-$shape.log" 2>&1
      echo "bench $shape rc=$?"; grep -A40 "^config" "$OUT/bench-$shape.log"; tail -3 "$OUT/bench-$shape.log" ;;
    kernel)  # the in-graph op alone, per mode, from CUDA graphs (bench/ingraph_kernel.py)
      export CUDA_VISIBLE_DEVICES=$idx
      timeout -k 15 "${KERNEL_TIMEOUT:-240}" python3 bench/ingraph_kernel.py \
        --json "$OUT/ingraph-kernel-${card}-${stamp}.json" ${KERNEL_ARGS:-} > "$OUT/kernel.log" 2>&1
      echo "kernel rc=$?"; tail -30 "$OUT/kernel.log" ;;
    job-throughput)  # 2 traits personas x 2,400 samples, 128 tokens: ~8 min on an H200 at 8B
      export CUDA_VISIBLE_DEVICES=$idx
      shape=${JOB_SHAPE:-qwen3-8b}
      timeout -k 15 "${JOB_TIMEOUT:-585}" python3 bench/job_throughput.py --shape "$shape" \
        --json "$OUT/job-throughput-${card}-${shape}-${stamp}.json" \
        ${JOB_BENCH_ARGS:---personas 2 --questions 240 --tokens 128 --batch-sizes default --reps 1} \
        > "$OUT/job-throughput-$shape.log" 2>&1
      echo "job-throughput $shape rc=$?"; grep -A8 "^# " "$OUT/job-throughput-$shape.log"
      # The worker's own log: its memory_baseline / engine restart lines, even from a run cut short
      wlog=$(sed -n 's/^worker log: //p' "$OUT/job-throughput-$shape.log" | head -1)
      if [ -n "$wlog" ] && [ -f "$wlog" ]; then
        cp "$wlog" "$OUT/job-throughput-$shape-worker.log"
        grep -E "baseline|restart" "$wlog" | tail -12
      fi ;;
    *) echo "unknown phase $phase (diag | cleanup | ingraph | parity | multi | bench-0.6b | bench-8b | kernel | job-throughput)" >&2; exit 2 ;;
  esac
done
