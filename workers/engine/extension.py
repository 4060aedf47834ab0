"""The vLLM worker extension: per-request steering and capture hooks inside the worker process.

vLLM mixes :class:`SteeringExtension` into its worker class (``worker_extension_cls``); the
engine calls its ``steering_*`` methods by name through ``LLM.collective_rpc``.

How a forward step runs:

1. A forward *pre*-hook on the top model builds a :class:`_Plan` once per step from host data
   (``runner.current_step``): which requests in the batch carry a spec, their row ranges and
   absolute positions, their compiled ops per layer, and for capture the (row → accumulator
   slot) index tensors per layer set. No active request → no plan, and every layer hook
   returns at once: an unsteered request costs a few dict lookups per step.
2. A forward hook on each decoder layer sees ``(delta, residual)``; the hidden state is
   ``residual + delta``. Steering rewrites ``delta`` in place for the request's rows
   (:mod:`.ops`), then capture gathers the (steered) rows and ``index_add_``\\ s them into fp32
   running sums on the device. Counts are known on the host. Nothing syncs with the device.
3. After ``generate`` the engine calls :meth:`steering_collect`: only then do the means cross
   to the CPU, and the request's slots are freed.

Every layer hook that fires is counted per request; an exception inside a hook is recorded on
the requests of that step (the engine raises it naming them) instead of killing the engine.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workers.engine import runner as rn
from workers.engine.contract import StreamProbe
from workers.engine.ops import CompiledOps
from workers.engine.spec import WIRE_KEY, RequestSpec, SteerOp

log = logging.getLogger(__name__)



@dataclass
class _Req:
    uid: str
    spec: RequestSpec
    ops: CompiledOps | None
    cap_layers: tuple[int, ...] = ()
    spans: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    covered: dict[str, list[int]] = field(default_factory=dict)
    steer_layers: frozenset[int] = frozenset()
    hook_layers: frozenset[int] = frozenset()  # steer ∪ capture layers: where hooks count
    hook_calls: int = 0
    errors: list[str] = field(default_factory=list)
    raw_rows: dict[int, list[torch.Tensor]] | None = None
    raw_positions: list[int] | None = None

    def plan_capture(self, cap, *, n_prompt: int, n_layers: int) -> None:
        """The layers and named token spans ``cap`` asks for (absolute positions; response
        runs to the end), the same on the eager and the in-graph path."""
        self.cap_layers = tuple(cap.layers) if cap.layers is not None else tuple(range(n_layers))
        if cap.prompt:
            self.spans["prompt"] = (0, n_prompt)
        if cap.response:
            self.spans["response"] = (n_prompt, None)
        if cap.last_prompt and n_prompt > 0:
            self.spans["last_prompt"] = (n_prompt - 1, n_prompt)
        for s in cap.spans:
            self.spans[s.name] = (s.start, s.end)


@dataclass
class _Plan:
    reqs: list[_Req]
    steer: dict[int, list[tuple[object, object]]]  # layer -> [(LayerOps, slice | index)]
    # layer -> [(rows, slots)]; rows is a slice when the group's rows are contiguous and in
    # order (a decode step where every request captures one row): no gather needed
    capture: dict[int, list[tuple[slice | torch.Tensor, torch.Tensor]]]
    raw: dict[int, list[tuple[_Req, int, int]]]  # layer -> [(req, row0, row1)]
    fired: dict[int, int] = field(default_factory=dict)  # layer -> hook calls this step


class _State:
    """All per-worker steering state; one attribute on the worker (no name clashes)."""

    def __init__(self, worker):
        self.runner = worker.model_runner
        self.rank = int(getattr(worker, "rank", 0) or 0)
        self.kind = rn.check_runner(self.runner)
        self.layers = rn.decoder_layers(self.runner)
        self.device = rn.device_of(self.runner)
        self.hidden = int(self.runner.model_config.get_hidden_size())
        self.seen: dict[str, _Req | None] = {}
        self.by_uid: dict[str, _Req] = {}
        self.compiled: dict[str, CompiledOps] = {}
        self.acc: torch.Tensor | None = None  # (num_layers, capacity, hidden) fp32 sums
        self.acc_layers: list[torch.Tensor] = []  # acc's per-layer views, made once
        self.free: list[int] = []
        self.plan: _Plan | None = None
        self.handles: list = []
        self.global_errors: list[str] = []
        self.probe: StreamProbe | None = None

    # ---- request registry -------------------------------------------------------------
    def lookup(self, req_id: str) -> _Req | None:
        if req_id in self.seen:
            return self.seen[req_id]
        info = rn.request_info(self.runner, req_id)
        wire = (info.extra_args or {}).get(WIRE_KEY)
        req = None
        if wire:
            try:
                req = self._new_req(wire, int(wire.get("prompt_len") or info.num_prompt_tokens))
            except Exception as exc:  # noqa: BLE001 - a bad spec fails its request, not vLLM
                req = _Req(uid=str(wire.get("uid")), spec=RequestSpec(), ops=None,
                           errors=[_describe("spec", exc)])
                self.by_uid[req.uid] = req
        self.seen[req_id] = req
        return req

    def _new_req(self, wire: dict, n_prompt: int) -> _Req:
        spec = RequestSpec.from_wire(wire["spec"])
        ops = None
        key = wire.get("steer_key")
        if key is not None:  # registered once per generate call (steering_register)
            ops = self.compiled[key]
        elif spec.steer:  # inline vectors: direct use without the engine
            ops = CompiledOps.compile(spec.steer, device=self.device)
        req = _Req(uid=wire["uid"], spec=spec, ops=ops,
                   steer_layers=ops.layers if ops else frozenset())
        cap = spec.capture
        if cap is not None:
            req.plan_capture(cap, n_prompt=n_prompt, n_layers=len(self.layers))
            for name in req.spans:
                req.slots[name] = self._alloc_slot()
                req.counts[name] = 0
            if cap.raw:
                req.raw_rows = {layer: [] for layer in req.cap_layers}
                req.raw_positions = []
        req.hook_layers = req.steer_layers.union(req.cap_layers)
        self.by_uid[req.uid] = req
        return req

    def _alloc_slot(self) -> int:
        if not self.free:
            old = 0 if self.acc is None else self.acc.shape[1]
            cap = max(64, 2 * old)
            acc = torch.zeros(len(self.layers), cap, self.hidden, dtype=torch.float32,
                              device=self.device)
            if self.acc is not None:
                acc[:, :old].copy_(self.acc)
            self.acc = acc
            self.acc_layers = list(acc.unbind(0))
            self.free = list(range(cap - 1, old - 1, -1))
        slot = self.free.pop()
        self.acc[:, slot].zero_()
        return slot

    def release(self, req: _Req) -> None:
        self.free.extend(req.slots.values())
        req.slots = {}
        self.by_uid.pop(req.uid, None)

    # ---- per-step plan ----------------------------------------------------------------
    def finish_step(self) -> None:
        plan, self.plan = self.plan, None
        if plan is None:
            return
        per_set: dict[frozenset[int], int] = {}  # requests share a few layer sets
        for req in plan.reqs:
            n = per_set.get(req.hook_layers)
            if n is None:
                n = per_set[req.hook_layers] = sum(plan.fired.get(layer, 0)
                                                   for layer in req.hook_layers)
            req.hook_calls += n

    def build_plan(self) -> None:
        self.finish_step()
        step = rn.current_step(self.runner)
        if step is None:
            return
        try:
            self._build_plan(step)
        except Exception as exc:  # noqa: BLE001 - recorded on the step's requests
            self.plan = None
            for rid in step.req_ids:
                req = self.seen.get(rid)
                if req is not None:
                    req.errors.append(_describe("step plan", exc))

    def _build_plan(self, step: rn.StepView) -> None:
        active = []
        for i, rid in enumerate(step.req_ids):
            req = self.lookup(rid)
            if req is not None:
                active.append((req, step.row_starts[i], step.row_ends[i], step.pos_starts[i]))
        if not active:
            return
        self.plan = self._compile_plan(active)

    def _compile_plan(self, active) -> _Plan:
        steer_groups: dict[int, tuple[object, list[list[int]]]] = {}
        cap_groups: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        raw: dict[int, list] = {}
        for req, r0, r1, p0 in active:
            if r1 <= r0:
                continue
            if req.ops is not None:
                _, ranges = steer_groups.setdefault(id(req.ops), (req.ops, []))
                if ranges and ranges[-1][1] == r0:
                    ranges[-1][1] = r1
                else:
                    ranges.append([r0, r1])
            if req.cap_layers:
                rows, slots = cap_groups.setdefault(req.cap_layers, ([], []))
                p1 = p0 + (r1 - r0)
                for name, (a, b) in req.spans.items():
                    lo, hi = max(a, p0), p1 if b is None else min(b, p1)
                    if hi <= lo:
                        continue
                    rows.append(np.arange(r0 + lo - p0, r0 + hi - p0))
                    slots.append(np.full(hi - lo, req.slots[name]))
                    req.counts[name] += hi - lo
                    cov = req.covered.setdefault(name, [lo, hi])
                    cov[0], cov[1] = min(cov[0], lo), max(cov[1], hi)
                if req.raw_rows is not None:
                    req.raw_positions.extend(range(p0, p1))
                    for layer in req.cap_layers:
                        raw.setdefault(layer, []).append((req, r0, r1))
        steer: dict[int, list] = {}
        for ops, ranges in steer_groups.values():
            if len(ranges) == 1:
                where = slice(*ranges[0])
            else:
                where = self._to_device(np.concatenate([np.arange(a, b) for a, b in ranges]))
            for layer, layer_ops in ops.by_layer.items():
                steer.setdefault(layer, []).append((layer_ops, where))
        capture: dict[int, list] = {}
        for layers, (rows, slots) in cap_groups.items():
            if not rows:
                continue
            rows = np.concatenate(rows)  # never empty: spans without rows were skipped
            if bool((np.diff(rows) == 1).all()):  # contiguous and in order
                where: slice | torch.Tensor = slice(int(rows[0]), int(rows[-1]) + 1)
            else:
                where = self._to_device(rows)
            pair = (where, self._to_device(np.concatenate(slots)))
            for layer in layers:
                capture.setdefault(layer, []).append(pair)
        return _Plan(reqs=[a[0] for a in active], steer=steer, capture=capture, raw=raw)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr.astype(np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    # ---- hooks ------------------------------------------------------------------------
    def on_layer(self, layer: int, output) -> None:
        plan = self.plan
        if plan is None:
            return
        plan.fired[layer] = plan.fired.get(layer, 0) + 1
        try:
            if not (isinstance(output, tuple) and len(output) == 2
                    and isinstance(output[1], torch.Tensor)):
                raise TypeError(f"decoder layer {layer} ({type(self.layers[layer]).__name__}) "
                                "did not return a (delta, residual) tuple")
            delta, residual = output
            # Eager mode launches every op from the host: each one here costs throughput, so
            # the common cases take the fewest (one add_ for add-only steering on a slice; no
            # gathers for a capture of contiguous rows).
            for layer_ops, where in plan.steer.get(layer, ()):
                if isinstance(where, slice):
                    layer_ops.apply_(delta[where], residual[where])
                elif layer_ops.add_sum is not None:  # add-only: needs no residual
                    rows = delta.index_select(0, where)
                    layer_ops.apply_(rows)
                    delta.index_copy_(0, where, rows)
                else:
                    delta.index_copy_(0, where, layer_ops.apply(delta[where], residual[where]))
            for rows, slots in plan.capture.get(layer, ()):
                if isinstance(rows, slice):
                    # copy=True: for an fp32 model .float() would be delta itself
                    h = delta[rows].to(torch.float32, copy=True).add_(residual[rows])
                else:
                    h = delta.index_select(0, rows).float().add_(residual.index_select(0, rows))
                self.acc_layers[layer].index_add_(0, slots, h)
            for req, r0, r1 in plan.raw.get(layer, ()):
                req.raw_rows[layer].append(delta[r0:r1].float() + residual[r0:r1].float())
        except Exception as exc:  # noqa: BLE001 - recorded and raised by the engine
            msg = _describe(f"layer {layer}", exc)
            for req in plan.reqs:
                if not req.errors:
                    req.errors.append(msg)
            self.plan = None

    def collect(self, req: _Req, parts: list[tuple[torch.Tensor, int]]) -> dict:
        """One request's result; its means are indices into ``parts`` (``(sum, rows)`` on the
        host), shipped by :meth:`SteeringExtension.steering_collect` in one go."""
        out = {"hook_calls": req.hook_calls, "errors": list(req.errors)}
        if req.spec.capture is not None and self.rank == 0:
            layers = list(req.cap_layers)
            idx = torch.tensor(layers, device=self.device)
            means, counts, positions = {}, {}, {}
            for name, slot in req.slots.items():
                n = req.counts[name]
                counts[name] = n
                if n == 0:
                    continue
                means[name] = len(parts)
                parts.append((self.acc[idx, slot].cpu(), n))
                positions[name] = tuple(req.covered[name])
            out.update(layers=layers, means=means, counts=counts, positions=positions)
            if req.raw_rows is not None:
                per_layer = [torch.cat(req.raw_rows[layer]) if req.raw_rows[layer] else
                             torch.zeros(0, self.hidden) for layer in layers]
                out["raw"] = pack(torch.stack(per_layer, dim=1).cpu())
                out["raw_positions"] = list(req.raw_positions)
        self.release(req)
        return out


def _describe(where: str, exc: BaseException) -> str:
    return f"{where}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"


def pack(t: torch.Tensor) -> dict:
    """An fp32 CPU tensor as plain bytes: what survives vLLM's RPC serialisation intact."""
    return {"shape": list(t.shape), "data": t.contiguous().float().numpy().tobytes()}


