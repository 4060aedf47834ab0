"""Tensor parallel against one device, for the CPU engine test and the GPU test alike: the
same captures (all spans, all layers) and the same steered tokens with TP=1 and TP=2."""

from __future__ import annotations

import random
from pathlib import Path


def assert_tp2_matches_tp1(path: Path, *, tol: float = 1e-3, **engine_kw) -> float:
    """Run both engines one after the other; returns the worst capture difference."""
    import torch

    from workers.engine.engine import SteeringEngine
    from workers.engine.hf import rel_err
    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SteerOp

    rnd = random.Random(3)
    seqs = [[rnd.randrange(3, 500) for _ in range(rnd.randrange(20, 160))] for _ in range(6)]
    plens = [len(s) // 2 for s in seqs]
    g = torch.Generator().manual_seed(0)
    results = {}
    for tp in (1, 2):
        eng = SteeringEngine(str(path), dtype="float32", max_model_len=1024,
                             tensor_parallel_size=tp, **engine_kw)
        try:
            if tp == 1:
                vec = (torch.randn(eng.hidden_size, generator=g) * 2.0).tolist()
                unit = torch.randn(eng.hidden_size, generator=g).tolist()
                ops = [None, SteerOp("add", 1, vec, scale=1.5), SteerOp("cap", 2, unit, max=0.5),
                       SteerOp("ablate", 0, unit, scale=0.0), None, SteerOp("add", 3, vec)]
                specs = [RequestSpec(steer=(op,) if op else (), capture=CaptureSpec(),
                                     key=f"r{i}") for i, op in enumerate(ops)]
            caps = eng.capture(seqs, RequestSpec(capture=CaptureSpec()), prompt_lens=plens)
            gens = eng.generate(seqs, SamplingOptions(max_tokens=12), specs)
        finally:
            eng.shutdown()
        results[tp] = (caps, gens)
    (c1, g1), (c2, g2) = results[1], results[2]
    worst = max(rel_err(a.means[s], b.means[s]) for a, b in zip(c2, c1)
                for s in ("prompt", "response", "last_prompt"))
    assert worst < tol, f"TP=2 captures differ from TP=1 by {worst:.3g}"
    for i, (a, b) in enumerate(zip(g2, g1)):
        assert a.token_ids == b.token_ids, f"request {i}: TP=2 steered tokens differ from TP=1"
        assert rel_err(a.capture.means["prompt"], b.capture.means["prompt"]) < tol
    return worst
