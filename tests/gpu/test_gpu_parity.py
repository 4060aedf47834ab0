"""On CUDA: the vLLM engine's captures equal transformers', steering per request in a mixed
batch, the compiled-mode refusal, and a real CUDA OOM through the retry-smaller-batch path.

Tolerances: parity is measured as max|vLLM − HF| / max|HF| over a layer's means. fp32: the
engine turns off TF32 in vLLM's Triton attention (``TRITON_F32_DEFAULT=ieee``), so only the
order of reductions differs: 2e-3 (a wrong row or a missing token moves a mean by far more,
checked by the control below; measured on an H200: 1e-6, and 1e-3 with TF32 left on). The
reference runs transformers' eager attention: its SDPA kernels on CUDA with a left-padding mask
put the last token of every sequence ~100 % off at layer 0 (response means 5e-2 off).
bf16 keeps 8 mantissa bits and 28 layers compound it, so 4e-2 (measured on an H200 against
the eager reference: 1.6e-2 for tiny Qwen3, 2.5e-2 for the Qwen3-0.6B shape).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.gpu.figures import record
from workers.engine.hf import rel_err

pytestmark = pytest.mark.gpu

CASES = [("qwen3", "float32"), ("qwen3", "bfloat16"), ("llama", "float32"),
         ("gemma", "float32"), ("qwen3-0.6b", "bfloat16")]
TOL = {"float32": 2e-3, "bfloat16": 4e-2}


def _model(name: str, dtype: str, root: str) -> Path:
    if name == "qwen3-0.6b":
        from bench.shapes import write_shape

        return write_shape(name, Path(root) / f"shape-{name}-{dtype}", weights=True, dtype=dtype,
                           device="cuda")
    from workers.engine.tiny import ensure_tiny_model

    return ensure_tiny_model(f"tiny:{name}", Path(root))


def _sequences(n=8, vocab=500, seed=0):
    rnd = random.Random(seed)
    return [[rnd.randrange(3, vocab) for _ in range(rnd.randrange(20, 200))] for _ in range(n)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{d}" for m, d in CASES])
def pair(request, gpu_models_dir):
    from workers.engine.engine import SteeringEngine
    from workers.engine.hf import HFBackend

    name, dtype = request.param
    path = _model(name, dtype, gpu_models_dir)
    eng = SteeringEngine(str(path), dtype=dtype, max_model_len=1024,
                         gpu_memory_utilization=0.35, enforce_eager=True)
    hf = HFBackend(path, dtype=dtype, device="cuda")
    yield name, dtype, eng, hf
    hf.close()
    eng.shutdown()


def test_capture_parity(pair):
    from workers.engine.spec import CaptureSpec, RequestSpec

    name, dtype, eng, hf = pair
    seqs = _sequences()
    plens = [max(1, len(s) // 2) for s in seqs]
    spec = RequestSpec(capture=CaptureSpec())
    got = eng.capture(seqs, spec, prompt_lens=plens)
    ref = hf.capture(seqs, spec, prompt_lens=plens)
    worst = 0.0
    for g, r in zip(got, ref):
        for span in ("prompt", "response", "last_prompt"):
            worst = max(worst, rel_err(g.means[span], r.means[span]))
    record("capture_parity", model=name, dtype=dtype, worst=worst, tol=TOL[dtype])
    assert worst < TOL[dtype], f"{name} {dtype}: worst relative error {worst:.3g}"
    # Control: another request's mean must be far outside the tolerance, so the metric can
    # tell wrong rows from kernel noise.
    assert rel_err(got[1].means["prompt"], ref[0].means["prompt"]) > TOL[dtype]


def test_mixed_batch_steering(pair):
    import torch

    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SteerOp

    name, dtype, eng, hf = pair
    if name != "qwen3" or dtype != "float32":
        pytest.skip("steering parity on one model/dtype is enough for the GPU check")
    seqs = _sequences(6, seed=1)
    g = torch.Generator().manual_seed(0)
    vec = (torch.randn(eng.hidden_size, generator=g) * 2.0).tolist()
    unit = torch.randn(eng.hidden_size, generator=g).tolist()
    ops = [None, SteerOp("add", 1, vec, scale=1.5), None,
           SteerOp("cap", 2, unit, min=-0.5, max=0.5), SteerOp("ablate", 1, unit, scale=0.0), None]
    specs = [RequestSpec(steer=(op,) if op else (), capture=CaptureSpec(), key=f"r{i}")
             for i, op in enumerate(ops)]
    opts = SamplingOptions(max_tokens=8)
    got = eng.generate(seqs, opts, specs)
    ref = hf.generate(seqs, opts, specs)
    plain = eng.generate(seqs, opts, [RequestSpec(capture=CaptureSpec(), key=f"p{i}")
                                      for i in range(len(seqs))])
    record("mixed_batch_steering", model=name, dtype=dtype, requests=[
        {"op": ops[i].op if ops[i] else None, "tokens_match_hf": a.token_ids == b.token_ids,
         "prompt_rel_err": rel_err(a.capture.means["prompt"], b.capture.means["prompt"])}
        for i, (a, b) in enumerate(zip(got, ref))])
    for i, (a, b, p) in enumerate(zip(got, ref, plain)):
        assert a.token_ids == b.token_ids, f"request {i}: steered tokens differ from HF"
        assert rel_err(a.capture.means["prompt"], b.capture.means["prompt"]) < TOL[dtype]
        if ops[i] is None:
            assert a.token_ids == p.token_ids
            assert rel_err(a.capture.means["prompt"], p.capture.means["prompt"]) < 1e-4
        else:
            assert rel_err(a.capture.means["prompt"], p.capture.means["prompt"]) > 1e-3


def test_real_cuda_oom_halves_then_fails(gpu_models_dir):
    """A real torch.OutOfMemoryError on CUDA (per-process memory capped) goes through the
    pipeline's batch policy: halved until the batch fits; with a cap nothing fits under, it
    ends as EngineOOM carrying the sizes tried and memory figures."""
    import torch

    from app.errors import EngineOOM
    from workers.batching import BatchPolicy
    from workers.engine.hf import HFBackend
    from workers.engine.spec import CaptureSpec, RequestSpec

    path = _model("qwen3-0.6b", "bfloat16", gpu_models_dir)
    hf = HFBackend(path, dtype="bfloat16", device="cuda")
    seqs = [[5 + (i % 400) for i in range(1024)] for _ in range(64)]
    spec = RequestSpec(capture=CaptureSpec())
    events = []
    free, total = torch.cuda.mem_get_info()
    used = total - free
    try:
        # Leave ~3 GiB above what the weights use: 64×1024 tokens of logits (20 GiB) cannot fit,
        # 4×1024 can.
        torch.cuda.empty_cache()  # the cap applies to new allocations, not cached blocks
        torch.cuda.set_per_process_memory_fraction(min(0.95, (torch.cuda.memory_allocated()
                                                              + 3 * 2**30) / total))
        policy = BatchPolicy(persona="p", batch_size=64, min_batch=1, gpu_index="0",
                             on_event=lambda k, d: events.append((k, d)))
        out = policy.run(seqs, lambda b: hf.capture(list(b), spec, batch_size=len(b)))
        assert len(out) == 64
        assert policy.failed_sizes and policy.failed_sizes[0] == 64
        assert policy.batch_size < 64
        assert any(k == "oom_retry" for k, _ in events)

        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(0.95, (torch.cuda.memory_allocated()
                                                              + 2**26) / total))
        events.clear()
        policy = BatchPolicy(persona="q", batch_size=8, min_batch=2, gpu_index="0",
                             on_event=lambda k, d: events.append((k, d)))
        with pytest.raises(EngineOOM) as err:
            policy.run(seqs[:8], lambda b: hf.capture(list(b), spec, batch_size=len(b)))
        assert err.value.batch_size == 2
        assert err.value.memory["failed_sizes"] == [8, 4, 2]
        assert err.value.memory["memory"] is not None
        assert events[-1][0] == "oom_failed"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        hf.close()
        torch.cuda.empty_cache()
    assert used >= 0


def test_compiled_mode_refused(gpu_models_dir):
    """Under vLLM's compiled default the hooks never fire: the engine must refuse to start."""
    from workers.engine.engine import HooksNotFiredError, SteeringEngine

    path = _model("qwen3", "float32", gpu_models_dir)
    with pytest.raises(HooksNotFiredError):
        SteeringEngine(str(path), dtype="float32", max_model_len=512,
                       gpu_memory_utilization=0.2, enforce_eager=False)
