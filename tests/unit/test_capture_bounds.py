"""The engine refuses a capture whose spans reach past the positions a request forwarded.

vLLM's async scheduling (on by default for CUDA in vLLM 0.26) plans the next step before the
last one's tokens are known, so a request that just stopped can be forwarded once more, and
its row would land in the response mean. The engine turns it off; this guard catches any
extra step, on any build, instead of storing a wrong mean.
"""

from __future__ import annotations

import pytest
import torch

from workers.engine.engine import EngineError, SteeringEngine
from workers.engine.extension import pack
from workers.engine.spec import GenResult


def _got(end: int) -> dict:
    mean = pack(torch.ones(2, 4))
    return {"layers": [0, 1], "means": {"prompt": mean, "response": mean},
            "counts": {"prompt": 10, "response": end - 10},
            "positions": {"prompt": (0, 10), "response": (10, end)}}


def _res(n_prompt: int, n_gen: int) -> GenResult:
    return GenResult(key=None, prompt_token_ids=list(range(n_prompt)),
                     token_ids=list(range(n_gen)), text="", finish_reason="length")


def test_spans_within_forwarded_positions_pass():
    # exact mode: a 14-token sequence, one sampled token: positions [0, 14) were forwarded
    cap = SteeringEngine._capture(_got(14), _res(14, 1))
    assert cap.positions["response"] == (10, 14)
    # generation: 10 prompt tokens, 5 generated: the last one is never forwarded
    assert SteeringEngine._capture(_got(14), _res(10, 5)).counts["response"] == 4


@pytest.mark.parametrize(("n_prompt", "n_gen"), [(14, 1), (10, 4)])
def test_an_extra_forwarded_step_is_refused(n_prompt, n_gen):
    with pytest.raises(EngineError, match="response.*past"):
        SteeringEngine._capture(_got(15), _res(n_prompt, n_gen))
