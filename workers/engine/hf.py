"""The transformers reference backend: the engine's spec semantics without vLLM.

Parity tests compare the vLLM engine against this; machines without vLLM can run jobs on it.
It drives generation itself (prefill, then one token per step with a KV cache) so it knows
exactly which positions every forward pass holds, and applies the same ops (``ops.py``) and
the same span definitions as the vLLM hooks:

- the hidden state of layer i is the decoder layer's output (``output_hidden_states[i+1]``
  for i < L−1; HF's last entry has the final norm applied, so the hooks are the truth);
- a layer's steering runs first, capture then reads the steered state;
- ``prompt`` = mean over ``[0, P)``, ``response`` = mean over the generated positions that
  were forwarded, ``[P, P+n_gen−1)`` (the last sampled token is never forwarded, as in vLLM),
  ``last_prompt`` = position ``P−1``, named spans = their ``[start, end)`` ∩ forwarded;
- a span that covered no position is absent from ``Capture.means``/``positions`` and has
  count 0;
- ``hook_calls`` counts (layer, forward pass) pairs in which the request had steering or
  capture at that layer.

Batches are left-padded; rows of finished requests are neither steered nor captured.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.engine.ops import CompiledOps
from workers.engine.spec import (
    Capture,
    GenResult,
    RequestSpec,
    SamplingOptions,
    SpecError,
    StreamItem,
    StreamResult,
    as_specs,
    validate_specs,
)
from workers.engine.stream import RereadFn, sequential_stream

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class _Req:
    """One request's hook state for the batch it is in."""

    spec: RequestSpec | None
    ops: CompiledOps | None
    prompt_len: int
    resp_len: int | None = None  # exact mode: the response is [P, P+resp_len)
    layer_index: dict[int, int] = field(default_factory=dict)  # captured layer -> row in sums
    spans: list[tuple[str, int, float]] = field(default_factory=list)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    covered: dict[str, list[int]] = field(default_factory=dict)
    raw_chunks: list[torch.Tensor] = field(default_factory=list)  # (n, nL, H) per step
    raw_positions: list[int] = field(default_factory=list)
    raw_token_ids: list[int] = field(default_factory=list)
    hook_calls: int = 0
    # what the current forward pass holds for this request (None = not in it)
    col0: int = 0
    pos0: int = 0
    n: int = 0
    active: bool = False
    step_raw: list[torch.Tensor | None] = field(default_factory=list)

    def touches(self, layer: int) -> bool:
        return (self.ops is not None and self.ops.for_layer(layer) is not None) or \
            layer in self.layer_index


