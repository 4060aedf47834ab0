"""``SteeringEngine``: one warm ``vllm.LLM`` whose requests each carry their own steering and
capture spec (see :mod:`.extension` for what runs inside vLLM's worker).

Why it refuses rather than degrades: every way this can silently go wrong was measured here
(DESIGN.md) — hooks that never fire under torch.compile, Model Runner V2 with no
``input_batch``, prefix-cache hits that drop captured prompt rows, decoder layers whose output
is not ``(delta, residual)`` (Cohere, Exaone4). So the engine checks the runner, the model's
layer shape and its layer class (:mod:`.families`) at start, runs a self-test request whose
hooks must fire while a probe checks that each layer's ``residual + delta`` is the stream the
next layer reads (:mod:`.contract`), and after every ``generate`` raises for any request that
asked for steering or capture and was never touched by a hook. Every refusal is an
:class:`EngineError`, including those raised inside vLLM's worker (``collective_rpc`` hands
them back as bare ``Exception``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Self

from workers import gpu
from workers.engine import families
from workers.engine.contract import tolerance
from workers.engine.runner import V2_ENV
from workers.engine.spec import (
    WIRE_KEY,
    Capture,
    CaptureSpec,
    GenResult,
    RequestSpec,
    SamplingOptions,
    SpecError,
    as_specs,
    validate_specs,
)

log = logging.getLogger(__name__)

EXTENSION = "workers.engine.extension.SteeringExtension"
INGRAPH_EXTENSION = "workers.engine.ingraph.InGraphExtension"
# eager: forward hooks, vLLM in eager mode; ingraph: one op per layer inside vLLM's compiled
# graphs and CUDA graphs (workers/engine/ingraph.py)
PATHS = ("eager", "ingraph")
F32_ENV = "TRITON_F32_DEFAULT"  # Triton's default precision for fp32 dots: tf32 | tf32x3 | ieee


class EngineError(RuntimeError):
    """The engine cannot serve, or a request went wrong inside it (the message names it)."""


class StreamContractError(EngineError):
    """A decoder layer's ``residual + delta`` is not the stream the next layer reads;
    ``stream_check`` holds the probe's worst relative change per consumer."""

    def __init__(self, message: str, stream_check: dict[str, float] | None = None):
        super().__init__(message)
        self.stream_check = dict(stream_check or {})


class HooksNotFiredError(EngineError):
    """Steering/capture hooks did not run (compiled mode, or hooks removed)."""


class EngineOOMError(EngineError):
    """Out of memory while serving a batch; carries the figures the OOM policy needs."""

    def __init__(self, message: str, *, batch_size: int, memory: dict | None):
        super().__init__(message)
        self.batch_size = batch_size
        self.memory = memory


def _gpu_memory() -> dict | None:
    """Device-wide memory of this process's GPU (the first visible one), or None without one.

    Read through NVML, never ``torch.cuda``: a CUDA context in this process makes vLLM fork the
    next engine's core with CUDA initialised, which fails ("Cannot re-initialize CUDA in forked
    subprocess": measured on an H200 at a model switch), and holds GPU memory of its own.
    """
    visible = gpu.visible_gpus()
    reading = gpu.memory(visible[0]) if visible else None
    return reading.as_dict() if reading is not None else None


def steer_key(spec: RequestSpec) -> str:
    """A stable hash of a request's steering: its prefix-cache salt and compile-cache key.
    Vectors are hashed as float32 bytes (hashing their JSON cost ~0.1 s per call for a spec
    steering every layer of an 8B model)."""
    import numpy as np

    h = hashlib.sha256()
    for op in spec.steer:
        meta = {"op": op.op, "layer": int(op.layer), "scale": float(op.scale), "min": op.min,
                "max": op.max}
        h.update(json.dumps(meta, sort_keys=True).encode())
        vec = op.vector
        if hasattr(vec, "detach"):
            vec = vec.detach().float().cpu().numpy()
        h.update(np.ascontiguousarray(np.asarray(vec, dtype=np.float32)).tobytes())
    return h.hexdigest()[:32]


