"""The capture and rollout pipeline over real prompts, datasets, vectors, artifacts and the
local store, with a deterministic fake engine (the real engines are tested in tests/engine
and in the end-to-end worker tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.artifacts import read_persona_artifact
from app.datasets import load_dataset
from app.errors import EngineOOM
from app.prompts import build_prompt
from app.settings import get_settings
from app.storage import get_store
from app.vectors import derive_vectors
from tests.unit.test_prompts import QWEN3, make_tokenizer
from workers import batching, pipeline
from workers.engine.spec import Capture, GenResult
from workers.params import JobParams

N_LAYERS, HIDDEN = 3, 8


def embed(token_id: int) -> torch.Tensor:
    """Per-layer hidden state of a token: deterministic, different per token and layer."""
    g = torch.Generator().manual_seed(int(token_id))
    base = torch.randn(HIDDEN, generator=g)
    return torch.stack([base * (layer + 1) + layer for layer in range(N_LAYERS)])


class FakeEngine:
    num_layers, hidden_size = N_LAYERS, HIDDEN

    def __init__(self):
        self.tokenizer = make_tokenizer(QWEN3, ["<|im_start|>", "<|im_end|>", "<think>",
                                                "</think>"])
        self.batches: list[int] = []

    def generate(self, prompts, options, specs):
        self.batches.append(len(prompts))
        out = []
        for ids in prompts:
            text = f"answer the {len(ids)} things"[: 6 + options.max_tokens]
            toks = self.tokenizer.encode(text, add_special_tokens=False)
            out.append(GenResult(key=None, prompt_token_ids=list(ids), token_ids=toks, text=text,
                                 finish_reason="length"))
        return out

    def capture(self, sequences, specs):
        caps = []
        for ids, spec in zip(sequences, specs):
            rows = torch.stack([embed(t) for t in ids])  # (T, L, H)
            means, counts, pos = {}, {}, {}
            for span in spec.capture.spans:
                end = span.end if span.end is not None else len(ids)
                means[span.name] = rows[span.start:end].mean(0)[list(spec.capture.layers)]
                counts[span.name] = end - span.start
                pos[span.name] = (span.start, end)
            caps.append(Capture(layers=list(spec.capture.layers), means=means, counts=counts,
                                positions=pos))
        return caps


def make_ctx(kind="capture", persona=None, **params):
    settings = get_settings()
    ds = load_dataset("traits_sample", settings=settings)
    persona = persona or next(p for p in ds.personas if p != "default")
    engine = FakeEngine()
    progress = []
    events = []
    ctx = pipeline.ItemContext(
        job_id="job-1", kind=kind, dataset="traits_sample", persona=persona, model="tiny:qwen3",
        dtype="float32", params=JobParams.from_dict({"max_samples": 6, "batch_size": 4,
                                                     "max_tokens": 8, **params}),
        engine=engine, store=get_store(settings), settings=settings,
        on_progress=lambda d, t: progress.append((d, t)),
        on_event=lambda k, d: events.append((k, d)), free_memory=lambda: None)
    return ctx, engine, progress, events, ds


@pytest.fixture(autouse=True)
def _faults():
    batching._fault_counts.clear()
    yield
    batching._fault_counts.clear()


def test_capture_stores_exact_response_means_and_vectors():
    ctx, engine, progress, _, ds = make_ctx(layers=[0, 2])
    result = pipeline.run_item(ctx)
    assert result.artifact_key == ("chatspace/tiny_qwen3/traits_sample/float32/job-1/"
                                   f"{ctx.persona}.safetensors")
    data = ctx.store.get_bytes(result.artifact_key, expect_sha256=result.sha256)
    art = read_persona_artifact(data)
    samples = ds.samples(ctx.persona, max_samples=6)
    assert art.keys == [s.key for s in samples]
    assert art.activations.shape == (len(samples), 2, HIDDEN)
    # Expected: mean over exactly the response span of the full conversation.
    responses = art.metadata["responses"]
    for i, s in enumerate(samples):
        full = build_prompt(engine.tokenizer, system=s.system_prompt or None,
                            question=s.question, response=responses[i])
        a, b = full.response_span
        rows = torch.stack([embed(t) for t in full.input_ids[a:b]]).mean(0)[[0, 2]]
        np.testing.assert_allclose(art.activations[i], rows.numpy(), rtol=1e-6, atol=1e-6)
    # Response means only by default: the other spans are opt-in (params.spans), float32.
    assert art.spans == {} and art.metadata["spans"] == []
    assert art.metadata["storage_dtype"] == "float32" and art.activations.dtype == np.float32
    expected = derive_vectors(art.activations, art.keys, kind=ds.kind)
    assert set(art.vectors) == set(expected.vectors)
    for name, vec in expected.vectors.items():
        np.testing.assert_allclose(art.vectors[name], vec, atol=1e-6)
    # Batches of 4 over 6 samples, progress after each, .json and the vectors file next to
    # it; no .pt copy unless CHATSPACE_WRITE_PT asks for one (export writes it on demand).
    assert engine.batches == [4, 2]
    assert progress == [(0, 6), (4, 6), (6, 6)]
    assert sorted(e["key"].split(".", 1)[1] for e in result.extra) == [
        "json", "vectors.safetensors"]
    for e in result.extra:
        assert ctx.store.verify(e["key"], e["sha256"])


def test_capture_stores_prompt_spans_when_asked():
    ctx, engine, _, _, ds = make_ctx(layers=[0, 2], spans=["last_prompt", "prompt"])
    result = pipeline.run_item(ctx)
    art = read_persona_artifact(ctx.store.get_bytes(result.artifact_key))
    assert sorted(art.spans) == ["last_prompt", "prompt"]
    for i, s in enumerate(ds.samples(ctx.persona, max_samples=6)):
        full = build_prompt(engine.tokenizer, system=s.system_prompt or None,
                            question=s.question, response=art.metadata["responses"][i])
        P = full.prompt_len
        last = embed(full.input_ids[P - 1])[[0, 2]]
        prompt = torch.stack([embed(t) for t in full.input_ids[:P]]).mean(0)[[0, 2]]
        np.testing.assert_allclose(art.spans["last_prompt"][i], last.numpy(), atol=1e-6)
        np.testing.assert_allclose(art.spans["prompt"][i], prompt.numpy(), atol=1e-6)


def test_spans_param_refuses_unknown_span():
    from app.errors import SpecInvalid

    with pytest.raises(SpecInvalid) as exc:
        JobParams.from_dict({"spans": ["response_tokens"]})
    assert exc.value.field == "params.spans[0]"


def test_rerun_overwrites_same_key():
    ctx, *_ = make_ctx()
    first = pipeline.run_item(ctx)
    second = pipeline.run_item(ctx)
    assert first.artifact_key == second.artifact_key
    assert first.sha256 == second.sha256
    prefix = first.artifact_key.rsplit("/", 1)[0] + "/"
    assert len([o for o in ctx.store.list(prefix) if o.key.endswith(".safetensors")
                and not o.key.endswith(".vectors.safetensors")]) == 1


def test_injected_oom_halves_then_fails(monkeypatch):
    ctx, engine, _, events, _ = make_ctx()
    monkeypatch.setenv(batching.FAULT_OOM_ENV, f"{ctx.persona}:1")
    pipeline.run_item(ctx)
    assert engine.batches == [2, 2, 2]  # batch 4 failed once, then halves
    assert [k for k, _ in events] == ["oom_retry"]
    batching._fault_counts.clear()
    ctx, engine, _, events, _ = make_ctx()
    monkeypatch.setenv(batching.FAULT_OOM_ENV, f"{ctx.persona}:99")
    with pytest.raises(EngineOOM) as err:
        pipeline.run_item(ctx)
    assert err.value.memory["failed_sizes"] == [4, 2, 1]
    assert engine.batches == []


def test_rollout_writes_jsonl_with_steering_spec():
    vec = [0.5] * HIDDEN
    ctx, _, _, _, ds = make_ctx(kind="rollout", steer=[
        {"op": "add", "layer": 1, "vector": vec, "scale": 2.0}])
    result = pipeline.run_item(ctx)
    assert result.artifact_key.endswith(f"/{ctx.persona}.jsonl")
    lines = [json.loads(x) for x in ctx.store.get_bytes(result.artifact_key).decode().splitlines()]
    samples = ds.samples(ctx.persona, max_samples=6)
    assert [x["key"] for x in lines] == [s.key for s in samples]
    assert lines[0]["steer"] == [{"op": "add", "layer": 1, "scale": 2.0,
                                  "vector_norm": pytest.approx(0.5 * HIDDEN ** 0.5)}]
    assert all(x["response"] and x["response_tokens"] > 0 for x in lines)


def test_rollout_rejects_bad_layer_naming_the_field():
    from app.errors import SpecInvalid

    ctx, *_ = make_ctx(kind="rollout", steer=[{"op": "add", "layer": 7, "vector": [1.0] * HIDDEN}])
    with pytest.raises(SpecInvalid) as err:
        pipeline.run_item(ctx)
    assert err.value.field == "params.steer[0].layer"


def test_cancel_after_generate_skips_the_capture_pass():
    from workers.batching import JobCancelled

    ctx, engine, _, _, _ = make_ctx(batch_size=2)
    checks = []
    ctx.should_cancel = lambda: checks.append(1) or len(checks) >= 2  # 2nd check: after generate
    captured = []
    engine.capture = lambda seqs, specs: captured.append(len(seqs))
    with pytest.raises(JobCancelled):
        pipeline.run_item(ctx)
    assert engine.batches == [2] and captured == []


def test_unverified_family_recorded_in_every_artifact(tmp_path):
    """An engine serving an unverified decoder-layer class (engine.allow_unverified_family)
    says so in every file it produces; a verified one adds nothing."""
    import io

    from safetensors import safe_open

    ctx, engine, *_ = make_ctx()
    assert "unverified_family" not in read_persona_artifact(
        ctx.store.get_bytes(pipeline.run_item(ctx).artifact_key)).metadata
    engine.unverified_family = "Glm4DecoderLayer"
    ctx.settings = ctx.settings.model_copy(update={"write_pt": True})  # the .pt on request
    result = pipeline.run_item(ctx)
    assert read_persona_artifact(ctx.store.get_bytes(result.artifact_key)).metadata[
        "unverified_family"] == "Glm4DecoderLayer"
    extra = {e["key"].split(".", 1)[1]: e["key"] for e in result.extra}
    assert json.loads(ctx.store.get_bytes(extra["json"]))["unverified_family"] == \
        "Glm4DecoderLayer"
    from app.artifacts import read_vector_sidecar

    assert read_vector_sidecar(ctx.store.get_bytes(extra["vectors.safetensors"]))[1][
        "unverified_family"] == "Glm4DecoderLayer"
    pt = torch.load(io.BytesIO(ctx.store.get_bytes(extra["pt"])), weights_only=True)
    assert pt["metadata"]["unverified_family"] == "Glm4DecoderLayer"
    assert result.info["unverified_family"] == "Glm4DecoderLayer"

    ctx, engine, *_ = make_ctx(kind="rollout", capture=True)
    engine.unverified_family = "Glm4DecoderLayer"
    result = pipeline.run_item(ctx)
    lines = [json.loads(x) for x in ctx.store.get_bytes(result.artifact_key).decode().splitlines()]
    assert lines and all(x["unverified_family"] == "Glm4DecoderLayer" for x in lines)
    path = tmp_path / "act.safetensors"
    path.write_bytes(ctx.store.get_bytes(result.extra[0]["key"]))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["unverified_family"] == "Glm4DecoderLayer"
    assert result.info["unverified_family"] == "Glm4DecoderLayer"