def unpack(d: dict) -> torch.Tensor:
    """A tensor from :func:`pack` bytes, a copy-on-write view of a :func:`ship` file, or a
    host copy :func:`fetch_ipc` made."""
    if "tensor" in d:
        return d["tensor"]
    if "shm" in d:
        arr = np.memmap(d["shm"], dtype=np.float32, mode="c", offset=int(d["offset"]),
                        shape=tuple(d["shape"]))
        return torch.from_numpy(arr)
    return torch.frombuffer(bytearray(d["data"]), dtype=torch.float32).reshape(d["shape"])


SHM_DIR = Path("/dev/shm")
# Off by default (CHATSPACE_ENGINE_SHIP_MIN_BYTES sets a size from which a batch goes through
# a file): on the lent H200 host, writing the file cost 8.5 s for 679 MB (2319Z run in
# bench/results) against 0.7 s for the same means as RPC bytes (2200Z run).
SHM_MIN_BYTES = 1 << 62
_shipped: list[Path] = []  # this worker's files; any the engine left behind go at the next reset


def ship(parts: list[tuple[torch.Tensor, int]]) -> list[dict]:
    """Means for the engine's process: each ``(sum, n)`` as ``sum / n`` in fp32, in order.

    By default every batch goes inline as :func:`pack` bytes through vLLM's RPC. With
    ``CHATSPACE_ENGINE_SHIP_MIN_BYTES`` set, a batch at least that large goes through one file
    in ``/dev/shm`` that the engine maps and then deletes (:func:`unpack`,
    :func:`unlink_shipped`), meant to spare the RPC's copies (1.5 s for the 510 MB of 288
    all-layer captures of an 8B model on an H200); on that host the file was slower still
    (see :data:`SHM_MIN_BYTES`), so it stays opt-in. A ``/dev/shm`` without room goes inline.
    """
    sizes = [int(t.numel()) for t, _ in parts]
    total = 4 * sum(sizes)
    path = None
    least = int(os.environ.get("CHATSPACE_ENGINE_SHIP_MIN_BYTES", SHM_MIN_BYTES))
    if total >= least and SHM_DIR.is_dir():
        try:
            st = os.statvfs(SHM_DIR)
            if st.f_bavail * st.f_frsize > 2 * total:
                path = SHM_DIR / f"chatspace-{os.getpid()}-{uuid.uuid4().hex[:12]}.f32"
        except OSError:
            path = None
    if path is None:
        return [pack(t / n) for t, n in parts]
    buf = np.memmap(path, dtype=np.float32, mode="w+", shape=(sum(sizes),))
    _shipped.append(path)
    flat = torch.from_numpy(buf)
    out, off = [], 0
    for (t, n), size in zip(parts, sizes):
        view = flat[off:off + size].view(t.shape)
        torch.div(t.float(), n, out=view)
        out.append({"shape": list(t.shape), "shm": str(path), "offset": 4 * off})
        off += size
    buf.flush()
    del flat, buf
    return out


