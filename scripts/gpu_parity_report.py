"""Per-layer capture error of the vLLM engine against transformers, for one model and dtype.

Where a parity test fails, this says where the error starts and how it grows: a wrong row or a
missing token shows up as a jump at one layer; kernel precision (TF32 attention, a different
reduction order) as a small error at layer 0 that the random-weight model amplifies layer by
layer. ``--env NAME=VALUE`` sets a variable before vLLM starts (e.g. ``TRITON_F32_DEFAULT=tf32``
to see what TF32 attention costs in fp32).

    python scripts/gpu_parity_report.py --model tiny:gemma --dtype float32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:qwen3")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--attention", help="vLLM attention backend (e.g. FLEX_ATTENTION); default: "
                   "vLLM's choice")
    p.add_argument("--hf-attn", nargs="+", default=["eager"],
                   help="transformers attention implementations to compare against (the last "
                   "one is the table's reference)")
    p.add_argument("--models-dir", default=os.environ.get("CHATSPACE_TEST_GPU_MODELS")
                   or tempfile.gettempdir())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    for kv in args.env:
        name, _, value = kv.partition("=")
        os.environ[name] = value

    import torch

    from workers.engine.engine import SteeringEngine
    from workers.engine.hf import HFBackend, rel_err
    from workers.engine.spec import CaptureSpec, RequestSpec
    from workers.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model(args.model, Path(args.models_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rnd = random.Random(0)
    seqs = [[rnd.randrange(3, 500) for _ in range(rnd.randrange(20, 200))] for _ in range(8)]
    plens = [max(1, len(s) // 2) for s in seqs]
    spec = RequestSpec(capture=CaptureSpec())
    extra = {"attention_config": {"backend": args.attention}} if args.attention else {}
    raw = RequestSpec(capture=CaptureSpec(raw=True))
    eng = SteeringEngine(str(path), dtype=args.dtype, max_model_len=1024,
                         gpu_memory_utilization=0.3, enforce_eager=True, **extra)
    try:
        got = eng.capture(seqs, spec, prompt_lens=plens)
        got_raw = eng.capture(seqs, raw, prompt_lens=plens)
    finally:
        eng.shutdown()
    for impl in args.hf_attn:
        hf = HFBackend(path, dtype=args.dtype, device=device, attn_implementation=impl)
        try:
            ref = hf.capture(seqs, spec, prompt_lens=plens)
            ref_raw = hf.capture(seqs, raw, prompt_lens=plens)
        finally:
            hf.close()
            del hf
        print(f"## transformers attention: {impl}")
        _rows_report(seqs, plens, got, ref, got_raw, ref_raw)
    rows = []
    for layer in range(len(got[0].layers)):
        row = {"layer": layer}
        for span in ("prompt", "response", "last_prompt"):
            row[span] = max(rel_err(g.means[span][layer], r.means[span][layer])
                            for g, r in zip(got, ref))
        rows.append(row)
    env = {k: os.environ.get(k) for k in ("TRITON_F32_DEFAULT", "VLLM_ATTENTION_BACKEND",
                                          "VLLM_FLOAT32_MATMUL_PRECISION")}
    # vLLM logs the attention backend it picked ("Using TRITON_ATTN attention backend").
    print(f"# {args.model} {args.dtype} on {device}; env: {env}")
    print(f"{'layer':>5}{'prompt':>12}{'response':>12}{'last_prompt':>13}")
    for r in rows:
        print(f"{r['layer']:>5}{r['prompt']:>12.2e}{r['response']:>12.2e}{r['last_prompt']:>13.2e}")
    result = {"model": args.model, "dtype": args.dtype, "device": device, "env": env,
              "attention": args.attention, "layers": rows,
              "worst": max(max(r["prompt"], r["response"], r["last_prompt"]) for r in rows)}
    print(f"worst relative error: {result['worst']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _rows_report(seqs, plens, got, ref, got_raw, ref_raw) -> None:
    """Per sequence: span counts on both sides, the positions whose layer-0 state differs, and
    the response mean rebuilt from vLLM's own raw rows (tells a wrong row from a wrong sum)."""
    from workers.engine.hf import rel_err

    for i, (s, p) in enumerate(zip(seqs, plens)):
        g, r, gr, rr = got[i], ref[i], got_raw[i], ref_raw[i]
        print(f"seq {i}: len {len(s)} P {p} counts vllm {g.counts} hf {r.counts} "
              f"raw positions vllm {len(gr.raw_positions or [])} hf {len(rr.raw_positions or [])}")
        if gr.raw is None or rr.raw is None:
            continue
        gpos = {q: k for k, q in enumerate(gr.raw_positions)}
        bad = []
        for k, q in enumerate(rr.raw_positions):
            if q not in gpos:
                bad.append((q, "missing"))
                continue
            e = rel_err(gr.raw[gpos[q], 0], rr.raw[k, 0])
            if e > 1e-3:
                bad.append((q, f"{e:.2e}"))
        extra = sorted(set(gr.raw_positions) - set(rr.raw_positions))
        print(f"   differing positions (layer 0): {bad[:12]}{' ...' if len(bad) > 12 else ''}"
              f"; only in vLLM: {extra[:12]}")
        rows = [gpos[q] for q in range(p, len(s)) if q in gpos]
        if rows:
            e = rel_err(gr.raw[rows].mean(0), g.means["response"])
            print(f"   vLLM response mean vs its own raw rows [P, len): {e:.2e}")


if __name__ == "__main__":
    main()