class HFBackend:
    """A transformers causal LM with per-request steering and capture.

    ``dtype`` is a name (``float32``, ``bfloat16``, ``float16``) or a torch dtype.
    """

    def __init__(self, model_path: str | Path, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", attn_implementation: str = "eager"):
        """``attn_implementation``: "eager" (the default) is plain matmul-softmax attention,
        the reference's job. On CUDA, SDPA with a left-padding mask gave the last token of
        every sequence a different state (an H200, fp32: ~100 % off at layer 0, every other
        position within 1e-6 of vLLM)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype: unknown {dtype!r}; use one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=dtype, attn_implementation=attn_implementation)
        self.model.to(self.device).eval()
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"model: {model_path} has no model.layers to hook")
        self.layers = layers
        self.num_layers = len(layers)
        self.hidden_size = int(self.model.config.get_text_config().hidden_size)
        self._reqs: list[_Req | None] = []
        self._handles = [layer.register_forward_hook(self._hook_for(i))
                         for i, layer in enumerate(layers)]
        eos = {self.tokenizer.eos_token_id, *_as_list(self.model.generation_config.eos_token_id)}
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else min(self.eos_ids, default=0)

    # -- hooks -------------------------------------------------------------------------------

    def _hook_for(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            reqs = [(b, r) for b, r in enumerate(self._reqs)
                    if r is not None and r.active and r.touches(layer)]
            if not reqs:
                return None
            h = h.clone()
            for b, r in reqs:
                r.hook_calls += 1
                cols = slice(r.col0, r.col0 + r.n)
                lops = r.ops.for_layer(layer) if r.ops is not None else None
                if lops is not None:
                    h[b, cols] = lops.apply(h[b, cols])
                j = r.layer_index.get(layer)
                if j is not None:
                    self._capture_rows(r, j, h[b, cols].float())
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return hook

    @staticmethod
    def _capture_rows(r: _Req, j: int, rows: torch.Tensor) -> None:
        for name, start, end in r.spans:
            a, b = max(start, r.pos0), min(end, r.pos0 + r.n)
            if a < b:
                r.sums[name][j] += rows[a - r.pos0:b - r.pos0].sum(0)
        if r.step_raw:
            r.step_raw[j] = rows.clone()

    # -- request bookkeeping -----------------------------------------------------------------

    def _validate(self, specs: list[RequestSpec | None]) -> None:
        validate_specs(specs, num_layers=self.num_layers, hidden_size=self.hidden_size)

    def _new_req(self, spec: RequestSpec | None, prompt_len: int,
                 resp_len: int | None = None) -> _Req:
        ops = CompiledOps.compile(spec.steer, device=self.device) if spec and spec.steer else None
        r = _Req(spec=spec, ops=ops, prompt_len=prompt_len, resp_len=resp_len)
        cap = spec.capture if spec else None
        if cap is None:
            return r
        layers = list(cap.layers) if cap.layers is not None else list(range(self.num_layers))
        r.layer_index = {layer: j for j, layer in enumerate(layers)}
        inf = float("inf")
        resp_end = inf if resp_len is None else prompt_len + resp_len
        if cap.prompt:
            r.spans.append(("prompt", 0, prompt_len))
        if cap.response:
            r.spans.append(("response", prompt_len, resp_end))
        if cap.last_prompt:
            r.spans.append(("last_prompt", prompt_len - 1, prompt_len))
        r.spans += [(s.name, s.start, inf if s.end is None else s.end) for s in cap.spans]
        for name, _, _ in r.spans:
            r.sums[name] = torch.zeros(len(layers), self.hidden_size, dtype=torch.float32,
                                       device=self.device)
            r.counts[name] = 0
        return r

    def _begin_step(self, r: _Req, *, col0: int, pos0: int, token_ids: list[int]) -> None:
        """Record what this forward pass holds for ``r``; span counts are host arithmetic."""
        r.active, r.col0, r.pos0, r.n = True, col0, pos0, len(token_ids)
        for name, start, end in r.spans:
            a, b = max(start, pos0), min(end, pos0 + r.n)
            if a < b:
                r.counts[name] += b - a
                cov = r.covered.setdefault(name, [a, b])
                cov[0], cov[1] = min(cov[0], a), max(cov[1], b)
        cap = r.spec.capture if r.spec else None
        if cap is not None and cap.raw:
            r.step_raw = [None] * len(r.layer_index)
            r.raw_positions += list(range(pos0, pos0 + r.n))
            r.raw_token_ids += list(token_ids)

    def _end_step(self, r: _Req) -> None:
        if r.step_raw:
            r.raw_chunks.append(torch.stack(r.step_raw, dim=1))
            r.step_raw = []
        r.active = False

    def _finish(self, r: _Req) -> Capture | None:
        if r.spec is None or r.spec.capture is None:
            return None
        means = {name: (r.sums[name] / r.counts[name]).cpu() for name in r.sums
                 if r.counts[name] > 0}
        raw = torch.cat(r.raw_chunks).cpu() if r.raw_chunks else None
        return Capture(layers=sorted(r.layer_index, key=r.layer_index.get), means=means,
                       counts=dict(r.counts),
                       positions={k: (v[0], v[1]) for k, v in r.covered.items()},
                       raw=raw, raw_positions=r.raw_positions if raw is not None else None,
                       raw_token_ids=r.raw_token_ids if raw is not None else None)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def _forward(self, reqs: list[_Req], ids: list[list[int]], *, decode_pos: list[int] | None,
                 attn: torch.Tensor, cache):
        """One forward pass over left-padded ``ids`` (prefill when ``decode_pos`` is None)."""
        width = max(len(x) for x in ids)
        batch = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        for b, (r, row) in enumerate(zip(reqs, ids)):
            batch[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
            if r is not None:
                pos0 = 0 if decode_pos is None else decode_pos[b]
                self._begin_step(r, col0=width - len(row), pos0=pos0, token_ids=row)
        if decode_pos is None:
            positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.tensor(decode_pos, dtype=torch.long).unsqueeze(1)
        self._reqs = reqs
        try:
            out = self.model(input_ids=batch.to(self.device), attention_mask=attn.to(self.device),
                             position_ids=positions.to(self.device), past_key_values=cache,
                             use_cache=cache is not None)
        finally:
            self._reqs = []
            for r in reqs:
                if r is not None:
                    self._end_step(r)
        return out

    # -- public API --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Sequence[int]], options: SamplingOptions,
                 specs: RequestSpec | Sequence[RequestSpec | None] | None = None, *,
                 batch_size: int | None = None) -> list[GenResult]:
        """Generate for every prompt, each with its own spec (or none); batched with left
        padding, ``batch_size`` prompts at a time (all at once by default)."""
        specs = as_specs(specs, len(prompts))
        self._validate(specs)
        if options.max_tokens < 1:
            raise SpecError("options.max_tokens", "must be at least 1")
        if options.choices:
            raise SpecError("options.choices", "the transformers backend cannot restrict a "
                            "reply to choices; use the vLLM engine")
        encoded = [self._encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise SpecError(f"prompts[{i}]", "empty prompt")
        step = batch_size or len(prompts) or 1
        results: list[GenResult] = []
        for lo in range(0, len(prompts), step):
            results += self._generate_batch(encoded[lo:lo + step], specs[lo:lo + step], options)
        return results

    def _sample(self, logits: torch.Tensor, options: SamplingOptions,
                gens: list[torch.Generator | None]) -> list[int]:
        if options.temperature <= 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits.float() / options.temperature, dim=-1)
        if options.top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > options.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return [int(torch.multinomial(probs[b].cpu(), 1, generator=gens[b]))
                for b in range(probs.shape[0])]

    def _generate_batch(self, encoded: list[list[int]], specs: list[RequestSpec | None],
                        options: SamplingOptions) -> list[GenResult]:
        from transformers import DynamicCache

        reqs = [self._new_req(s, len(ids)) if s is not None and s.active else None
                for s, ids in zip(specs, encoded)]
        width = max(len(x) for x in encoded)
        attn = torch.zeros(len(encoded), width, dtype=torch.long)
        for b, ids in enumerate(encoded):
            attn[b, width - len(ids):] = 1
        gens = [None if options.seed is None else torch.Generator().manual_seed(options.seed + b)
                for b in range(len(encoded))]
        stops = set(options.stop_token_ids) | (set() if options.ignore_eos else self.eos_ids)
        out_ids: list[list[int]] = [[] for _ in encoded]
        finish: list[str | None] = [None] * len(encoded)
        cache = DynamicCache(config=self.model.config)
        out = self._forward(reqs, encoded, decode_pos=None, attn=attn, cache=cache)
        while True:
            tokens = self._sample(out.logits[:, -1], options, gens)
            for b, tok in enumerate(tokens):
                if finish[b] is not None:
                    continue
                out_ids[b].append(tok)
                if tok in stops:
                    finish[b] = "stop"
                elif len(out_ids[b]) >= options.max_tokens:
                    finish[b] = "length"
            if all(f is not None for f in finish):
                break
            live = [None if finish[b] is not None else r for b, r in enumerate(reqs)]
            step_ids = [[out_ids[b][-1]] if finish[b] is None else [self.pad_id]
                        for b in range(len(encoded))]
            decode_pos = [len(encoded[b]) + len(out_ids[b]) - 1 for b in range(len(encoded))]
            attn = torch.cat([attn, torch.tensor([[int(f is None)] for f in finish])], dim=1)
            out = self._forward(live, step_ids, decode_pos=decode_pos, attn=attn, cache=cache)
        return [GenResult(key=s.key if s else None, prompt_token_ids=list(ids),
                          token_ids=out_ids[b],
                          text=self.tokenizer.decode(out_ids[b], skip_special_tokens=True)
                          if options.detokenize else "",
                          finish_reason=finish[b],
                          capture=self._finish(reqs[b]) if reqs[b] is not None else None,
                          hook_calls=reqs[b].hook_calls if reqs[b] is not None else 0)
                for b, (s, ids) in enumerate(zip(specs, encoded))]

    @torch.no_grad()
    def capture(self, sequences: Sequence[Sequence[int]], specs: RequestSpec | Sequence[RequestSpec],
                *, prompt_lens: Sequence[int] | None = None,
                batch_size: int | None = None) -> list[Capture]:
        """Exact mode: one forward pass over each finished sequence, spans averaged.

        With ``prompt_lens`` the ``response`` span is every position after the prompt,
        ``[P, len)`` (the persona pipelines' definition); without, the whole sequence is the
        prompt and only named spans cover anything else.
        """
        specs = as_specs(specs, len(sequences))
        for i, s in enumerate(specs):
            if s is None or s.capture is None:
                raise SpecError(f"specs[{i}].capture", "capture mode needs a capture spec")
        self._validate(specs)
        seqs = [[int(t) for t in s] for s in sequences]
        lens = list(prompt_lens) if prompt_lens is not None else [len(s) for s in seqs]
        if len(lens) != len(seqs):
            raise SpecError("prompt_lens", f"{len(lens)} lengths for {len(seqs)} sequences")
        for i, (p, s) in enumerate(zip(lens, seqs)):
            if not 1 <= p <= len(s):
                raise SpecError(f"prompt_lens[{i}]", f"{p} not in 1..{len(s)}")
        step = batch_size or len(seqs) or 1
        captures: list[Capture] = []
        for lo in range(0, len(seqs), step):
            chunk = seqs[lo:lo + step]
            reqs = [self._new_req(s, p, len(q) - p)
                    for s, p, q in zip(specs[lo:lo + step], lens[lo:lo + step], chunk)]
            width = max(len(x) for x in chunk)
            attn = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, ids in enumerate(chunk):
                attn[b, width - len(ids):] = 1
            self._forward(reqs, chunk, decode_pos=None, attn=attn, cache=None)
            captures += [self._finish(r) for r in reqs]
        return captures

    def stream(self, items: Iterable[StreamItem], options: SamplingOptions, *,
               reread: RereadFn | None = None,
               max_in_flight: int | None = None) -> Iterator[list[StreamResult]]:
        """:meth:`Engine.stream` one chunk of ``max_in_flight`` samples after the other
        (:func:`~workers.engine.stream.sequential_stream`): this backend batches by hand."""
        return sequential_stream(self, items, options, reread=reread,
                                 max_in_flight=max_in_flight)

    def close(self) -> None:
        """Remove the hooks (the model stays usable without them)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def shutdown(self) -> None:
        """The :class:`~workers.engine.protocol.Engine` end of life the worker's runtime calls:
        remove the hooks and drop the weights (nothing runs in another process here)."""
        self.close()
        self.model = None
        gc.collect()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The parity metric: max|got − ref| / max|ref| (the GPU parity checks and report)."""
    return float((got.float() - ref.float()).abs().max()
                 / ref.float().abs().max().clamp_min(1e-6))


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