# Device blocks of means handed to the engine's process by CUDA IPC (:func:`ship_ipc`): the
# engine copies each to the host before its next step, so the last two suffice (torch's IPC
# ref-counting keeps a block the engine still maps alive past its eviction here anyway).
_exported: deque = deque(maxlen=2)


def ship_ipc(parts: list[tuple[torch.Tensor, int]]) -> list[dict]:
    """:func:`ship` for sums on a CUDA device: the means are divided on the device into one
    fp32 block, and what crosses vLLM's RPC is the block's CUDA IPC handle (a few hundred
    bytes) instead of its bytes; the engine's process maps it and makes the one device -> host
    copy (:func:`fetch_ipc`). Measured cost of the bytes path: 1.5 s per 510 MB (288 all-layer
    captures of an 8B model, H200, bench/results 2200Z)."""
    from torch.multiprocessing.reductions import reduce_tensor

    # Blocks the engine already copied and released sit in torch's IPC "limbo" (still
    # allocated) until collected; left alone they pile up step after step until an allocation
    # fails, and the worker's memory reads above its warm baseline after a job.
    torch.cuda.ipc_collect()
    sizes = [int(t.numel()) for t, _ in parts]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=parts[0][0].device)
    out, off = [], 0
    for (t, n), size in zip(parts, sizes):
        torch.div(t.float(), n, out=flat[off:off + size].view(t.shape))
        out.append({"shape": list(t.shape), "offset": off})
        off += size
    _exported.append(flat)
    _, args = reduce_tensor(flat)
    (_, size, stride, toff, _, _, device, handle, ssize, soff, _, rc_handle, rc_off, event,
     event_sync) = args
    block = {"size": list(size), "stride": list(stride), "offset": int(toff),
             "device": int(device), "handle": bytes(handle), "storage_size": int(ssize),
             "storage_offset": int(soff), "ref_handle": bytes(rc_handle),
             "ref_offset": int(rc_off), "event": None if event is None else bytes(event),
             "event_sync": bool(event_sync)}
    for d in out:
        d["ipc"] = block
    return out


