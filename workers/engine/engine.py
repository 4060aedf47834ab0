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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    Reread,
    SamplingOptions,
    SpecError,
    StreamItem,
    StreamResult,
    as_specs,
    validate_spec,
)
from workers.engine.stream import RereadFn

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

    ``max_num_seqs=None`` takes vLLM's own offline default for the card (1024 on an
    H100/H200, 256 on smaller GPUs and on CPUs); :meth:`stream` keeps twice that in flight by
    default, so the scheduler always has samples waiting.

    ``allow_unverified_family`` serves a decoder-layer class outside :data:`families.VERIFIED`
    (for experiments); the class is then in ``unverified_family``, which the caller must
    record with every result. The stream check runs either way.

    ``readout`` (in-graph path only): how finished captures reach this process. ``auto`` /
    ``ipc``: on a CUDA device the worker divides the sums there and hands over one CUDA IPC
    handle per step, and this process makes the one device -> host copy; ``rpc``: the means'
    bytes through vLLM's RPC (1.5 s per 510 MB measured on an H200, the cost that held
    capture at 0.65x plain compiled vLLM).
    """

    def __init__(self, model: str, *, dtype: str = "bfloat16", max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool = True,
                 tensor_parallel_size: int = 1, max_num_seqs: int | None = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 load_format: str = "auto", seed: int = 0,
                 allow_unverified_family: bool = False, steering_path: str = "eager",
                 ingraph: dict | None = None, async_scheduling: bool = False,
                 readout: str = "auto", **llm_kwargs):
        if steering_path not in PATHS:
            raise EngineError(f"steering_path={steering_path!r}: use one of {', '.join(PATHS)}")
        if async_scheduling and steering_path != "ingraph":
            raise EngineError("async_scheduling=True needs steering_path='ingraph': the eager "
                              "hooks cannot drop the extra forward async scheduling gives a "
                              "request that stopped, and a capture would average it in")
        self.async_scheduling = bool(async_scheduling)
        self.steering_path = steering_path
        self.readout = readout if steering_path == "ingraph" else "rpc"
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

        if max_num_seqs is None:  # vLLM's offline default for this card (NVML, no CUDA here)
            from vllm.engine.arg_utils import EngineArgs
            from vllm.usage.usage_lib import UsageContext

            max_num_seqs = int(EngineArgs.get_batch_defaults(tensor_parallel_size)[1][
                UsageContext.LLM_CLASS])
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
            try:
                extra[ig.CONFIG_KEY] = ig.config(max_num_seqs=kwargs["max_num_seqs"],
                                                  async_scheduling=self.async_scheduling,
                                                  readout=readout, **(ingraph or {}))
            except ig.InGraphError as exc:
                raise EngineError(str(exc)) from None
            kwargs["additional_config"] = extra
        kwargs.update(llm_kwargs)
        self._llm = LLM(**kwargs)
        self._streaming = False  # one run of requests at a time (see _Run)
        try:
            self._check_scheduler()
            sched = self._llm.llm_engine.vllm_config.scheduler_config
            self.max_num_seqs: int = int(sched.max_num_seqs)
            self.max_num_batched_tokens: int = int(sched.max_num_batched_tokens)
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

    def warm_up(self, n: int | None = None, prompt_len: int | None = None,
                max_tokens: int = 16) -> None:
        """A capture job's shape at the engine's maxima, results dropped: ``n`` samples
        (default ``max_num_seqs``) whose prompts together fill one step's token budget,
        sampled at temperature 1 with top-p (vLLM's sorting sampler path at full batch), each
        then re-read capturing its response mean (a job's default), all through one stream.
        The worker reads its warm memory baseline after this: vLLM's allocator pools, the
        sampler's buffers and the capture sums then hold what a real job grows them to."""
        n = max(1, int(n or self.max_num_seqs))
        room = int(self._llm.llm_engine.vllm_config.model_config.max_model_len) - max_tokens - 1
        if prompt_len is None:
            prompt_len = self.max_num_batched_tokens // n
        prompt_len = max(4, min(int(prompt_len), room))
        vocab = max(16, min(len(self.tokenizer), 4096))
        items = (StreamItem(i, [3 + (i * 131 + j * 7) % (vocab - 3) for j in range(prompt_len)])
                 for i in range(n))
        spec = RequestSpec(capture=CaptureSpec(prompt=False, last_prompt=False), key="warm-up")
        options = SamplingOptions(max_tokens=max_tokens, temperature=1.0, top_p=0.95,
                                  ignore_eos=True)
        for _ in self.stream(items, options, max_in_flight=2 * n,
                             reread=lambda item, gen: Reread(
                                 list(item.prompt) + gen.token_ids, spec,
                                 prompt_len=len(item.prompt))):
            pass

    def _check_scheduler(self) -> None:
        sched = getattr(getattr(self._llm.llm_engine, "vllm_config", None), "scheduler_config",
                        None)
        if getattr(sched, "async_scheduling", False) and not self.async_scheduling:
            raise EngineError("vLLM's async scheduling is on: it can forward a request once "
                              "more after it stops, and captures would average that row in; "
                              "start the engine with async_scheduling=False")

    def _validate(self, specs: list[RequestSpec | None]) -> None:
        seen: dict = {}
        for i, spec in enumerate(specs):
            self._validate_one(spec, f"specs[{i}]", seen)

    def _check_path(self, spec: RequestSpec | None, where: str) -> None:
        """What the steering path cannot serve: raw per-token capture on the in-graph op."""
        if (self.steering_path == "ingraph" and spec is not None and spec.capture is not None
                and spec.capture.raw):
            raise SpecError(f"{where}.capture.raw", "raw per-token capture needs the eager "
                            "steering path (CHATSPACE_ENGINE_STEERING_PATH=eager); the "
                            "in-graph path returns span means only")

    def _params(self, options: SamplingOptions, spec: RequestSpec | None, uid: str,
                max_tokens: int | None = None, prompt_len: int | None = None,
                key: str | None = None):
        from vllm import SamplingParams

        kw = {"max_tokens": max_tokens or options.max_tokens, "temperature": options.temperature,
                  "top_p": options.top_p, "seed": options.seed, "ignore_eos": options.ignore_eos,
                  "stop_token_ids": list(options.stop_token_ids), "detokenize": options.detokenize}
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
        """Generate for each prompt (text or token ids) under its own spec (None = plain).

        Every prompt enters vLLM at once (its scheduler batches them); hook failures are
        raised for the whole call, naming every request they hit."""
        from workers.engine.extension import fetch_ipc

        t0 = time.perf_counter()
        options = options or SamplingOptions()
        prompts = list(prompts)
        specs = as_specs(specs, len(prompts))
        self._validate(specs)
        lens = list(_prompt_lens) if _prompt_lens is not None else [None] * len(prompts)
        run = _Run(self, size=len(prompts))
        done: dict[int, tuple] = {}
        per_rank: list[dict] = [{}]
        fetch_s = 0.0
        try:
            for i, (prompt, spec, plen) in enumerate(zip(prompts, specs, lens)):
                run.add(_Flight(StreamItem(i, prompt, spec), spec), prompt, options,
                        max_tokens=_max_tokens, prompt_len=plen)
            run.flush()
            t1 = time.perf_counter()
            while run.flights:
                finished, got = run.step()
                for fl, out in finished:
                    done[fl.item.tag] = (fl, out)
                # each step's in-graph readout block copied to the host now, as in stream():
                # the copy overlaps the steps vLLM's core runs meanwhile, and the worker's block
                # is not held in torch's IPC limbo until the call ends
                t = time.perf_counter()
                fetch_ipc(got or ())
                fetch_s += time.perf_counter() - t
                _merge(per_rank, got)
        finally:
            run.close()
        t2 = time.perf_counter()
        order = [done[i] for i in range(len(prompts))]
        results = self._results([out for _, out in order], specs, [fl.uid for fl, _ in order],
                                per_rank)
        # host seconds per phase (bench/engine_overhead.py): generate_s includes collect_s and
        # fetch_s (the in-graph readout's host copies)
        self.last_timing = {"prepare_s": t1 - t0, "generate_s": t2 - t1,
                            "collect_s": run.collect_s, "fetch_s": fetch_s,
                            "results_s": time.perf_counter() - t2}
        return results

    def stream(self, items: Iterable[StreamItem], options: SamplingOptions | None = None, *,
               reread: RereadFn | None = None,
               max_in_flight: int | None = None) -> Iterator[list[StreamResult]]:
        """Samples through vLLM's scheduler, at most ``max_in_flight`` at a time (a memory cap;
        default twice ``max_num_seqs`` so the scheduler always has work queued).

        Items are pulled from ``items`` as room frees. When a sample's generation finishes,
        ``reread(item, gen)`` may return its exact re-read (:class:`Reread`: the semantics of
        :meth:`capture`), which enters vLLM at once; the sample is done when its re-read is.
        Yields the samples that finished together, in completion order. Closing the iterator
        early (an exception in the caller, a cancel) aborts what is still in vLLM. An
        out-of-memory error is raised as :class:`EngineOOMError` with ``batch_size`` the cap.
        """
        options = options or SamplingOptions()
        cap = max(1, int(max_in_flight or 2 * self.max_num_seqs))
        reread_options = SamplingOptions(max_tokens=1)
        run = _Run(self, size=cap)
        seen: dict[int, object] = {}
        it = iter(items)
        live = n = 0
        try:
            while True:
                while live < cap and (item := next(it, _END)) is not _END:
                    self._validate_one(item.spec, f"items[{n}]", seen)
                    run.add(_Flight(item, item.spec), item.prompt, options)
                    live += 1
                    n += 1
                run.flush()
                if not live:
                    return
                finished, per_rank = run.step()
                if not finished:
                    continue
                gens = self._results([out for _, out in finished],
                                     [fl.spec for fl, _ in finished],
                                     [fl.uid for fl, _ in finished], per_rank or [{}])
                batch = []
                for (fl, _), res in zip(finished, gens):
                    if fl.gen is not None:  # its re-read finished: the sample is done
                        batch.append(StreamResult(fl.item.tag, fl.gen, res.capture))
                        live -= 1
                        continue
                    again = reread(fl.item, res) if reread is not None else None
                    if again is None:
                        batch.append(StreamResult(fl.item.tag, res))
                        live -= 1
                        continue
                    spec = _reread_spec(again.spec)
                    self._validate_one(spec, f"reread of {fl.item.tag!r}", seen)
                    run.add(_Flight(fl.item, spec, gen=res), list(again.sequence),
                            reread_options, max_tokens=1, prompt_len=again.prompt_len)
                run.flush()
                if batch:
                    yield batch
        finally:
            run.close()

    def _validate_one(self, spec: RequestSpec | None, where: str, seen: dict) -> None:
        """One request's spec (``where`` names it in the error); a steering tuple shared by
        many requests is checked once per call (its vectors are the costly part: 288 requests
        steering 36 layers of 4096 floats took 17 s checked one by one)."""
        if spec is None:
            return
        try:
            if spec.steer and id(spec.steer) not in seen:
                validate_spec(RequestSpec(steer=spec.steer), num_layers=self.num_layers,
                              hidden_size=self.hidden_size)
                seen[id(spec.steer)] = spec.steer  # held: its id stays unique
            validate_spec(RequestSpec(capture=spec.capture), num_layers=self.num_layers,
                          hidden_size=self.hidden_size)
        except SpecError as exc:
            raise SpecError(f"{where}.{exc.field}", exc.message) from None
        self._check_path(spec, where)

    def _results(self, outs, specs, uids, per_rank) -> list[GenResult]:
        with self._readout(per_rank):
            return self._results_of(outs, specs, uids, per_rank)

    @contextmanager
    def _readout(self, per_rank: list[dict]):
        """One step's hook results (``steering_collect``, per rank) readable inside, released
        after: every request's results of the step are read inside one block, whoever reads
        them (:mod:`workers.engine.lanes` splits them between streams)."""
        from workers.engine.extension import fetch_ipc, unlink_shipped

        try:
            fetch_ipc(per_rank)  # the in-graph readout's device blocks, copied to the host
            yield
        finally:  # the means' /dev/shm files (large captures): mapped by now, or never needed
            unlink_shipped(d for res in per_rank for got in res.values() if got
                           for d in (got.get("means") or {}).values())

    def _results_of(self, outs, specs, uids, per_rank) -> list[GenResult]:
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
        full = [_reread_spec(s) for s in specs]
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


_END = object()


def _reread_spec(spec: RequestSpec | None) -> RequestSpec:
    """An exact re-read always captures (at least the prompt span: the hooks must fire)."""
    if spec is not None and spec.capture is not None:
        return spec
    return RequestSpec(steer=spec.steer if spec else (), capture=CaptureSpec(response=False),
                       key=spec.key if spec else None)


def _merge(per_rank: list[dict], got: list[dict] | None) -> None:
    for rank, res in enumerate(got or ()):
        if rank == len(per_rank):
            per_rank.append({})
        per_rank[rank].update(res)


@dataclass
class _Flight:
    """One request in vLLM: the sample it belongs to, its spec, and for a re-read the
    generation it re-reads."""

    item: StreamItem
    spec: RequestSpec | None
    gen: GenResult | None = None
    uid: str = ""


class _Run:
    """One run of requests through vLLM's ``LLMEngine`` (``add_request`` / ``step`` /
    ``abort_request``, the loop ``LLM.generate`` runs, in vLLM 0.26 and 0.32 alike).

    The extension's per-request state is reset when a run opens, which is only safe with
    nothing in flight: runs never overlap on one engine (a second is refused). Steering specs
    are registered by key before the first request that uses them (registration is additive);
    finished requests' results are collected from the workers once per step."""

    def __init__(self, engine: SteeringEngine, *, size: int):
        if engine._streaming:
            raise EngineError("a stream or generate call is still running on this engine; "
                              "close it before starting another")
        self.engine = engine
        self.vllm = engine._llm.llm_engine
        self.size = size  # the cap, reported with an out-of-memory error
        engine._calls += 1
        self.prefix = f"cs{engine._calls}-"
        self.n = 0
        self.flights: dict[str, _Flight] = {}  # request id (= uid) -> in vLLM or pending
        self.pending: list[tuple[str, dict, object]] = []
        self.register: dict[str, list[dict]] = {}
        self.registered: set[str] = set()
        self.keys: dict[int, tuple[tuple, str]] = {}  # id(spec.steer) -> (steer, key)
        self.collect_s = 0.0  # host seconds in steering_collect (bench: engine.last_timing)
        engine._rpc("steering_reset")
        engine._streaming = True

    def _key(self, spec: RequestSpec) -> str:
        hit = self.keys.get(id(spec.steer))
        if hit is None:
            hit = self.keys[id(spec.steer)] = (spec.steer, steer_key(spec))
        key = hit[1]
        if key not in self.registered and key not in self.register:
            self.register[key] = [op.to_wire() for op in spec.steer]
        return key

    def add(self, flight: _Flight, prompt, options: SamplingOptions, *,
            max_tokens: int | None = None, prompt_len: int | None = None) -> None:
        from vllm.sampling_params import RequestOutputKind

        uid = flight.uid = f"{self.prefix}{self.n}"
        self.n += 1
        spec = flight.spec
        item = {"prompt": prompt} if isinstance(prompt, str) else {
            "prompt_token_ids": [int(t) for t in prompt]}
        key = None
        if spec is not None and spec.steer:
            key = item["cache_salt"] = self._key(spec)
        params = self.engine._params(options, spec, uid, max_tokens, prompt_len, key)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: no partials
        self.pending.append((uid, item, params))
        self.flights[uid] = flight

    def flush(self) -> None:
        """Register new steering keys, then hand the pending requests to vLLM."""
        if self.register:
            self.engine._rpc("steering_register", self.register)
            self.registered.update(self.register)
            self.register = {}
        pending, self.pending = self.pending, []
        for k, (uid, item, params) in enumerate(pending):
            try:
                self.vllm.add_request(uid, item, params)
            except BaseException:
                for later, _, _ in pending[k:]:  # never reached vLLM: nothing to abort
                    self.flights.pop(later, None)
                raise

    def step(self) -> tuple[list[tuple[_Flight, object]], list[dict] | None]:
        """One engine step: the requests that finished in it, and their hook results per
        rank (None when none of them asked for steering or capture)."""
        if not self.vllm.has_unfinished_requests():
            raise EngineError(f"vLLM has no unfinished request while {len(self.flights)} of "
                              "this run's are in flight")
        try:
            outs = self.vllm.step()
        except Exception as exc:
            if gpu.is_oom(exc):
                raise EngineOOMError(f"out of memory with up to {self.size} samples in flight: "
                                     f"{exc}", batch_size=self.size,
                                     memory=_gpu_memory()) from exc
            raise
        finished = [(self.flights.pop(o.request_id), o) for o in outs
                    if o.finished and o.request_id in self.flights]
        act = [(fl, o) for fl, o in finished if fl.spec is not None and fl.spec.active]
        if not act:
            return finished, None
        # Positions each request forwarded: [0, P + generated - 1), the last sampled token is
        # never fed back (async scheduling may forward it once more; the worker drops that row)
        ends = {fl.uid: len(o.prompt_token_ids) + max(len(o.outputs[0].token_ids), 1) - 1
                for fl, o in act}
        t = time.perf_counter()
        got = self.engine._rpc("steering_collect", [fl.uid for fl, _ in act], ends)
        self.collect_s += time.perf_counter() - t
        return finished, got

    def abort(self, uids) -> None:
        """Abort some of this run's requests (one stream of a shared run ended early:
        :mod:`workers.engine.lanes`); the rest go on."""
        queued = {p[0] for p in self.pending}
        self.pending = [p for p in self.pending if p[0] not in uids]
        left = [uid for uid in uids if self.flights.pop(uid, None) is not None
                and uid not in queued]
        if left:
            self.vllm.abort_request(left)

    def close(self) -> None:
        """Abort what is still in vLLM (a run left early); the next run resets the rest."""
        self.engine._streaming = False
        left = [uid for uid in self.flights if uid not in {p[0] for p in self.pending}]
        self.flights.clear()
        self.pending = []
        if left:
            try:
                self.vllm.abort_request(left)
            except Exception:
                log.warning("aborting %d requests of an unfinished run failed", len(left),
                            exc_info=True)
        if self.engine.readout != "rpc":  # the in-graph readout's device blocks, all copied
            try:
                self.engine._rpc("steering_release_readout")
            except Exception:
                log.warning("releasing the run's readout blocks failed", exc_info=True)
