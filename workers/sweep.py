"""A steering sweep's work for one persona: every grid point over the same prompts, in shared
engine batches; and, once every persona is done, the job's summary table and plot.

Why one job rather than one job per grid point: the prompts are tokenised once, the engine
stays warm, and the comparison lands as one table. The prefix cache keeps the engine's rule:
a steered request carries its spec's ``cache_salt`` (``workers.engine.engine.steer_key``), so
it never reads KV computed under another spec; requests of one grid point share their
system-prompt prefix with each other. A scale of 0 is sent unsteered (``h + 0·v`` is ``h``
exactly), so that point reads and writes the ordinary, unsalted cache.

It sits below ``workers/pipeline.py`` (whose rollout hands it a sweep's item with the job's
prefix, the batch policy and the chat-template kwargs), so it imports nothing of the pipeline.
What a sweep stores, under the job's prefix (names from :mod:`app.sweeps`):
``sweep/<persona>/<point>.jsonl`` (the responses of one grid point, one line per sample,
with the op used) and ``sweep/<persona>.summary.json`` (the item's artifact: one row per grid
point); when the job ends, :func:`app.sweeps.finish_sweep` adds ``sweep_summary.json`` and
``sweep.png`` (every persona).
"""

from __future__ import annotations

import functools
import json
import logging

from sqlalchemy import select

from app import sweeps, sweepscore
from app.artifacts import read_persona_artifact
from app.db import session_scope
from app.errors import SpecInvalid
from app.judge.backend import judge_base_url
from app.models import Artifact
from app.prompts import build_prompt
from workers.engine.spec import RequestSpec, SpecError, SteerOp, validate_spec

log = logging.getLogger(__name__)


def _norm(vec) -> float:
    return float(sum(float(x) ** 2 for x in vec) ** 0.5)


def _add_ops(ctx, spec: dict, points) -> dict:
    """point id -> (SteerOp or None, op as recorded). Vectors are loaded once per layer."""
    if ctx.load_vector is None:
        raise SpecInvalid("this worker cannot load vectors", field="params.sweep.source")
    persona = spec.get("persona") or ctx.persona
    vectors = {}
    for layer in spec["layers"]:
        vec = [float(x) for x in ctx.load_vector(spec["source"], persona, spec["vector"], layer)]
        norm = _norm(vec)
        if spec.get("normalize"):
            if not norm > 0:
                raise SpecInvalid(f"vector {spec['vector']!r} of {persona!r} is zero at layer "
                                  f"{layer}: it cannot be normalised", field="params.sweep.vector")
            vec = [x / norm for x in vec]
        vectors[layer] = (vec, norm)
    out = {}
    for pt in points:
        vec, norm = vectors[pt.layer]
        record = {"op": "add", "layer": pt.layer, "scale": pt.value,
                  "from": {"job_id": spec["source"], "vector": spec["vector"],
                           "persona": persona, "layer": pt.layer},
                  "normalize": bool(spec.get("normalize")), "vector_norm": norm}
        op = None if pt.value == 0 else SteerOp(op="add", layer=pt.layer, vector=vec,
                                                scale=pt.value)
        out[pt.id] = (op, record)
    return out


@functools.lru_cache(maxsize=2)
def _axis_job_means(store, job_id: str) -> tuple[dict, list[int]]:
    """persona -> (activations, keys) of every persona artifact of the axis job, and its
    layers. Cached: every persona of the sweep needs the same axis (a finished capture job's
    artifacts never change)."""
    with session_scope() as s:
        rows = [(a.key, a.sha256) for a in s.execute(
            select(Artifact).where(Artifact.job_id == job_id)).scalars()
            if a.key.endswith(".safetensors")]
    per_persona, layers = {}, None
    for key, sha in sorted(rows):
        art = read_persona_artifact(store.get_bytes(key, expect_sha256=sha))
        per_persona[key.rsplit("/", 1)[-1].rsplit(".", 1)[0]] = (art.activations, list(art.keys))
        layers = [int(x) for x in art.metadata["layers"]]
    if not per_persona:
        raise SpecInvalid(f"job {job_id} stored no activations", field="params.sweep.cap_axis")
    return per_persona, layers


def _cap_ops(ctx, spec: dict, points) -> dict:
    """Caps on the assistant axis of the ``cap_axis`` job, floors at the percentiles of its
    projections (:func:`app.sweeps.axis_from_means`, :func:`app.sweeps.cap_thresholds`)."""
    per_persona, layers = _axis_job_means(ctx.store, spec["cap_axis"])
    out = {}
    for layer in spec["layers"]:
        if layer not in layers:
            raise SpecInvalid(f"job {spec['cap_axis']} did not capture layer {layer}",
                              field="params.sweep.layers", hint=f"captured: {layers}")
        idx = layers.index(layer)
        axis, made_of = sweeps.axis_from_means(per_persona, idx)
        taus = sweeps.cap_thresholds(per_persona, idx, axis, spec["cap_percentiles"])
        by_pct = dict(zip(spec["cap_percentiles"], taus))
        for pt in (p for p in points if p.layer == layer):
            tau = by_pct[pt.value]
            record = {"op": "cap", "layer": layer, "min": tau, "percentile": pt.value,
                      "axis": {"job_id": spec["cap_axis"], "norm": _norm(axis), **made_of}}
            out[pt.id] = (SteerOp(op="cap", layer=layer, vector=[float(x) for x in axis],
                                  min=tau), record)
    return out