class SteeringEngine:
    """A warm vLLM engine with per-request steering and activation capture.

    ``enforce_eager`` defaults to True and should stay so: PyTorch forward hooks never fire
    inside vLLM's torch.compile / CUDA-graph path (measured: 0 calls, silently). With it False
    the start-up self-test fails and the engine refuses to serve. Eager costs throughput on
    GPUs (about half of compiled mode for a 0.6B model on an H100).

    ``VLLM_USE_V2_MODEL_RUNNER`` is set to ``0`` before vLLM starts unless already set: the
    hooks need the V1 model runner (:mod:`.runner`); any other runner is refused.

    ``allow_unverified_family`` serves a decoder-layer class outside :data:`families.VERIFIED`
    (for experiments); the class is then in ``unverified_family``, which the caller must
    record with every result. The stream check runs either way.
    """

    def __init__(self, model: str, *, dtype: str = "bfloat16", max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool = True,
                 tensor_parallel_size: int = 1, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 load_format: str = "auto", seed: int = 0,
                 allow_unverified_family: bool = False, steering_path: str = "eager",
                 ingraph: dict | None = None, async_scheduling: bool = False, **llm_kwargs):
        if steering_path not in PATHS:
            raise EngineError(f"steering_path={steering_path!r}: use one of {', '.join(PATHS)}")
        if async_scheduling and steering_path != "ingraph":
            raise EngineError("async_scheduling=True needs steering_path='ingraph': the eager "
                              "hooks cannot drop the extra forward async scheduling gives a "
                              "request that stopped, and a capture would average it in")
        self.async_scheduling = bool(async_scheduling)
        self.steering_path = steering_path
        os.environ.setdefault(V2_ENV, "0")
        # Spawn, never fork: any torch.cuda call in this process (even is_available) poisons a
        # forked engine core ("Cannot re-initialize CUDA in forked subprocess", seen on an H200).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        if str(dtype).removeprefix("torch.") in ("float32", "fp32", "float"):
            # vLLM's Triton attention (its CUDA backend for fp32) multiplies fp32 in TF32 unless
            # told otherwise; fp32 captures must be fp32 (measured on an H200, tiny Qwen3:
            # 1e-3 relative error against transformers with TF32, 4e-7 without; see
            # scripts/gpu_parity_report.py).
            os.environ.setdefault(F32_ENV, "ieee")
        from vllm import LLM

        self.model = model
        self.memory_before = _gpu_memory()
        self.memory_after: dict | None = None
        self._calls = 0
        self.last_timing: dict[str, float] = {}  # host seconds per phase of the last generate
        self._llm = None
        self.unverified_family: str | None = None  # the layer class(es) served unverified
        self.stream_check: dict = {}  # consumer -> worst relative change (self-test probe)
        kwargs = {"model": model, "dtype": dtype, "max_model_len": max_model_len,
                      "gpu_memory_utilization": gpu_memory_utilization,
                      "enforce_eager": enforce_eager, "tensor_parallel_size": tensor_parallel_size,
                      "max_num_seqs": max_num_seqs, "enable_prefix_caching": enable_prefix_caching,
                      "load_format": load_format, "seed": seed, "worker_extension_cls": EXTENSION,
                      # Async scheduling plans step N+1 before step N's tokens are known, so a
                      # request that just stopped on a sampled stop token is forwarded once
                      # more; a capture would average that row in. The in-graph path holds
                      # each request's latest response row back and drops that extra forward
                      # (ingraph_op); the eager hooks cannot, so it is off there (the span
                      # check in _capture refuses such a row either way).
                      "async_scheduling": self.async_scheduling}
        if max_num_batched_tokens is not None:
            # vLLM requires max_num_batched_tokens >= max_num_seqs; a small token budget (to
            # force chunked prefill) implies fewer concurrent sequences.
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
            kwargs["max_num_seqs"] = min(max_num_seqs, max_num_batched_tokens)
        if steering_path == "ingraph":
            # The op is spliced into the layers at load_model, before vLLM compiles them, so
            # compiled mode and CUDA graphs stay on; the op's code hash salts the compile cache.
            from workers.engine import ingraph as ig

            kwargs["enforce_eager"] = False
            kwargs["worker_extension_cls"] = INGRAPH_EXTENSION
            extra = dict(llm_kwargs.pop("additional_config", None) or {})
            extra[ig.CONFIG_KEY] = ig.config(max_num_seqs=kwargs["max_num_seqs"],
                                              async_scheduling=self.async_scheduling,
                                              **(ingraph or {}))
            kwargs["additional_config"] = extra
        kwargs.update(llm_kwargs)
        self._llm = LLM(**kwargs)
        try:
            self._check_scheduler()
            info = self._rpc("steering_install")[0]
            self.runner_kind: str = info["runner_kind"]
            self.num_layers: int = int(info["num_layers"])
            self.hidden_size: int = int(info["hidden_size"])
            self.model_class: str = info["model_class"]
            self.layer_classes: list[str] = list(info["layer_classes"])
            self._check_family(allow_unverified_family)
            self.self_test()
        except BaseException:
            self.shutdown()
            raise

    # ---- properties -------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._llm.get_tokenizer()

    @property
    def llm(self):
        """The underlying ``vllm.LLM`` (for plain, unhooked use such as baselines)."""
        return self._llm

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- serving ----------------------------------------------------------------------
    def _rpc(self, method: str, *args) -> list:
        """``collective_rpc`` whose failures are :class:`EngineError` (vLLM re-raises an
        error inside its worker as a bare ``Exception`` carrying the message)."""
        try:
            return self._llm.collective_rpc(method, args=args)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"{self.model}: {method} failed in the vLLM worker: "
                              f"{exc}") from exc

    def _check_family(self, allow_unverified: bool) -> None:
        try:
            self.unverified_family = families.check(self.model_class, self.layer_classes,
                                                    allow_unverified=allow_unverified)
        except families.UnverifiedFamily as exc:
            raise EngineError(str(exc)) from None
        if self.unverified_family:
            log.warning("%s: serving unverified decoder layer class %s (%s=True); results "
                        "record unverified_family", self.model, self.unverified_family,
                        families.SETTING)

    def self_test(self) -> None:
        """Refuse to serve unless a capture request sees every layer hook fire and every
        layer's ``residual + delta`` is the stream the next layer reads."""
        spec = RequestSpec(capture=CaptureSpec(), key="self-test")
        # The stream-contract probe works through forward hooks, which never run inside
        # compiled graphs: the in-graph path relies on the family check and its own proof.
        probe = self.steering_path == "eager"
        if probe:
            self._rpc("steering_stream_check", True)
        try:
            res = self.generate([[1, 2, 3, 4]], SamplingOptions(max_tokens=2, ignore_eos=True),
                                [spec])[0]
        except HooksNotFiredError as exc:
            raise HooksNotFiredError(
                f"{self.model_class}: the steering hooks did not fire in the start-up self-test "
                f"({exc}); vLLM is probably running a compiled graph. Start the engine with "
                "enforce_eager=True, or use steering_path='ingraph'.") from None
        except EngineError as exc:
            if not probe:
                raise HooksNotFiredError(f"{self.model_class}: start-up self-test failed on "
                                         f"the {self.steering_path} path: {exc}") from None
            raise
        finally:
            reports = self._rpc("steering_stream_check", False) if probe else []
        if res.hook_calls < self.num_layers:
            raise HooksNotFiredError(
                f"{self.model_class}: only {res.hook_calls} of {self.num_layers} layer hooks "
                "fired in the self-test; start the engine with enforce_eager=True")
        if probe:
            self._check_stream(reports)
        if self.steering_path == "ingraph":
            # The op's proof counter matched rows x layers (checked per request); the sums it
            # accumulated on the device must be there too: 4 prompt rows, non-zero, finite.
            cap = res.capture
            means = cap.means.get("prompt") if cap is not None else None
            if (cap is None or cap.counts.get("prompt") != 4 or means is None
                    or not bool(means.isfinite().all()) or float(means.abs().sum()) == 0.0):
                raise HooksNotFiredError(f"{self.model_class}: the in-graph op accumulated no "
                                         "capture rows on the device in the self-test")

    def _check_stream(self, reports: list[dict]) -> None:
        """Refuse when a layer's output, split differently with the same ``residual +
        delta``, changed what reads it (see :mod:`.contract`), or could not be probed."""
        worst: dict[str, float] = {}
        producer: dict[str, tuple[int, str]] = {}
        for rep in reports:
            for name, err in rep["errors"].items():
                raise StreamContractError(
                    f"model {self.model_class}: the start-up stream check could not probe "
                    f"{name} ({err.splitlines()[0]}), so it cannot tell whether "
                    f"{'/'.join(self.layer_classes)} returns (delta, residual); refusing to "
                    "serve")
            for name, dev in rep["worst"].items():
                worst[name] = max(worst.get(name, 0.0), dev)
            producer.update({k: tuple(v) for k, v in rep["producer"].items()})
        if self.num_layers > 1 and not any(name.startswith("layer") for name in worst):
            raise StreamContractError(f"model {self.model_class}: the start-up stream check "
                                      "saw no layer input; refusing to serve")
        self.stream_check = worst
        tol = tolerance(reports[0]["dtype"] or "float32")
        bad = {name: dev for name, dev in worst.items() if dev > tol}
        if bad:
            name, dev = max(bad.items(), key=lambda kv: kv[1])
            index, cls = producer[name]
            raise StreamContractError(
                f"model {self.model_class}: decoder layer {index} ({cls}) does not return "
                f"(delta, residual): moving a random vector from its residual into its delta "
                f"(residual + delta unchanged) changed the output of {name} by {dev:.3g} of "
                f"its scale (tolerance {tol:g}; {len(bad)} of {len(worst)} consumers over it). "
                "residual + delta is not the stream the next layer starts from, so captures "
                "and cap/ablate steering would be wrong; refusing to serve", worst)

    def warm_up(self, n: int = 64, prompt_len: int = 128, max_tokens: int = 16) -> None:
        """A job-shaped batch (generate with capture, then the exact re-read) whose results
        are dropped: the worker reads its warm memory baseline after this."""
        vocab = max(16, min(len(self.tokenizer), 4096))
        prompts = [[3 + (i * 131 + j * 7) % (vocab - 3) for j in range(prompt_len)]
                   for i in range(n)]
        spec = RequestSpec(capture=CaptureSpec(), key="warm-up")
        res = self.generate(prompts, SamplingOptions(max_tokens=max_tokens, ignore_eos=True),
                            spec)
        self.capture([p + r.token_ids for p, r in zip(prompts, res)], spec,
                     prompt_lens=[len(p) for p in prompts])

    def _check_scheduler(self) -> None:
        sched = getattr(getattr(self._llm.llm_engine, "vllm_config", None), "scheduler_config",
                        None)
        if getattr(sched, "async_scheduling", False) and not self.async_scheduling:
            raise EngineError("vLLM's async scheduling is on: it can forward a request once "
                              "more after it stops, and captures would average that row in; "
                              "start the engine with async_scheduling=False")

    def _validate(self, specs: list[RequestSpec | None]) -> None:
        validate_specs(specs, num_layers=self.num_layers, hidden_size=self.hidden_size)
        if self.steering_path == "ingraph":
            for i, spec in enumerate(specs):
                if spec is not None and spec.capture is not None and spec.capture.raw:
                    raise SpecError(f"specs[{i}].capture.raw", "raw per-token capture needs "
                                    "the eager steering path (CHATSPACE_ENGINE_STEERING_PATH="
                                    "eager); the in-graph path returns span means only")

    def _params(self, options: SamplingOptions, spec: RequestSpec | None, uid: str,
                max_tokens: int | None = None, prompt_len: int | None = None,
                key: str | None = None):
        from vllm import SamplingParams

        kw = {"max_tokens": max_tokens or options.max_tokens, "temperature": options.temperature,
                  "top_p": options.top_p, "seed": options.seed, "ignore_eos": options.ignore_eos,
                  "stop_token_ids": list(options.stop_token_ids)}
        if options.choices:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(choice=list(options.choices))
        if spec is not None and spec.active:
            bare = RequestSpec(capture=spec.capture, key=spec.key)  # vectors go by key
            kw["extra_args"] = {WIRE_KEY: {
                "uid": uid, "spec": bare.to_wire(), "steer_key": key, "prompt_len": prompt_len}}
            if spec.capture is not None:
                # A prefix-cache hit skips the forward of the cached rows: capture would miss them.
                kw["skip_reading_prefix_cache"] = True
        return SamplingParams(**kw)

    def generate(self, prompts: Sequence[str | list[int]], options: SamplingOptions | None = None,
                 specs: RequestSpec | Sequence[RequestSpec | None] | None = None, *,
                 _max_tokens: int | None = None,
                 _prompt_lens: Sequence[int] | None = None) -> list[GenResult]:
        """Generate for each prompt (text or token ids) under its own spec (None = plain)."""
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            self.last_timing[name] = now - clock[0]
            clock[0] = now

        self.last_timing = {}
        options = options or SamplingOptions()
        prompts = list(prompts)
        specs = as_specs(specs, len(prompts))
        self._validate(specs)
        lap("validate_s")
        self._calls += 1
        uids = [f"{self._calls}-{i}" for i in range(len(prompts))]
        inputs, params = [], []
        lens = list(_prompt_lens) if _prompt_lens is not None else [None] * len(prompts)
        keys: dict[int, str] = {}  # id(spec) -> steer key: hash each distinct spec once
        register: dict[str, list[dict]] = {}
        for prompt, spec, uid, plen in zip(prompts, specs, uids, lens):
            item = {"prompt": prompt} if isinstance(prompt, str) else {
                "prompt_token_ids": [int(t) for t in prompt]}
            key = None
            if spec is not None and spec.steer:
                key = keys.get(id(spec))
                if key is None:
                    key = keys[id(spec)] = steer_key(spec)
                    register[key] = [op.to_wire() for op in spec.steer]
                item["cache_salt"] = key
            inputs.append(item)
            params.append(self._params(options, spec, uid, _max_tokens, plen, key))
        lap("prepare_s")
        self._rpc("steering_reset")
        if register:
            self._rpc("steering_register", register)
        lap("register_s")
        try:
            outs = self._llm.generate(inputs, params, use_tqdm=False)
        except Exception as exc:
            if gpu.is_oom(exc):
                raise EngineOOMError(f"out of memory generating a batch of {len(prompts)}: {exc}",
                                     batch_size=len(prompts), memory=_gpu_memory()) from exc
            raise
        lap("generate_s")
        active = [uid for uid, s in zip(uids, specs) if s is not None and s.active]
        # Positions each request forwarded: [0, P + generated - 1), the last sampled token is
        # never fed back (async scheduling may forward it once more; the worker drops that row)
        ends = {uid: len(out.prompt_token_ids) + max(len(out.outputs[0].token_ids), 1) - 1
                for uid, out, s in zip(uids, outs, specs) if s is not None and s.active}
        per_rank = self._rpc("steering_collect", active, ends) if active else [{}]
        lap("collect_s")
        from workers.engine.extension import unlink_shipped

        try:
            results = self._results(outs, specs, uids, per_rank)
        finally:  # the means' /dev/shm files (large captures): mapped now, or never needed
            unlink_shipped(d for res in per_rank for got in res.values() if got
                           for d in (got.get("means") or {}).values())
        lap("results_s")
        return results

    def _results(self, outs, specs, uids, per_rank) -> list[GenResult]:
        results, errors, untouched = [], [], []
        for i, (out, spec, uid) in enumerate(zip(outs, specs, uids)):
            comp = out.outputs[0]
            res = GenResult(key=spec.key if spec else None,
                            prompt_token_ids=list(out.prompt_token_ids),
                            token_ids=list(comp.token_ids), text=comp.text,
                            finish_reason=comp.finish_reason)
            if spec is not None and spec.active:
                name = spec.key if spec.key is not None else f"request {i}"
                for rank, rank_res in enumerate(per_rank):
                    got = rank_res.get(uid)
                    if got is None:
                        untouched.append(name)
                        break
                    if got["errors"]:
                        errors.append(f"{name} (rank {rank}): {got['errors'][0]}")
                    if rank == 0:
                        res.hook_calls = int(got["hook_calls"])
                        if got["hook_calls"] == 0:
                            untouched.append(name)
                        if spec.capture is not None:
                            res.capture = self._capture(got, res)
            results.append(res)
        if errors:
            raise EngineError("steering/capture hook failed for " + "; ".join(errors))
        if untouched:
            raise HooksNotFiredError(
                f"requests {', '.join(map(str, untouched))} asked for steering or capture but no "
                "hook touched them (hooks not firing: is the engine compiled? use "
                "enforce_eager=True)")
        return results

    @staticmethod
    def _capture(got: dict, res: GenResult) -> Capture:
        from workers.engine.extension import unpack

        cap = Capture(layers=got["layers"], means={k: unpack(v) for k, v in got["means"].items()},
                      counts=dict(got["counts"]),
                      positions={k: tuple(v) for k, v in got["positions"].items()})
        # Forwarded positions are [0, P + n_generated - 1): the last sampled token is never fed
        # back. A span reaching past that averaged a row the reference never sees.
        limit = len(res.prompt_token_ids) + max(len(res.token_ids), 1) - 1
        for name, (_, end) in cap.positions.items():
            if end > limit:
                raise EngineError(f"capture span {name!r} covered positions up to {end}, past "
                                  f"the {limit} this request forwarded (an extra scheduler step?)")
        if "raw" in got:
            seq = res.prompt_token_ids + res.token_ids
            cap.raw = unpack(got["raw"])
            cap.raw_positions = list(got["raw_positions"])
            cap.raw_token_ids = [seq[p] for p in cap.raw_positions]
        return cap

    def capture(self, sequences: Sequence[list[int]],
                specs: RequestSpec | Sequence[RequestSpec | None] | None = None, *,
                prompt_lens: Sequence[int] | None = None) -> list[Capture]:
        """Exact mode: one prefill pass over finished conversations (token ids); every span is
        read from the full sequence, so a response span covers every response token.

        With ``prompt_lens`` the built-in spans split each sequence at P: ``prompt`` = [0, P),
        ``response`` = [P, len), ``last_prompt`` = P−1 (the persona pipelines' definition);
        without, the whole sequence is the prompt and only named spans cover the rest.
        """
        specs = as_specs(specs, len(sequences))
        if prompt_lens is not None:
            prompt_lens = [int(p) for p in prompt_lens]
            if len(prompt_lens) != len(sequences):
                raise SpecError("prompt_lens", f"{len(prompt_lens)} lengths for "
                                f"{len(sequences)} sequences")
            for i, (p, s) in enumerate(zip(prompt_lens, sequences)):
                if not 1 <= p <= len(s):
                    raise SpecError(f"prompt_lens[{i}]", f"{p} not in 1..{len(s)}")
        full = [s if s is not None and s.capture is not None else
                RequestSpec(steer=s.steer if s else (), capture=CaptureSpec(response=False),
                            key=s.key if s else None) for s in specs]
        res = self.generate(list(sequences), SamplingOptions(max_tokens=1), full, _max_tokens=1,
                            _prompt_lens=prompt_lens)
        return [r.capture for r in res]

    # ---- lifecycle --------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine core and free its memory; safe to call twice. On CUDA the reading
        after (``memory_after``) can be compared with ``memory_before``."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            log.exception("vLLM engine core shutdown raised")
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:
            log.debug("torch.cuda.empty_cache failed", exc_info=True)
        self.memory_after = _gpu_memory()

    @property
    def memory_released(self) -> int | None:
        """Bytes still in use after shutdown compared to before start (CUDA only)."""
        if self.memory_before is None or self.memory_after is None:
            return None
        return self.memory_after["used"] - self.memory_before["used"]