def release_exported() -> None:
    """Free the blocks :func:`ship_ipc` handed out (a run ended: the engine copied them all),
    and what torch's IPC limbo holds for them, so nothing of a run outlives it on the GPU."""
    _exported.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.ipc_collect()


def fetch_ipc(per_rank: list[dict]) -> None:
    """The engine's side of :func:`ship_ipc`: every mean descriptor with an IPC block becomes
    inline host data (``{"tensor": ...}``, read by :func:`unpack`); each block is mapped and
    copied to the host once."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    hosts: dict[bytes, torch.Tensor] = {}
    for res in per_rank:
        for got in res.values():
            for name, d in ((got or {}).get("means") or {}).items():
                if not (isinstance(d, dict) and "ipc" in d):
                    continue
                b = d["ipc"]
                key = bytes(b["handle"]) + int(b["storage_offset"]).to_bytes(8, "little")
                host = hosts.get(key)
                if host is None:
                    dev = rebuild_cuda_tensor(
                        torch.Tensor, tuple(b["size"]), tuple(b["stride"]), int(b["offset"]),
                        torch.storage.TypedStorage, torch.float32, int(b["device"]),
                        bytes(b["handle"]), int(b["storage_size"]), int(b["storage_offset"]),
                        False, bytes(b["ref_handle"]), int(b["ref_offset"]),
                        None if b["event"] is None else bytes(b["event"]), bool(b["event_sync"]))
                    host = hosts[key] = _host_copy(dev)
                    del dev  # unmapped: the worker may reuse the block
                size = int(np.prod(d["shape"]))
                got["means"][name] = {"tensor": host[d["offset"]:d["offset"] + size]
                                      .view(tuple(d["shape"]))}


def _host_copy(dev: torch.Tensor) -> torch.Tensor:
    """``dev`` on the host, copied into page-locked memory: a DMA copy at full bus speed
    (pageable memory goes through a staging buffer; measured on an H200 host: 0.39 s of host
    time per 510 MB at collect, most of what capture still cost against plain compiled vLLM).
    Page-locked blocks come from torch's caching host allocator, so a block freed with its
    last mean is reused by a later step instead of being locked again."""
    try:
        host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
    except RuntimeError:  # no page-locked memory to be had: pageable, slower
        return dev.cpu()
    host.copy_(dev)
    return host


def unlink_shipped(descriptors) -> None:
    """The engine's side, once it mapped every result: delete the files (the mappings stay)."""
    for path in {d["shm"] for d in descriptors if isinstance(d, dict) and "shm" in d}:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def sweep_shipped() -> None:
    """The worker's side, between calls: delete files an engine never took (it died)."""
    while _shipped:
        path = _shipped.pop()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _returns_residual(layer: torch.nn.Module) -> bool:
    try:
        return "residual" in inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return False


