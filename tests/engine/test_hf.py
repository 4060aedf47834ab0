"""The HF reference backend against transformers itself, for every tiny family.

Tolerances (fp32): the same computation in another batch shape only changes GEMM blocking and
reduction order, ~1e-7 relative per op over a few hundred-term sums and 4 layers → well under
1e-5 relative; hidden states here reach |h| ≈ 10–40 (Gemma scales embeddings by √hidden), so
``atol = 1e-4 · max|h|`` leaves a wide margin while any real mistake (a wrong position, a
missing pad mask, a row steered twice) moves values by O(1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.engine.hf import HFBackend
from workers.engine.ops import apply_ops
from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, Span, SpecError, SteerOp

PROMPTS = ["Hello there, what is the capital of France?", "Why?",
           "Describe your favourite book and tell me what you learned from it."]
OPTS = SamplingOptions(max_tokens=6, ignore_eos=True)
ALL = RequestSpec(capture=CaptureSpec(raw=True))


@pytest.fixture(scope="module")
def backend(family, tiny_model):
    be = HFBackend(tiny_model(family))
    yield be
    be.close()


def close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    scale = (b if scale is None else scale).abs().max().clamp(min=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(scale))


def reference_states(be: HFBackend, seq: list[int]) -> list[torch.Tensor]:
    """Every decoder layer's output for ``seq`` straight from transformers: hidden_states[i+1]
    for i < L−1; for the last layer the final norm is swapped out, since HF applies it to the
    last entry of hidden_states."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        hs = be.model(ids, output_hidden_states=True).hidden_states
        norm = be.model.model.norm
        be.model.model.norm = torch.nn.Identity()
        try:
            last = be.model(ids, output_hidden_states=True).hidden_states[-1]
        finally:
            be.model.model.norm = norm
    assert len(hs) == be.num_layers + 1
    assert not torch.allclose(hs[-1], last)  # the final norm really is in HF's last entry
    return [hs[i + 1][0] for i in range(be.num_layers - 1)] + [last[0]]


def test_capture_matches_transformers(backend):
    res = backend.generate(PROMPTS[:1], OPTS, ALL)[0]
    cap = res.capture
    P, n = len(res.prompt_token_ids), len(res.token_ids)
    seq = res.prompt_token_ids + res.token_ids
    ref = reference_states(backend, seq)
    assert cap.layers == list(range(backend.num_layers))
    assert cap.counts == {"prompt": P, "response": n - 1, "last_prompt": 1}
    assert cap.positions == {"prompt": (0, P), "response": (P, P + n - 1),
                             "last_prompt": (P - 1, P)}
    assert cap.raw_positions == list(range(P + n - 1))
    assert cap.raw_token_ids == seq[:-1]  # the last sampled token is never forwarded
    for i, h in enumerate(ref):
        close(cap.means["prompt"][i], h[:P].mean(0), h)
        close(cap.means["response"][i], h[P:P + n - 1].mean(0), h)
        close(cap.means["last_prompt"][i], h[P - 1], h)
        close(cap.raw[:, i], h[:P + n - 1], h)
        assert cap.means["prompt"][i].dtype == torch.float32
        assert cap.means["prompt"][i].device.type == "cpu"

    exact = backend.capture([seq], RequestSpec(capture=CaptureSpec(
        layers=(backend.num_layers - 1, 0), spans=(Span("tail", P + 2),))), prompt_lens=[P])[0]
    assert exact.layers == [backend.num_layers - 1, 0]
    assert exact.counts["response"] == n and exact.counts["tail"] == n - 2
    for j, i in enumerate(exact.layers):
        close(exact.means["response"][j], ref[i][P:].mean(0), ref[i])
        close(exact.means["tail"][j], ref[i][P + 2:].mean(0), ref[i])
        close(exact.means["prompt"][j], ref[i][:P].mean(0), ref[i])


def test_add_changes_exactly_layers_from_its_own(backend):
    k = 1
    v = torch.randn(backend.hidden_size, generator=torch.Generator().manual_seed(1))
    seq = backend.generate(PROMPTS[:1], OPTS)[0]
    seq = seq.prompt_token_ids + seq.token_ids
    base = backend.capture([seq], ALL)[0]
    steered = backend.capture([seq], RequestSpec(steer=(SteerOp("add", k, v, scale=3.0),),
                                                 capture=CaptureSpec(raw=True)))[0]
    for i in range(backend.num_layers):
        if i < k:
            assert torch.equal(steered.raw[:, i], base.raw[:, i])
        else:
            assert (steered.raw[:, i] - base.raw[:, i]).abs().max() > 1e-2
    close(steered.raw[:, k] - base.raw[:, k], (3.0 * v).expand_as(base.raw[:, k]), base.raw)


@pytest.mark.parametrize("op", [SteerOp("cap", 2, [], min=-0.5, max=0.5),
                                SteerOp("cap", 2, [], max=0.0),
                                SteerOp("ablate", 2, [], scale=0.0)])