def resolve_points(ctx, spec: dict, points) -> dict:
    """point id -> (RequestSpec or None, recorded op), checked against the engine's shape."""
    ops = _add_ops(ctx, spec, points) if spec["form"] == "add" else _cap_ops(ctx, spec, points)
    out = {}
    for pt in points:
        op, record = ops[pt.id]
        req = None if op is None else RequestSpec(steer=(op,), key=pt.id)
        if req is not None:
            try:
                validate_spec(req, num_layers=int(ctx.engine.num_layers),
                              hidden_size=int(ctx.engine.hidden_size))
            except SpecError as exc:
                raise SpecInvalid(exc.message, field=f"params.sweep ({pt.id}): {exc.field}"
                                  ) from None
        out[pt.id] = (req, record)
    return out


def run_item(ctx, samples, *, prefix: str, policy, template_kwargs: dict) -> dict:
    """Every grid point over this persona's samples (``ctx``: the pipeline's ItemContext).
    Returns the item result's fields: the persona's summary as the item's artifact, the
    per-point responses as its extra files. ``policy`` runs the batches (OOM halving, cancel)."""
    spec = ctx.params.sweep
    points = sweeps.grid(spec)
    resolved = resolve_points(ctx, spec, points)
    tok = ctx.engine.tokenizer
    prompts = {s.key: build_prompt(tok, system=s.system_prompt or None, question=s.question,
                                   template_kwargs=template_kwargs) for s in samples}
    options = ctx.params.sampling()
    work = [(pt, s) for pt in points for s in samples]  # point-major: one salt per run
    total = len(work)

    def one_batch(batch):
        gens = ctx.engine.generate([prompts[s.key].input_ids for _, s in batch], options,
                                   [resolved[pt.id][0] for pt, _ in batch])
        return [(pt, s, g) for (pt, s), g in zip(batch, gens)]

    ctx.on_progress(0, total)
    done = policy.run(work, one_batch, on_batch=lambda n, _: ctx.on_progress(n, total))
    extra, rows = [], []
    # the job's judge (--judge), None without one: app/sweepscore.py
    scorer = sweepscore.point_scorer(dataset_name=ctx.dataset, persona=ctx.persona,
                                     params=ctx.params, settings=ctx.settings)
    judged = []
    minilm, minilm_info = None, None
    if spec.get("minilm_from"):  # the classifier an earlier pipeline job trained
        with session_scope() as s:
            clf, clf_key = sweepscore.minilm_classifier(s, ctx.store, spec["minilm_from"])
        minilm = sweepscore.minilm_scorer(clf)
        minilm_info = sweepscore.minilm_status(spec["minilm_from"], clf_key, clf)
    for pt in points:
        records = [{
            "persona": ctx.persona, "point": pt.id, "key": s.key, "label": s.label,
            "prompt_index": s.prompt_index, "question_index": s.question_index,
            "system_prompt": s.system_prompt, "question": s.question, "response": g.text,
            "prompt_tokens": len(prompts[s.key].input_ids),
            "response_tokens": len(g.token_ids), "finish_reason": g.finish_reason,
            "steer": [resolved[pt.id][1]], "sampling": ctx.params.sampling_dict()}
            for p, s, g in done if p.id == pt.id]
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        obj = ctx.store.put_bytes(sweeps.point_key(prefix, ctx.persona, pt.id), body,
                                  content_type="application/x-ndjson", overwrite=True)
        extra.append({"key": obj.key, "sha256": obj.sha256, "size": obj.size})
        scores = None
        if scorer is not None:
            scores, detail = scorer(records)
            judged.append(ctx.store.put_bytes(
                sweeps.point_key(prefix, ctx.persona, pt.id)[:-len(".jsonl")] + ".judge.json",
                json.dumps(detail, indent=1).encode(), content_type="application/json",
                overwrite=True))
            extra.append({"key": judged[-1].key, "sha256": judged[-1].sha256,
                          "size": judged[-1].size})
        if minilm is not None:
            scores = {**(scores or {}), **minilm(records)}
        op = resolved[pt.id][1]
        rows.append({**pt.as_dict(), **({"threshold": op["min"]} if op["op"] == "cap" else {}),
                     **sweeps.summarize_point(records, scores), "responses_key": obj.key})
    status = (sweepscore.judge_status(ctx.params.judge,
                                      judge_base_url(ctx.settings, ctx.params.judge))
              if scorer is not None else None)
    summary = {"persona": ctx.persona, "job_id": str(ctx.job_id), "spec": spec,
               "scores": sweeps.scores_status(status, minilm_info), "points": rows}
    key = sweeps.persona_summary_key(prefix, ctx.persona)
    stored = ctx.store.put_bytes(key, json.dumps(summary, indent=2, sort_keys=True).encode(),
                                 content_type="application/json", overwrite=True)
    return {"artifact_key": key, "sha256": stored.sha256, "size": stored.size, "extra": extra,
            "info": {"persona": ctx.persona, "n_samples": len(samples), "points": len(points),
                     "requests": total}}