class SteeringExtension:
    """Mixed into vLLM's worker; every public name is prefixed ``steering_``."""

    def steering_install(self) -> dict:
        """Check the runner and model, register the hooks; returns what the engine needs."""
        state = getattr(self, "_chatspace", None)
        if state is None:
            state = _State(self)
            bad = [type(layer).__name__ for layer in state.layers if not _returns_residual(layer)]
            if bad:
                model = type(rn.top_model(state.runner)).__name__
                raise rn.UnsupportedRunner(
                    f"model {model}: decoder layer {bad[0]} does not take/return a residual "
                    "stream ((delta, residual) tuple), so steering and capture cannot hook it")
            self._chatspace = state
            self.steering_hooks(True)
        classes = list(dict.fromkeys(type(layer).__name__ for layer in state.layers))
        return {"runner_kind": state.kind, "num_layers": len(state.layers),
                "hidden_size": state.hidden, "device": str(state.device),
                "layer_class": classes[0], "layer_classes": classes,
                "model_class": type(rn.top_model(state.runner)).__name__}

    def steering_stream_check(self, enabled: bool) -> dict | None:
        """Arm (True) or disarm (False) the stream-contract probe (:mod:`.contract`) around
        the engine's self-test; disarming returns what it measured."""
        state: _State = self._chatspace
        if state.probe is not None:
            report = state.probe.remove()
            state.probe = None
        else:
            report = None
        if enabled:
            state.probe = StreamProbe(state.layers, rn.final_norm(state.runner))
            return None
        return report

    def steering_hooks(self, enabled: bool) -> int:
        """(Un)register the hooks; returns how many are registered. Used by tests to prove
        that missing hooks are detected."""
        state: _State = self._chatspace
        for h in state.handles:
            h.remove()
        state.handles = []
        if enabled:
            top = rn.top_model(state.runner)
            state.handles.append(top.register_forward_pre_hook(lambda m, a: state.build_plan()))
            for i, layer in enumerate(state.layers):
                state.handles.append(layer.register_forward_hook(
                    lambda m, a, out, _i=i: state.on_layer(_i, out)))
        return len(state.handles)

    def steering_register(self, steer: dict[str, list[dict]]) -> None:
        """Compile each distinct steering spec once (by key); requests then carry only the
        key, not hidden-size vectors per request and per layer."""
        state: _State = self._chatspace
        if len(state.compiled) > 1024:
            state.compiled.clear()
        for key, ops in steer.items():
            if key not in state.compiled:
                state.compiled[key] = CompiledOps.compile(
                    [SteerOp.from_wire(o) for o in ops], device=state.device)

    def steering_release_readout(self) -> None:
        """A run ended: free the captures' device blocks it handed out (:func:`ship_ipc`)."""
        release_exported()

    def steering_reset(self) -> None:
        """Forget every request (called before each generate: nothing is in flight then)."""
        release_exported()
        sweep_shipped()
        state: _State = self._chatspace
        state.plan = None
        for req in list(state.by_uid.values()):
            state.release(req)
        state.seen.clear()

    def steering_collect(self, uids: list[str],
                         ends: dict[str, int] | None = None) -> dict[str, dict]:
        """Results of finished requests by uid; frees their device slots. ``ends`` (positions
        each request forwarded) matters only under async scheduling, which this path refuses."""
        state: _State = self._chatspace
        state.finish_step()
        out = {}
        parts: list[tuple[torch.Tensor, int]] = []
        for uid in uids:
            req = state.by_uid.get(uid)
            out[uid] = state.collect(req, parts) if req is not None else None
        if parts:
            shipped = ship(parts)
            for res in out.values():
                if res is not None and "means" in res:
                    res["means"] = {k: shipped[i] for k, i in res["means"].items()}
        return out
