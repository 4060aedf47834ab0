"""Capture and rollout, one persona (one job item) at a time: prompts → engine → store.

Capture: the persona's samples stream into the engine (:meth:`workers.engine.protocol.
Engine.stream`, at most ``batch_size`` in flight: a memory cap, vLLM's scheduler batches
them; OOM halving in :mod:`workers.batching`). Each response is generated (temperature /
max_tokens / seed from the job's params) and, the moment it finishes, the conversation is
re-read in one exact prefill pass that keeps, per layer, the mean over every
assistant-response token (the span :func:`app.prompts.build_prompt` computes from the chat
template); the prompt-span mean and the last prompt token only when ``params.spans`` asks for
them. Means are stored as float32 whatever the model's dtype (``storage_dtype`` in the
metadata). When every sample is in, :func:`compute_item` returns the store step: the persona
vectors are derived (:mod:`app.vectors`) and the artifact (safetensors + JSON metadata, and a
small ``.vectors.safetensors`` the job's end reads: :mod:`workers.jobvectors`) is written to
the store; a ``.pt`` copy only with ``CHATSPACE_WRITE_PT`` (``artifacts export`` writes one on
demand). The job loop runs that step in a thread while the next persona streams (and on the
vLLM engine starts the next persona's stream, into the same vLLM run, as soon as this one's
samples are all in the engine: ``ctx.engine`` is then a lane of
:class:`workers.engine.lanes.SharedStream`). The default
persona is one item of its own, captured once per job; vectors against it finish when the job
ends. The caller marks the item done only after the store step returned the artifact's
checksum: a crash in between re-does one persona into the same key and never leaves a done
item without its artifact.

Rollout writes the responses as JSONL (one line per sample) with the steering spec used;
with ``capture`` on it also stores the activations like a capture job.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from app.artifacts import (
    build_persona_artifact,
    build_vector_sidecar,
    job_prefix,
    read_persona_artifact,
    to_pt,
)
from app.datasets import DEFAULT_PERSONA, SCORES_DIR, load_dataset, load_scores
from app.errors import SpecInvalid
from app.prompts import build_prompt, default_template_kwargs, model_display_name
from app.vectors import derive_vectors
from workers import sweep
from workers.batching import BatchPolicy, JobCancelled
from workers.engine.protocol import Engine
from workers.engine.spec import CaptureSpec, RequestSpec, Reread, Span, StreamItem
from workers.engine.stream import sequential_stream
from workers.params import JobParams, resolve_steering

log = logging.getLogger(__name__)


# Our span name -> the name the engine reduces it under: the engine reserves the plain names
# for its built-in generation spans, so the exact re-read asks for named spans instead.
SPANS = {"response": "cs_response", "prompt": "cs_prompt", "last_prompt": "cs_last_prompt"}


def stored_spans(params) -> tuple[str, ...]:
    """The spans a job stores per sample: the response mean always, ``prompt`` and
    ``last_prompt`` only when ``params.spans`` asks (each is as large as the response means:
    at 8B, 590 kB per sample in float32, 1.77 MB for all three; issue #14)."""
    extra = set(getattr(params, "spans", None) or ())
    return tuple(n for n in SPANS if n == "response" or n in extra)


def capture_spans(names, prompt_len: int, response_span: tuple[int, int]) -> tuple[Span, ...]:
    """The engine's named spans for one conversation of the exact re-read."""
    bounds = {"response": response_span, "prompt": (0, prompt_len),
              "last_prompt": (prompt_len - 1, prompt_len)}
    return tuple(Span(SPANS[n], *bounds[n]) for n in names)


@dataclass
class ItemContext:
    """What one persona's run needs; callbacks keep the pipeline free of database code."""

    job_id: str
    kind: str  # capture | rollout
    dataset: str
    persona: str
    model: str
    dtype: str
    params: JobParams
    engine: Engine
    store: object
    settings: object
    artifact_prefix: str | None = None  # the job's recorded prefix (None: from settings)
    gpu_index: str | None = None
    on_progress: Callable[[int, int], None] = lambda done, total: None
    on_event: Callable[[str, dict], None] = lambda kind, data: None
    should_cancel: Callable[[], bool] = lambda: False
    free_memory: Callable[[], None] | None = None
    # (job_id, persona, vector_key, layer) -> vector, for steering from a capture artifact
    load_vector: Callable[[str, str, str, int], list[float]] | None = None


@dataclass
class ItemResult:
    artifact_key: str
    sha256: str
    size: int
    extra: list[dict] = field(default_factory=list)  # other stored files: key, sha256, size
    info: dict = field(default_factory=dict)  # shapes, counts: for the manifest


def artifact_key(ctx: ItemContext) -> str:
    base = ctx.artifact_prefix or job_prefix(ctx.settings, model=ctx.model, dataset=ctx.dataset,
                                             dtype=ctx.dtype, job_id=ctx.job_id)
    return f"{base}/{ctx.persona}.{KINDS[ctx.kind][1]}"


def run_item(ctx: ItemContext) -> ItemResult:
    """Compute one persona and store its artifact(s). Raises EngineOOM / JobCancelled."""
    return compute_item(ctx)()


def compute_item(ctx: ItemContext) -> Callable[[], ItemResult]:
    """Run one persona through the engine; returns the step that derives its vectors,
    serialises and stores its artifact(s). That step needs no engine: the job loop runs it
    in a thread while the next persona streams. Raises EngineOOM / JobCancelled."""
    dataset = load_dataset(ctx.dataset, settings=ctx.settings)
    samples = item_samples(ctx, dataset, ctx.persona)
    if not samples:
        raise SpecInvalid(f"persona {ctx.persona!r} has no samples", field="dataset")
    if ctx.kind not in KINDS:
        raise SpecInvalid(f"unknown job kind {ctx.kind!r}", field="kind",
                          hint=f"one of {', '.join(KINDS)}")
    return KINDS[ctx.kind][0](ctx, dataset, samples)


def item_samples(ctx: ItemContext, dataset, persona: str):
    """The samples of one persona as this job runs them: capture over the shared questions,
    rollout over the persona's own (evaluation) questions; ``{model_name}`` filled."""
    return dataset.samples(persona, questions=ctx.params.questions,
                           model_name=ctx.params.model_name or model_display_name(ctx.model),
                           purpose="eval" if ctx.kind == "rollout" else "capture",
                           max_samples=ctx.params.max_samples)


def batch_size(ctx: ItemContext) -> int:
    """The job's cap on samples in flight; by default twice the engine's ``max_num_seqs``
    (vLLM's scheduler then always has samples waiting) or 256 without one."""
    if ctx.params.batch_size is not None:
        return int(ctx.params.batch_size)
    return 2 * int(getattr(ctx.engine, "max_num_seqs", 128))


def _policy(ctx: ItemContext) -> BatchPolicy:
    kw = {"free_memory": ctx.free_memory} if ctx.free_memory else {}
    return BatchPolicy(persona=ctx.persona, batch_size=batch_size(ctx),
                       min_batch=max(1, int(ctx.settings.engine.oom_min_batch)),
                       gpu_index=ctx.gpu_index, should_cancel=ctx.should_cancel,
                       on_event=ctx.on_event, **kw)


def _layers(ctx: ItemContext) -> tuple[int, ...]:
    n = int(ctx.engine.num_layers)
    layers = tuple(ctx.params.layers) if ctx.params.layers else tuple(range(n))
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise SpecInvalid(f"layers {bad} out of range; the model has layers 0..{n - 1}",
                          field="params.layers")
    return layers


def template_kwargs(tokenizer) -> dict:
    """Chat-template kwargs for a model: :func:`app.prompts.default_template_kwargs`
    (Qwen3: no thinking) when the template then renders the generation prompt as a prefix of
    the whole conversation; else none. Some templates accept ``enable_thinking`` for the
    generation prompt but never write the empty think block into an assistant turn (the
    tiny generated Qwen3's does this); with the default they could place no response span,
    and every persona would fail. Generation and capture use the same kwargs either way."""
    kwargs = default_template_kwargs(tokenizer)
    if not kwargs:
        return kwargs
    try:
        build_prompt(tokenizer, system="system", question="question", response="response",
                     template_kwargs=kwargs)
    except ValueError:
        log.warning("chat template ignores %s inside a conversation; using no template "
                    "kwargs", kwargs)
        return {}
    return kwargs


def _engine_stream(engine):
    """The engine's :meth:`~workers.engine.protocol.Engine.stream`; an engine that only
    generates and captures (a test double) streams in chunks through the same contract."""
    stream = getattr(engine, "stream", None)
    return stream if stream is not None else partial(sequential_stream, engine)


def generate_and_capture(ctx: ItemContext, samples, *, steer=(), capture: bool,
                         policy: BatchPolicy | None = None) -> list[dict]:
    """Per sample: the generated response and, with ``capture``, its exact-mode means.

    The samples stream into the engine (at most ``batch_size`` in flight); prompts are built
    as the engine pulls them, each finished response is re-read at once, and what is kept
    per sample is a few numbers and its means (already on the host)."""
    tok = ctx.engine.tokenizer
    kwargs = template_kwargs(tok)
    layers = _layers(ctx) if capture else ()
    names = stored_spans(ctx.params)
    policy = policy or _policy(ctx)
    options = ctx.params.sampling()
    steer = tuple(steer)  # one tuple for every request: the engine checks and hashes it once
    stream = _engine_stream(ctx.engine)
    total = len(samples)
    prompts: dict[int, object] = {}
    fulls: dict[int, object] = {}

    def feed(pending):
        for i, s in pending:
            p = prompts[i] = build_prompt(tok, system=s.system_prompt or None,
                                          question=s.question, template_kwargs=kwargs)
            yield StreamItem(i, p.input_ids, RequestSpec(steer=steer, key=s.key)
                             if steer else None)

    def reread(item: StreamItem, gen) -> Reread:
        if ctx.should_cancel():  # a generation is done; its re-read would be wasted
            raise JobCancelled("cancelled between a generation and its re-read")
        s = samples[item.tag]
        f = fulls[item.tag] = build_prompt(tok, system=s.system_prompt or None,
                                           question=s.question, response=gen.text,
                                           template_kwargs=kwargs)
        return Reread(f.input_ids, RequestSpec(
            steer=steer, key=s.key,
            capture=CaptureSpec(layers=layers, prompt=False, response=False, last_prompt=False,
                                spans=capture_spans(names, f.prompt_len, f.response_span))))

    def row(res) -> dict:
        s, p, g = samples[res.tag], prompts.pop(res.tag), res.gen
        r = {"sample": s, "prompt_len": p.prompt_len, "response": g.text,
             "prompt_tokens": len(p.input_ids), "response_tokens": len(g.token_ids),
             "finish_reason": g.finish_reason}
        if capture:
            f, c = fulls.pop(res.tag), res.capture
            want = f.response_span[1] - f.response_span[0]
            got = None if c is None else c.counts.get(SPANS["response"])
            if got != want:
                raise RuntimeError(f"sample {s.key}: capture covered {got} response tokens, "
                                   f"expected {want}")
            r["means"] = {name: c.means[SPANS[name]] for name in names}
            r["response_span"] = f.response_span
        return r

    def run(pending, cap):
        with closing(stream(feed(pending), options, reread=reread if capture else None,
                            max_in_flight=cap)) as results:
            for batch in results:
                yield [(res.tag, row(res)) for res in batch]
                if ctx.should_cancel():
                    raise JobCancelled(f"cancelled with {len(prompts)} samples in flight")

    ctx.on_progress(0, total)
    return policy.stream(samples, run, on_results=lambda done, _: ctx.on_progress(done, total))


def _capture(ctx: ItemContext, dataset, samples) -> Callable[[], ItemResult]:
    rows = generate_and_capture(ctx, samples, capture=True)
    return partial(_store_capture, ctx, dataset, rows, list(_layers(ctx)))


def _store_capture(ctx: ItemContext, dataset, rows: list[dict], layers: list[int]) -> ItemResult:
    acts = {name: np.stack([r["means"][name].float().numpy() for r in rows])
            for name in stored_spans(ctx.params)}
    keys = [r["sample"].key for r in rows]
    default_keys = ([s.key for s in item_samples(ctx, dataset, DEFAULT_PERSONA)]
                    if DEFAULT_PERSONA in dataset.personas and ctx.persona != DEFAULT_PERSONA
                    else [])
    scores, score_info = _scores(ctx, dataset)
    vectors = derive_vectors(acts["response"], keys, kind=dataset.kind, scores=scores,
                             default_keys=default_keys, persona=ctx.persona,
                             min_count=ctx.params.min_count)
    score_info = report_scores(ctx, vectors, score_info)
    data, metadata = build_persona_artifact(
        activations=acts["response"], keys=keys, vectors=vectors, layers=layers,
        model=ctx.model, dtype=ctx.dtype, dataset=ctx.dataset, persona=ctx.persona,
        extra_spans={n: a for n, a in acts.items() if n != "response"},
        extra_metadata={**provenance(ctx.engine), "job_id": str(ctx.job_id),
                        "params": ctx.params.as_dict(), "scores": score_info,
                        "responses": [r["response"] for r in rows],
                        "response_tokens": [r["response_tokens"] for r in rows],
                        "response_spans": [list(r["response_span"]) for r in rows]})
    key = artifact_key(ctx)
    stem = key.rsplit(".", 1)[0]
    stored = ctx.store.put_bytes(key, data, overwrite=True)
    meta_obj = ctx.store.put_bytes(
        stem + ".json", json.dumps(metadata, sort_keys=True, indent=2, default=str).encode(),
        content_type="application/json", overwrite=True)
    side = ctx.store.put_bytes(stem + ".vectors.safetensors",
                               build_vector_sidecar(vectors, persona=ctx.persona,
                                                    kind=dataset.kind, layers=layers,
                                                    scores=score_info,
                                                    extra_metadata=provenance(ctx.engine)),
                               overwrite=True)
    extra = [_obj(meta_obj), _obj(side)]
    if getattr(ctx.settings, "write_pt", False):
        extra.append(_obj(ctx.store.put_bytes(stem + ".pt", to_pt(read_persona_artifact(data)),
                                              overwrite=True)))
    info = {**provenance(ctx.engine), "persona": ctx.persona, "n_samples": len(rows),
            "layers": layers,
            "shapes": {"activations": list(acts["response"].shape),
                       **{f"vectors.{k}": list(v.shape) for k, v in vectors.vectors.items()}},
            "dtype": "float32"}
    return ItemResult(artifact_key=key, sha256=stored.sha256, size=stored.size,
                      extra=extra, info=info)


def _scores(ctx: ItemContext, dataset):
    """Judge scores of the persona when the dataset ships them, kept whole even when some
    keys are missing (the public rules skip exactly the unscored samples)."""
    info = {"file": f"{SCORES_DIR}/{ctx.persona}.json", "present": False}
    if ctx.persona == DEFAULT_PERSONA:  # its vector is the unfiltered mean (4_vectors.py)
        info["needed"] = False
        return None, info
    try:
        scores = load_scores(dataset, ctx.persona)
    except Exception as exc:
        log.warning("scores for %s unreadable; deriving unfiltered vectors", ctx.persona,
                    exc_info=True)
        info["error"] = str(exc)[:500]
        return None, info
    info["present"] = scores is not None
    return scores, info


def report_scores(ctx, vectors, info: dict) -> dict:
    """Say which scores were needed and absent: in the artifact's metadata, and as a job
    event when a score file is unreadable or lacks keys (which persona, which file, how many
    keys and the first of them); personas with no file at all are listed in one event when
    the job ends (:mod:`workers.jobvectors`)."""

    if ctx.persona == DEFAULT_PERSONA:
        return info
    missing = list(vectors.missing_scores)
    info = {**info, "missing_keys": len(missing), "missing_examples": missing[:50]}
    if not info["present"]:
        info["skipped"] = ("score-filtered vectors (pos_neg_50, pos_default_50, pos_70, "
                           "pos_40_70, pos_0..3, default_0..3)")
        if "error" in info:  # an absent file is summed up once when the job ends
            ctx.on_event("scores_unreadable", {"persona": ctx.persona, "file": info["file"],
                                               "error": info["error"]})
    elif missing:
        ctx.on_event("scores_missing", {"persona": ctx.persona, "file": info["file"],
                                        "missing_keys": len(missing),
                                        "examples": missing[:20]})
    return info


def _rollout(ctx: ItemContext, dataset, samples) -> Callable[[], ItemResult]:
    if ctx.params.sweep:  # a grid of steering settings: workers/sweep.py (stores as it goes)
        out = sweep.run_item(ctx, samples, prefix=artifact_key(ctx).rsplit("/", 1)[0],
                             policy=_policy(ctx),
                             template_kwargs=template_kwargs(ctx.engine.tokenizer))
        return partial(ItemResult, **out)
    steer, steer_wire = resolve_steering(ctx.params.steer, load_vector=ctx.load_vector,
                                         persona=ctx.persona,
                                         num_layers=int(ctx.engine.num_layers),
                                         hidden_size=int(ctx.engine.hidden_size))
    rows = generate_and_capture(ctx, samples, steer=steer, capture=ctx.params.capture)
    return partial(_store_rollout, ctx, rows, steer_wire)


def _store_rollout(ctx: ItemContext, rows: list[dict], steer_wire) -> ItemResult:
    buf = io.StringIO()
    for r in rows:
        s = r["sample"]
        buf.write(json.dumps({
            "persona": ctx.persona, "key": s.key, "label": s.label,
            "prompt_index": s.prompt_index, "question_index": s.question_index,
            "system_prompt": s.system_prompt, "question": s.question, "response": r["response"],
            "prompt_tokens": r["prompt_tokens"], "response_tokens": r["response_tokens"],
            "finish_reason": r["finish_reason"], "steer": steer_wire,
            "sampling": ctx.params.sampling_dict(), **provenance(ctx.engine)}) + "\n")
    key = artifact_key(ctx)
    stored = ctx.store.put_bytes(key, buf.getvalue().encode(),
                                 content_type="application/x-ndjson", overwrite=True)
    extra, info = [], {**provenance(ctx.engine), "persona": ctx.persona, "n_samples": len(rows)}
    if ctx.params.capture:
        import torch
        from safetensors.torch import save

        tensors = {f"{name}_mean": torch.stack([r["means"][name] for r in rows]).float()
                   .contiguous() for name in stored_spans(ctx.params)}
        header = {**provenance(ctx.engine), "keys": json.dumps([r["sample"].key for r in rows])}
        cap = ctx.store.put_bytes(key.rsplit(".", 1)[0] + ".activations.safetensors",
                                  save(tensors, metadata=header), overwrite=True)
        extra.append(_obj(cap))
        info["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    return ItemResult(artifact_key=key, sha256=stored.sha256, size=stored.size, extra=extra,
                      info=info)


def provenance(engine) -> dict:
    """What every artifact must say about how the engine ran: ``unverified_family`` (the
    decoder-layer class) when it served a family outside the verified ones
    (``engine.allow_unverified_family``), and ``steering_path`` for the vLLM engine (which
    path produced the numbers: eager hooks or the in-graph op)."""
    family = getattr(engine, "unverified_family", None)
    out = {"unverified_family": str(family)} if family else {}
    path = getattr(engine, "steering_path", None)  # eager hooks or the in-graph op (vLLM)
    if path:
        out["steering_path"] = str(path)
    return out


def _obj(o) -> dict:
    return {"key": o.key, "sha256": o.sha256, "size": o.size}


# Job kind -> (what one persona runs: the engine part, returning the step that stores its
# artifacts; the extension of its main artifact). A new kind is a function here and a value
# in app.states.JobKind (see docs/extending.md).
KINDS: dict[str, tuple[Callable[[ItemContext, object, list], Callable[[], ItemResult]], str]] = {
    "capture": (_capture, "safetensors"),
    "rollout": (_rollout, "jsonl"),
}