def test_each_op_at_its_layer_equals_ops_module(backend, op):
    u = torch.randn(backend.hidden_size, generator=torch.Generator().manual_seed(2))
    op = SteerOp(op.op, op.layer, u, scale=op.scale, min=op.min, max=op.max)
    seq = backend.tokenizer(PROMPTS[2])["input_ids"]
    base = backend.capture([seq], ALL)[0]
    steered = backend.capture([seq], RequestSpec(steer=(op,), capture=CaptureSpec(raw=True)))[0]
    want = apply_ops(base.raw[:, op.layer], None, [op])
    close(steered.raw[:, op.layer], want, base.raw)
    assert not torch.allclose(steered.raw[:, op.layer], base.raw[:, op.layer])


def test_unsteered_request_in_mixed_batch_equals_solo(backend):
    v = torch.randn(backend.hidden_size, generator=torch.Generator().manual_seed(3))
    plain = RequestSpec(capture=CaptureSpec(raw=True), key="plain")
    specs = [RequestSpec(steer=(SteerOp("add", 0, v, scale=8.0),), key="steered"), plain,
             RequestSpec(steer=(SteerOp("ablate", 1, v, scale=0.0),),
                         capture=CaptureSpec(layers=(3,)), key="ablated")]
    mixed = backend.generate(PROMPTS, OPTS, specs)
    solo = backend.generate(PROMPTS[1:2], OPTS, plain)[0]
    assert [r.key for r in mixed] == ["steered", "plain", "ablated"]
    assert mixed[1].token_ids == solo.token_ids
    for name in ("prompt", "response", "last_prompt"):
        close(mixed[1].capture.means[name], solo.capture.means[name])
    close(mixed[1].capture.raw, solo.capture.raw)
    assert mixed[0].capture is None and mixed[0].hook_calls > 0
    assert mixed[2].capture.layers == [3] and mixed[2].hook_calls > 0
    unsteered = backend.generate(PROMPTS[:1], OPTS, ALL)[0]
    assert unsteered.hook_calls == backend.num_layers * len(unsteered.token_ids)
    steered_cap = backend.generate(PROMPTS[:1], OPTS, RequestSpec(
        steer=specs[0].steer, capture=CaptureSpec()))[0].capture
    assert not torch.allclose(steered_cap.means["prompt"][0], unsteered.capture.means["prompt"][0])


def test_batched_equals_one_at_a_time(backend):
    specs = [RequestSpec(capture=CaptureSpec(raw=True), key=str(i)) for i in range(len(PROMPTS))]
    batched = backend.generate(PROMPTS, OPTS, specs)
    single = [backend.generate([p], OPTS, s)[0] for p, s in zip(PROMPTS, specs)]
    by_two = backend.generate(PROMPTS, OPTS, specs, batch_size=2)
    for b, s, t in zip(batched, single, by_two):
        assert b.token_ids == s.token_ids == t.token_ids
        assert b.prompt_token_ids == s.prompt_token_ids
        close(b.capture.raw, s.capture.raw)
        close(t.capture.raw, s.capture.raw)
        assert b.capture.raw_positions == s.capture.raw_positions
    seqs = [r.prompt_token_ids + r.token_ids for r in single]
    together = backend.capture(seqs, ALL)
    for seq, cap in zip(seqs, together):
        close(cap.raw, backend.capture([seq], ALL)[0].raw)


def test_bad_spec_names_request_and_field(backend):
    bad = RequestSpec(steer=(SteerOp("add", 0, [1.0] * (backend.hidden_size - 1)),))
    with pytest.raises(SpecError) as e:
        backend.generate(PROMPTS[:2], OPTS, [None, bad])
    assert e.value.field == "specs[1].steer[0].vector"
    with pytest.raises(SpecError) as e:
        backend.capture([[1, 2, 3]], [RequestSpec()])
    assert e.value.field == "specs[0].capture"


def test_stops_on_eos_and_reports_reason(backend):
    first = backend.generate(PROMPTS[:1], SamplingOptions(max_tokens=3))[0].token_ids[0]
    res = backend.generate(PROMPTS[:1], SamplingOptions(max_tokens=5, stop_token_ids=[first]),
                           ALL)[0]
    assert res.token_ids == [first] and res.finish_reason == "stop"
    assert res.capture.counts["response"] == 0 and "response" not in res.capture.means
    assert backend.generate(PROMPTS[:1], SamplingOptions(max_tokens=2, ignore_eos=True))[0] \
        .finish_reason == "length"


def test_detokenize_off_gives_the_same_tokens_and_no_text(backend):
    on = backend.generate(PROMPTS[:2], OPTS)
    off = backend.generate(PROMPTS[:2], dataclasses.replace(OPTS, detokenize=False))
    assert any(r.text for r in on)
    assert [r.token_ids for r in off] == [r.token_ids for r in on] and all(r.text == "" for r in off)
