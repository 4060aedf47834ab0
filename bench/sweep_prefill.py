"""Prompt tokens vLLM prefilled for one steering sweep job versus the same grid as separate
jobs, read from vLLM's own counters (``LLM.get_metrics()``: ``vllm:prompt_tokens``,
``vllm:prompt_tokens_cached``, ``vllm:prefix_cache_queries`` / ``_hits``).

Not a test. One warm steering engine (as a worker holds it) runs, interleaved and repeated:

- ``sweep``: one job, :func:`workers.pipeline.run_item` per persona over every grid point;
- ``separate_warm``: one job per grid point (the same code with a one-point grid, which sends
  exactly what a steered rollout job sends), one after another on the same engine, its
  prefix cache kept between jobs;
- ``separate_cold``: the same with the prefix cache emptied before each job: the jobs landed
  on different workers, or the worker reloaded its engine after a job (measured on an H200:
  it found memory above baseline after every job and reloaded);
- ``unsalted_reference``: the same prompts and batches as ``sweep``, with every point at
  scale 0 (sent unsteered, so no cache salt). Not a
  valid sweep: it shows what the prefix cache could share if steered requests were allowed
  to read each other's KV, which the cache-salt rule forbids (a steered prompt's KV differs
  from layer L+1 up).

The prefix cache is emptied before every scenario, so each starts cold. Prefilled = prompt
tokens - cached prompt tokens. The vector is a fixed random unit vector per (persona,
layer): token counts do not depend on it.

    python bench/sweep_prefill.py --model tiny:qwen3 --dtype float32 --json bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

COUNTERS = ("vllm:prompt_tokens", "vllm:prompt_tokens_cached", "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits", "vllm:generation_tokens")


def counters(llm) -> dict[str, float]:
    out = dict.fromkeys(COUNTERS, 0.0)
    for m in llm.get_metrics():
        if m.name in out and hasattr(m, "value"):
            out[m.name] += float(m.value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:qwen3")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dataset", default="traits_sample")
    ap.add_argument("--personas", default="curious,optimistic")
    ap.add_argument("--scales", default="-8,-4,0,4,8")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--max-samples", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32,
                    help="KV block size: the cache shares whole blocks only. vLLM's CPU default "
                         "is 128 (more than these ~90-token prompts); 32 is the CPU minimum, "
                         "CUDA's default is 16")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="sweep-bench-")
    os.environ.setdefault("CHATSPACE_DATA_DIR", data)
    import numpy as np

    from app.datasets import load_dataset
    from app.settings import get_settings
    from app.storage import get_store
    from workers.engine.engine import SteeringEngine
    from workers.params import JobParams
    from workers.pipeline import ItemContext, run_item
    from workers.runtime import memory_fraction, resolve_model

    settings = get_settings()
    store = get_store(settings)
    personas = args.personas.split(",")
    scales = [float(x) for x in args.scales.split(",")]
    t0 = time.monotonic()
    engine = SteeringEngine(resolve_model(args.model, settings), dtype=args.dtype,
                            max_model_len=1024, disable_log_stats=False,
                            gpu_memory_utilization=memory_fraction(settings),
                            block_size=args.block_size,
                            enable_prefix_caching=True)
    start_s = time.monotonic() - t0
    hidden = int(engine.hidden_size)
    ds = load_dataset(args.dataset, settings=settings)
    rng = np.random.default_rng(0)
    raw = {(p, args.layer): rng.normal(size=hidden) for p in personas}
    vectors = {key: (v / np.linalg.norm(v)).tolist() for key, v in raw.items()}

    def job(scale_list: list[float], job_id: str) -> None:
        spec = {"form": "add", "layers": [args.layer], "scales": scale_list,
                "normalize": False, "source": "bench", "vector": "v", "persona": None}
        params = JobParams.from_dict({"max_samples": args.max_samples,
                                      "max_tokens": args.max_tokens, "seed": 0,
                                      "batch_size": args.batch_size, "sweep": spec})
        for persona in personas:
            ctx = ItemContext(
                job_id=job_id, kind="rollout", dataset=args.dataset, persona=persona,
                model=args.model, dtype=args.dtype, params=params, engine=engine, store=store,
                settings=settings,
                load_vector=lambda _j, p, _k, layer: vectors[(p, layer)])
            run_item(ctx)  # the worker's path: the rollout hands the sweep to workers/sweep.py

    def reset() -> None:
        if not engine.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    scenarios = {
        "sweep": lambda r: job(scales, f"sweep-{r}"),
        "separate_warm": lambda r: [job([s], f"sep-{r}-{i}") for i, s in enumerate(scales)],
        "separate_cold": lambda r: [(reset(), job([s], f"cold-{r}-{i}"))
                                    for i, s in enumerate(scales)],
        # every point at scale 0 (sent unsteered): the same batches, no salt
        "unsalted_reference": lambda r: job([0.0] * len(scales), f"ref-{r}"),
    }
    runs: dict[str, list[dict]] = {name: [] for name in scenarios}
    for r in range(args.repeats):
        for name, fn in scenarios.items():
            reset()
            before = counters(engine.llm)
            t = time.monotonic()
            fn(r)
            wall = time.monotonic() - t
            after = counters(engine.llm)
            delta = {k: after[k] - before[k] for k in COUNTERS}
            delta["prefilled"] = delta["vllm:prompt_tokens"] - delta["vllm:prompt_tokens_cached"]
            delta["wall_s"] = round(wall, 2)
            runs[name].append(delta)
            print(f"rep {r} {name:19s} prompt={delta['vllm:prompt_tokens']:.0f} "
                  f"cached={delta['vllm:prompt_tokens_cached']:.0f} "
                  f"prefilled={delta['prefilled']:.0f} wall={wall:.1f}s", flush=True)
    engine.shutdown()

    base = runs["sweep"]
    n_samples = sum(len(ds.samples(p, max_samples=args.max_samples)) for p in personas)
    print(f"\n{len(scales)} scales x {len(personas)} personas x {n_samples // len(personas)} "
          f"samples = {len(scales) * n_samples} requests; model {args.model} {args.dtype}; "
          f"block size {args.block_size}; engine start {start_s:.0f}s")
    print(f"{'scenario':19s} {'prompt tok':>10s} {'cached':>8s} {'prefilled':>9s} "
          f"{'prefilled / sweep':>17s}  (per repetition)")
    for name, reps in runs.items():
        ratios = [x["prefilled"] / b["prefilled"] for x, b in zip(reps, base)]
        print(f"{name:19s} {reps[0]['vllm:prompt_tokens']:10.0f} "
              f"{reps[0]['vllm:prompt_tokens_cached']:8.0f} {reps[0]['prefilled']:9.0f} "
              f"{' '.join(f'{x:.3f}' for x in ratios):>17s}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "engine_start_s": start_s, "requests": len(scales) * n_samples,
            "runs": runs}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
