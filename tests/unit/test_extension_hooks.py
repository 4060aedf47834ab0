"""The layer hook's fast paths against a per-row reference, without vLLM.

The hook takes different routes for the same math: a request group whose rows are contiguous
is steered through a slice, an interleaved one through gathers; add-only layers take one fused
add; a capture of contiguous rows skips the gathers. Each route must give what the steering ops
give row by row, in bf16 bit for bit. The runner is a stand-in with the fields the adapter
reads (the edge of this unit); vLLM runs the same hook in tests/engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from workers.engine import extension as ext
from workers.engine.ops import CompiledOps
from workers.engine.runner import StepView
from workers.engine.spec import CaptureSpec, RequestSpec, SteerOp

L, H = 3, 16


class _Layer(torch.nn.Module):
    def forward(self, positions, hidden_states, residual):  # the signature the check reads
        return hidden_states, residual


def _state(requests: dict) -> ext._State:
    runner = SimpleNamespace(
        input_batch=object(), requests=requests, query_start_loc=None, device="cpu",
        model=SimpleNamespace(model=SimpleNamespace(layers=[_Layer() for _ in range(L)])),
        model_config=SimpleNamespace(get_hidden_size=lambda: H))
    return ext._State(SimpleNamespace(model_runner=runner, rank=0))


def _vec(seed: int) -> list[float]:
    return torch.randn(H, generator=torch.Generator().manual_seed(seed)).tolist()


STEER = {
    "add": [SteerOp("add", 0, _vec(1), scale=3.0), SteerOp("add", 2, _vec(2), scale=-1.5)],
    "cap": [SteerOp("cap", 1, _vec(3), max=0.25), SteerOp("add", 1, _vec(4))],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hook_routes_equal_the_ops_row_by_row(dtype):
    # Six requests in batch order, each capturing: "add" three times and "cap" twice,
    # interleaved (the gather route) in the first two steps; in the third, two "add" requests
    # are adjacent (the slice route).
    plan = ["add", "cap", "add", None, "cap", "add"]
    prompt_len = 4
    requests, keys = {}, {}
    for i, key in enumerate(plan):
        spec = RequestSpec(capture=CaptureSpec(), key=f"r{i}")
        keys[f"q{i}"] = key
        wire = {"uid": f"u{i}", "spec": spec.to_wire(), "steer_key": key,
                "prompt_len": prompt_len}
        requests[f"q{i}"] = SimpleNamespace(
            sampling_params=SimpleNamespace(extra_args={ext.WIRE_KEY: wire}),
            num_prompt_tokens=prompt_len)
    state = _state(requests)
    for key, ops in STEER.items():
        state.compiled[key] = CompiledOps.compile(ops)

    gen = torch.Generator().manual_seed(0)
    sums = {}  # (request, span) -> fp32 sum per layer, the reference
    steps = [  # (request ids in batch order, rows per request, first position)
        (list(keys), [prompt_len] * 6, 0),                 # prefill: every prompt row
        (list(keys), [1] * 6, prompt_len),                 # decode: one row each
        (["q0", "q5", "q1"], [1, 1, 1], prompt_len + 1),   # "add" rows adjacent: a slice
    ]
    for ids, counts, pos in steps:
        starts = [sum(counts[:i]) for i in range(len(counts))]
        state._build_plan(StepView(req_ids=ids, row_starts=starts,
                                   row_ends=[a + n for a, n in zip(starts, counts)],
                                   pos_starts=[pos] * len(ids)))
        n = sum(counts)
        for layer in range(L):
            delta = (torch.randn(n, H, generator=gen) * 4).to(dtype)
            residual = (torch.randn(n, H, generator=gen) * 4).to(dtype)
            want = delta.clone()
            for rid, a, c in zip(ids, starts, counts):
                key = keys[rid]
                ops = state.compiled[key].for_layer(layer) if key else None
                if ops is not None:
                    want[a:a + c] = ops.apply(delta[a:a + c], residual[a:a + c])
                h = want[a:a + c].float() + residual[a:a + c].float()
                for span, lo, hi in (("prompt", 0, prompt_len), ("response", prompt_len, 99),
                                     ("last_prompt", prompt_len - 1, prompt_len)):
                    for r in range(c):
                        if lo <= pos + r < hi:
                            acc = sums.setdefault((rid, span), torch.zeros(L, H))
                            acc[layer] += h[r]
            state.on_layer(layer, (delta, residual))
            if dtype == torch.bfloat16:
                assert torch.equal(delta, want), f"layer {layer} at position {pos}"
            else:
                torch.testing.assert_close(delta, want, rtol=1e-6, atol=1e-5)
        state.finish_step()

    for rid in keys:
        req = state.by_uid[f"u{rid[1:]}"]
        assert req.errors == []
        parts = []
        got = state.collect(req, parts)
        assert got["counts"] == {"prompt": 4, "response": 2 if rid in ("q0", "q5", "q1") else 1,
                                 "last_prompt": 1}
        shipped = ext.ship(parts)
        for span, i in got["means"].items():
            torch.testing.assert_close(ext.unpack(shipped[i]),
                                       sums[(rid, span)] / got["counts"][span],
                                       rtol=1e-6, atol=1e-6)
