"""What vLLM's incremental detokenizer costs per request, by which token a model repeats.

Why: the random-weight shapes in bench/engine_overhead.py emit one token over and over, and
steering changes which one. With the shapes' byte-level tokenizer a byte token that is not
valid UTF-8 on its own never completes a character, so every step re-decodes a growing tail;
a steered row could look slower than plain only because its token costs more to detokenize.
This times vLLM's own detokenizer (``IncrementalDetokenizer.from_new_request``, the
``FastIncrementalDetokenizer`` over tokenizers' ``DecodeStream``, primed with the prompt as
vLLM primes it) over ``--tokens`` steps of one repeated token, for every token id of the
tokenizer and one id past it, and prints the cost per request by class, against a plain
(printable) token. CPU only; results JSON under bench/results/.

    python bench/detokenize_cost.py --json bench/results/detokenize-cost-cpu-qwen3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def _cost_ms(tokenizer, prompt: list[int], token: int, steps: int) -> float:
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    req = SimpleNamespace(request_id="r", prompt_token_ids=prompt,
                          sampling_params=SamplingParams(max_tokens=steps, ignore_eos=True))
    det = IncrementalDetokenizer.from_new_request(tokenizer, req)
    t = time.perf_counter()
    for _ in range(steps):
        det.update([token], False)
    det.get_next_output_text(True, False)
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="qwen3", help="the tiny family whose tokenizer the "
                   "bench shapes use (workers/engine/tiny.py)")
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import numpy as np

    from workers.engine import tiny

    tok = tiny.build_tokenizer(args.family)
    n = len(tok)
    prompt = np.random.default_rng(0).integers(10, n - 1, args.prompt_len).tolist()
    per_id: dict[int, float] = {}
    for tid in [*range(n), n + 100]:  # every id, then one past the tokenizer (the model's
        per_id[tid] = statistics.median(  # vocabulary is wider than the tokenizer's)
            _cost_ms(tok, prompt, tid, args.tokens) for _ in range(args.reps))
    text = {tid: tok.decode([tid]) if tid < n else None for tid in per_id}
    classes = {  # printable alone / a lone byte that is not a whole character / past the end
        "printable": [t for t in per_id if text[t] and "\ufffd" not in text[t]],
        "partial_utf8": [t for t in per_id if text[t] and "\ufffd" in text[t]],
        "past_tokenizer": [t for t in per_id if t >= n],
    }
    base = statistics.median(per_id[t] for t in classes["printable"])
    rows = [{"class": c, "ids": len(ids),
             "median_ms_per_request": statistics.median(per_id[t] for t in ids),
             "max_ms_per_request": max(per_id[t] for t in ids),
             "ratio_to_printable": statistics.median(per_id[t] for t in ids) / base}
            for c, ids in classes.items() if ids]
    info = {"family": args.family, "tokenizer_size": n, "tokens": args.tokens,
            "prompt_len": args.prompt_len, "reps": args.reps,
            "vllm": __import__("vllm").__version__}
    print(f"# {info}")
    print(f"{'class':<16}{'ids':>6}{'ms/request':>12}{'max':>9}{'x printable':>13}")
    for r in rows:
        print(f"{r['class']:<16}{r['ids']:>6}{r['median_ms_per_request']:>12.2f}"
              f"{r['max_ms_per_request']:>9.2f}{r['ratio_to_printable']:>12.1f}x")
    result = {"info": info, "rows": rows, "per_id_ms": per_id}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
