"""Submitting a job: validate everything, then write, then enqueue — in that order.

A researcher submits and walks away, so a job that would fail in its first second on a GPU
(a typo in the dataset name, layer 40 of a 28-layer model, a steering vector of the wrong
length) is refused here, with the field and the fix, before any row is written or any
message is sent. Only after the job's transaction committed is ``enqueue(job_id)`` called:
a worker must never receive an id it cannot read, and if the enqueue is lost, Postgres still
holds the queued job and the workers' reconciler sends it again.

Shared by the API (``POST /jobs``) and the CLI's in-process mode, so both refuse the same
inputs with the same messages. The request is the one job spec (:mod:`app.spec`), which has
checked the types; the rules here are about values (ranges, the dataset, the model's shape).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any

from app.artifacts import job_prefix
from app.datasets import DEFAULT_PERSONA
from app.errors import DatasetInvalid, DatasetNotFound, SpecInvalid
from app.modelinfo import ModelInfo, resolve
from app.settings import DTYPES
from app.spec import KINDS, OPS, JobSpec, SteerOpSpec, VectorRef

log = logging.getLogger(__name__)

MAX_SAMPLES = 1_000_000
MAX_BATCH = 4096
MAX_TOKENS = 131_072
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
MAX_SCALE = 1e6
# A Hugging Face id, tiny:<family>, or a local folder, relative or absolute (/models/Qwen3-8B)
MODEL_RE = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,199}$")
VECTOR_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
OP_KEYS = {f.alias or name for name, f in SteerOpSpec.model_fields.items()}
FROM_KEYS = set(VectorRef.model_fields)


def _int_in(value, field: str, lo: int, hi: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecInvalid(f"must be an integer, got {value!r}"[:200], field=field, hint=hint)
    if not lo <= value <= hi:
        raise SpecInvalid(f"{value} is out of range [{lo}, {hi}]", field=field, hint=hint)
    return value


def _number(value, field: str, *, hint: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecInvalid(f"must be a number, got {value!r}"[:200], field=field, hint=hint)
    out = float(value)
    if not math.isfinite(out):
        raise SpecInvalid("must be a finite number", field=field, hint=hint)
    return out


def _layer(value, field: str, info: ModelInfo | None) -> int:
    top = info.num_layers - 1 if info else 100_000
    hint = (f"{info.num_layers} layers (0..{top}), from {info.source}" if info
            else "a layer index >= 0")
    return _int_in(value, field, 0, top, f"the model has {hint}" if info else hint)


def check_model(model: str, settings) -> str:
    if not isinstance(model, str) or not MODEL_RE.match(model) or ".." in model:
        raise SpecInvalid(f"model name {str(model)[:80]!r} is not valid", field="model",
                          hint="a Hugging Face id like Qwen/Qwen3-32B, a local path, or tiny:qwen3")
    allowed = list(settings.allowed_models or [])
    if allowed and model not in allowed:
        raise SpecInvalid(f"model {model!r} is not allowed here", field="model",
                          hint=f"allowed: {', '.join(allowed)}")
    return model


def check_dataset(name: str, settings):
    """Load the dataset fully (every persona file parsed) or refuse, naming it."""
    from app.datasets import load_dataset

    try:
        return load_dataset(name, settings=settings)
    except DatasetNotFound as exc:
        raise SpecInvalid(exc.message, field="dataset", hint=exc.hint) from None
    except DatasetInvalid as exc:
        raise DatasetInvalid(f"dataset {name!r} is invalid: {exc.message}", field="dataset",
                             hint=exc.hint or "run `chatspace-jobs datasets ls` to see problems"
                             ) from None
    except SpecInvalid as exc:  # a bad name
        raise SpecInvalid(exc.message, field="dataset", hint=exc.hint) from None


def check_params(p: dict, *, kind: str, info: ModelInfo | None) -> dict:
    """The params as stored on the job (defaults omitted, 'all' layers as None)."""
    out: dict[str, Any] = {}
    layers = p.get("layers")
    if layers is not None and layers != "all":
        if not isinstance(layers, list) or not layers:
            raise SpecInvalid("must be a non-empty list of layer indices or 'all'",
                              field="params.layers", hint="e.g. [10, 20, 30] or 'all'")
        seen = set()
        for i, layer in enumerate(layers):
            _layer(layer, f"params.layers[{i}]", info)
            if layer in seen:
                raise SpecInvalid(f"layer {layer} is listed twice", field=f"params.layers[{i}]")
            seen.add(layer)
        out["layers"] = sorted(seen)
    bounds = {"max_samples": MAX_SAMPLES, "batch_size": MAX_BATCH, "max_tokens": MAX_TOKENS,
              "questions": MAX_SAMPLES, "min_count": MAX_SAMPLES}
    for name, hi in bounds.items():
        if p.get(name) is not None:
            out[name] = _int_in(p[name], f"params.{name}", 1, hi, f"a whole number 1..{hi}")
    if p.get("temperature") is not None:
        t = _number(p["temperature"], "params.temperature")
        if not 0 <= t <= MAX_TEMPERATURE:
            raise SpecInvalid(f"{t} is out of range", field="params.temperature",
                              hint=f"0 (greedy) up to {MAX_TEMPERATURE}")
        out["temperature"] = t
    if p.get("top_p") is not None:
        top_p = _number(p["top_p"], "params.top_p")
        if not 0 < top_p <= 1:
            raise SpecInvalid(f"{top_p} is out of range", field="params.top_p", hint="in (0, 1]")
        out["top_p"] = top_p
    if p.get("model_name") is not None:
        name = p["model_name"]
        if not isinstance(name, str) or not name.strip() or len(name) > 200 or "{" in name:
            raise SpecInvalid("must be a non-empty name without braces, at most 200 "
                              "characters", field="params.model_name", hint="e.g. Qwen")
        out["model_name"] = name
    if p.get("seed") is not None:
        out["seed"] = _int_in(p["seed"], "params.seed", 0, MAX_SEED, "a non-negative integer")
    for flag in ("capture", "capture_exact"):
        if p.get(flag) is not None:
            if not isinstance(p[flag], bool):
                raise SpecInvalid("must be true or false", field=f"params.{flag}")
            out[flag] = p[flag]
    if out.get("capture") and kind != "rollout":
        raise SpecInvalid("only rollout jobs take 'capture'", field="params.capture",
                          hint="capture jobs always capture; drop the flag")
    # Any other parameter of the job spec (app/spec.py) was checked there, by type and range:
    # stored as given, so adding a parameter needs no change here.
    for name, value in p.items():
        if name not in out and name not in ("layers", "steer") and value is not None:
            out[name] = value
    return out


def check_steer_op(raw, where: str, info: ModelInfo | None) -> dict:
    """One steering op, well-formed and applicable to the model when its shape is known."""
    if not isinstance(raw, dict):
        raise SpecInvalid("must be an object", field=where,
                          hint='e.g. {"op": "add", "layer": 10, "scale": 4, "vector": [...]}')
    unknown = sorted(set(raw) - OP_KEYS)
    if unknown:
        raise SpecInvalid(f"unknown key {unknown[0]!r}", field=f"{where}.{unknown[0]}",
                          hint=f"allowed: {', '.join(sorted(OP_KEYS))}")
    op = raw.get("op")
    if op not in OPS:
        raise SpecInvalid(f"unknown op {str(op)[:40]!r}", field=f"{where}.op",
                          hint=f"one of {', '.join(OPS)}")
    if "layer" not in raw:
        raise SpecInvalid("missing", field=f"{where}.layer", hint="the layer to steer")
    layer = _layer(raw["layer"], f"{where}.layer", info)
    out: dict[str, Any] = {"op": op, "layer": layer}
    scale = _number(raw.get("scale", 1.0), f"{where}.scale")
    if abs(scale) > MAX_SCALE:
        raise SpecInvalid(f"{scale} is too large", field=f"{where}.scale",
                          hint=f"|scale| <= {MAX_SCALE:g}")
    out["scale"] = scale
    for b in ("min", "max"):
        if raw.get(b) is not None:
            out[b] = _number(raw[b], f"{where}.{b}")
    if op == "cap":
        if "min" not in out and "max" not in out:
            raise SpecInvalid("a cap needs min, max or both", field=f"{where}.min")
        if "min" in out and "max" in out and out["min"] > out["max"]:
            raise SpecInvalid(f"min {out['min']} is above max {out['max']}", field=f"{where}.min")
    has_vec, has_from = raw.get("vector") is not None, raw.get("from") is not None
    if has_vec == has_from:
        raise SpecInvalid("give exactly one of 'vector' or 'from'", field=f"{where}.vector",
                          hint="'vector': [floats], or 'from': {job_id, vector, layer}")
    if has_vec:
        out["vector"] = _check_vector(raw["vector"], f"{where}.vector", op, info)
    else:
        out["from"] = raw["from"]  # checked against the database by check_steer_refs
    return out


def _check_vector(vec, field: str, op: str, info: ModelInfo | None) -> list[float]:
    if not isinstance(vec, list) or not vec:
        raise SpecInvalid("must be a non-empty list of numbers", field=field)
    if info and len(vec) != info.hidden_size:
        raise SpecInvalid(f"length {len(vec)} does not match the model's hidden size "
                          f"{info.hidden_size}", field=field, hint=f"from {info.source}")
    if len(vec) > 1_000_000:
        raise SpecInvalid(f"length {len(vec)} is larger than any model's hidden size",
                          field=field)
    values = [_number(x, f"{field}[{i}]") for i, x in enumerate(vec)]
    if op in ("cap", "ablate") and math.sqrt(sum(x * x for x in values)) < 1e-12:
        raise SpecInvalid(f"a {op} direction must be non-zero", field=field)
    return values


def check_steer_refs(session, op: dict, where: str, *, model: str, personas: list[str],
                     info: ModelInfo | None, settings) -> None:
    """A ``from`` reference names a succeeded capture job whose artifacts exist."""
    ref = op["from"]
    field = f"{where}.from"
    if not isinstance(ref, dict):
        raise SpecInvalid("must be an object {job_id, vector, layer, persona}", field=field)
    unknown = sorted(set(ref) - FROM_KEYS)
    if unknown:
        raise SpecInvalid(f"unknown key {unknown[0]!r}", field=f"{field}.{unknown[0]}",
                          hint=f"allowed: {', '.join(sorted(FROM_KEYS))}")
    job_id = ref.get("job_id")
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        raise SpecInvalid("missing or not a job id", field=f"{field}.job_id",
                          hint="the id of a succeeded capture job")
    name = ref.get("vector")
    if not isinstance(name, str) or not VECTOR_NAME_RE.match(name):
        raise SpecInvalid("missing or not a vector name", field=f"{field}.vector",
                          hint="e.g. pos_neg, pos_default, contrast")
    src = _get_job(session, job_id)
    if src is None:
        raise SpecInvalid(f"no job {job_id!r}", field=f"{field}.job_id",
                          hint="`chatspace-jobs list --kind capture --state succeeded`")
    if src.kind != "capture" or src.state != "succeeded":
        raise SpecInvalid(f"job {job_id} is a {src.state} {src.kind} job",
                          field=f"{field}.job_id", hint="use a succeeded capture job")
    src_info = resolve(src.model, settings=settings, session=session)
    if info and src_info and src_info.hidden_size != info.hidden_size:
        raise SpecInvalid(f"job {job_id} captured {src.model} (hidden {src_info.hidden_size}), "
                          f"not {model} (hidden {info.hidden_size})", field=f"{field}.job_id")
    layer = ref.get("layer", op["layer"])
    _int_in(layer, f"{field}.layer", 0, 100_000, "a layer the capture job recorded")
    captured = (src.params or {}).get("layers")
    if captured is not None and layer not in captured:
        raise SpecInvalid(f"job {job_id} did not capture layer {layer}", field=f"{field}.layer",
                          hint=f"captured layers: {captured}")
    have = _artifact_personas(session, job_id)
    wanted = [ref["persona"]] if ref.get("persona") is not None else personas
    missing = [p for p in wanted if p not in have]
    if missing:
        raise SpecInvalid(f"job {job_id} has no stored artifact for persona "
                          f"{str(missing[0])[:80]!r}", field=f"{field}.persona",
                          hint=f"it has: {', '.join(sorted(have)) or 'none'}")


def _get_job(session, job_id: str):
    from app.models import Job

    try:
        return session.get(Job, job_id)
    except Exception:  # noqa: BLE001 - a malformed id (e.g. not a UUID) is just "no such job"
        session.rollback()
        return None


def _artifact_personas(session, job_id: str) -> set[str]:
    """Personas of a job whose artifact is recorded (safetensors file names)."""
    from sqlalchemy import select

    from app.models import Artifact

    keys = session.execute(select(Artifact.key).where(Artifact.job_id == job_id)).scalars()
    return {k.rsplit("/", 1)[-1].rsplit(".", 1)[0] for k in keys if k.endswith(".safetensors")}


def check_axis_from(session, job_id, *, model: str, kind: str) -> str:
    """``axis_from`` names a succeeded roles capture job of the same model with an axis."""
    field = "params.axis_from"
    if kind != "capture":
        raise SpecInvalid("only capture jobs project on an axis", field=field)
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        raise SpecInvalid("must be a job id", field=field)
    src = _get_job(session, job_id) if session is not None else None
    if src is None:
        raise SpecInvalid(f"no job {job_id!r}", field=field,
                          hint="a succeeded roles capture job (`chatspace-jobs list`)")
    if src.kind != "capture" or src.state != "succeeded" or src.model != model:
        raise SpecInvalid(f"job {job_id} is a {src.state} {src.kind} job of {src.model}",
                          field=field, hint=f"a succeeded capture job of {model} over roles")
    return job_id


def select_personas(dataset, wanted, *, kind: str) -> list[str]:
    """The job's items: the chosen personas (default all) and, for a capture job over a
    dataset with a default persona, that persona once, first (every vector against
    ``default`` reads it; it is captured once per job, not once per persona)."""
    others = [p for p in dataset.personas if p != DEFAULT_PERSONA]
    if not others:
        raise SpecInvalid(f"dataset {dataset.name!r} has no persona besides 'default'",
                          field="dataset", hint="add persona files to it")
    if wanted is not None:
        if not isinstance(wanted, list) or not wanted or not all(
                isinstance(w, str) for w in wanted):
            raise SpecInvalid("must be a non-empty list of persona names",
                              field="params.personas", hint="e.g. --personas pirate,poet")
        unknown = [w for w in wanted if w not in dataset.personas]
        if unknown:
            close = [p for p in others if unknown[0][:3].lower() in p.lower()][:8]
            raise SpecInvalid(f"persona {unknown[0][:80]!r} is not in dataset "
                              f"{dataset.name!r}", field="params.personas",
                              hint=(f"similar: {', '.join(close)}" if close else
                                    "`chatspace-jobs datasets validate "
                                    f"{dataset.name}` lists them"))
        others = [p for p in others if p in set(wanted)]
    has_default = DEFAULT_PERSONA in dataset.personas
    return ([DEFAULT_PERSONA] if has_default and kind == "capture" else []) + others


# Fewest UTF-8 bytes one token can stand for, when no tokenizer is at hand: a bound that
# never refuses a prompt that fits (a token covers at most a few dozen bytes).
BYTES_PER_TOKEN_BOUND = 32


def check_prompt_lengths(dataset, personas: list[str], params: dict, *, kind: str, model: str,
                         settings) -> None:
    """Refuse a prompt (system prompt + question) that cannot fit the model's context,
    naming the file, persona and field, before anything is queued. Exact with the model's
    tokenizer when it is on this machine (local files only), else a lower bound from bytes."""
    from app.prompts import model_display_name

    limit = int(settings.engine.max_model_len)
    name = params.get("model_name") or model_display_name(model)
    count, exact = _token_counter(model, settings)
    purpose = "eval" if kind == "rollout" else "capture"
    seen: set[tuple[str, str]] = set()
    for persona in personas:
        p = dataset.personas[persona]
        qs = (p.eval_questions or p.questions) if purpose == "eval" else p.questions
        qs = qs[: params["questions"]] if params.get("questions") else qs
        longest_q = max(qs, key=lambda q: len(q.text.encode()), default=None)
        if longest_q is None:
            continue
        sides = ("pos",) if persona == DEFAULT_PERSONA or dataset.kind == "roles" else ("pos", "neg")
        for i, instr in enumerate(p.instructions):
            for side in sides:
                system = instr[side].replace("{model_name}", name)
                if (system, longest_q.text) in seen:
                    continue
                seen.add((system, longest_q.text))
                n = count(system, longest_q.text)
                if n >= limit:
                    what = "tokens" if exact else "tokens at least (from its UTF-8 size)"
                    raise SpecInvalid(
                        f"{p.file}: persona {persona!r}, instruction[{i}].{side} with question "
                        f"{longest_q.index} ({'shared questions' if p.questions is qs else 'questions'}"
                        f"[{longest_q.index}]) is {n} {what}; the model's context is {limit}",
                        field="dataset",
                        hint="shorten that prompt or question, or raise "
                             "CHATSPACE_ENGINE_MAX_MODEL_LEN if the model allows it")


def _token_counter(model: str, settings):
    """(count(system, question) -> tokens, exact?)."""
    tok = None
    try:
        from app.modelinfo import local_tokenizer

        tok = local_tokenizer(model, settings=settings)
    except Exception:  # noqa: BLE001 - no tokenizer here: use the bound
        tok = None
    if tok is None:
        return (lambda system, question: (len(system.encode()) + len(question.encode()))
                // BYTES_PER_TOKEN_BOUND), False
    return (lambda system, question: len(tok(system + "\n" + question,
                                            add_special_tokens=False)["input_ids"])), True


def validate(session, request: JobSpec, *, settings) -> dict:
    """Every check; returns the job's columns. Raises SpecInvalid naming the field."""
    kind = request.kind
    if kind not in KINDS:
        raise SpecInvalid(f"unknown kind {str(kind)[:40]!r}", field="kind",
                          hint=f"one of {', '.join(KINDS)}")
    model = check_model(request.model or settings.default_model, settings)
    dtype = request.dtype or settings.default_dtype
    if dtype not in DTYPES:
        raise SpecInvalid(f"unknown dtype {str(dtype)[:40]!r}", field="dtype",
                          hint=f"one of {', '.join(DTYPES)}")
    dataset = check_dataset(request.dataset, settings)
    info = resolve(model, settings=settings, session=session)
    raw = request.params.given()
    from app import stages

    if kind == "capture" and any(raw.get(k) is not None for k in stages.PIPELINE_PARAMS):
        kind = "pipeline"  # --judge / --responses / --stages: the research chain
    elif kind != "pipeline" and any(raw.get(k) is not None for k in _not_taken(kind, raw)):
        name = next(k for k in _not_taken(kind, raw) if raw.get(k) is not None)
        raise SpecInvalid(f"a {kind} job does not take {name}", field=f"params.{name}",
                          hint="judge, responses and stages belong to pipeline jobs")
    params = check_params(raw, kind=kind, info=info)
    steer = raw.get("steer") or []
    if steer and kind != "rollout":
        raise SpecInvalid("only rollout jobs are steered", field="params.steer",
                          hint="submit with --kind rollout")
    if len(steer) > 256:
        raise SpecInvalid(f"{len(steer)} ops is too many", field="params.steer", hint="<= 256")
    ops = [check_steer_op(op, f"params.steer[{i}]", info) for i, op in enumerate(steer)]
    personas = select_personas(dataset, raw.get("personas"), kind=kind)
    if raw.get("personas") is not None:
        params["personas"] = [p for p in personas if p != DEFAULT_PERSONA]
    check_prompt_lengths(dataset, personas, params, kind=kind, model=model, settings=settings)
    if kind == "rollout":
        personas = [p for p in personas if p != DEFAULT_PERSONA]
    if raw.get("axis_from") is not None:
        params["axis_from"] = check_axis_from(session, raw["axis_from"], model=model,
                                              kind=kind)
    for i, op in enumerate(ops):
        if "from" in op:
            check_steer_refs(session, op, f"params.steer[{i}]", model=model, personas=personas,
                             info=info, settings=settings)
    if ops:
        params["steer"] = ops
    if raw.get("sweep") is not None:
        params["sweep"] = _check_sweep(session, raw["sweep"], kind=kind, params=params,
                                       model=model, info=info, dataset=dataset,
                                       personas=personas, settings=settings)
        _check_sweep_judge(raw, params, dataset=dataset, personas=personas, settings=settings)
    columns = {"kind": kind, "dataset": dataset.name, "model": model, "dtype": dtype,
               "params": params, "personas": personas}
    if kind == "pipeline":
        columns["items"] = stages.check_submit(params=params, dataset=dataset,
                                               personas=personas, settings=settings,
                                               session=session)
        del columns["personas"]
    return columns


def _not_taken(kind: str, raw: dict) -> tuple[str, ...]:
    """The pipeline params a non-pipeline job refuses: all of them, except that a sweep
    takes its judge (app/sweepscore.py)."""
    from app import stages
    from app.sweepscore import JUDGE_PARAMS

    if kind == "rollout" and raw.get("sweep") is not None:
        return tuple(k for k in stages.PIPELINE_PARAMS if k not in JUDGE_PARAMS)
    return stages.PIPELINE_PARAMS


def _check_sweep_judge(raw: dict, params: dict, **kw) -> None:
    """A sweep's judge: ``--judge MODEL`` (the settings' model is the default only when a
    judge option was given), its persona files' eval_prompts; nothing without one."""
    from app.sweepscore import JUDGE_PARAMS, check_submit

    if not any(raw.get(k) is not None for k in JUDGE_PARAMS):
        return
    if raw.get("judge") is None:
        params["judge"] = kw["settings"].judge.model
    check_submit(params, **kw)


def _check_sweep(session, raw, *, kind: str, params: dict, **kw) -> dict:
    """A steering sweep (:mod:`app.sweeps`): a rollout of its own, no other steering."""
    from app.sweeps import check_sweep

    if kind != "rollout":
        raise SpecInvalid("only rollout jobs sweep", field="params.sweep",
                          hint="submit with --kind rollout")
    for other in ("steer", "capture"):
        if params.get(other):
            raise SpecInvalid(f"a sweep takes no '{other}'", field=f"params.{other}",
                              hint="the sweep's grid is its steering; drop the other")
    return check_sweep(session, raw, max_samples=params.get("max_samples"), **kw)


def submit_job(session, *, request: JobSpec, settings, enqueue: Callable[[str], None]):
    """Validate fully, commit the job, then ``enqueue(job_id)``. Returns the job row.

    An enqueue failure does not undo the job: it is committed and queued in Postgres, and the
    workers' reconciler re-sends it; the failure is logged with the job id.
    """
    from app import jobs

    columns = validate(session, request, settings=settings)
    if columns["kind"] == "pipeline":
        from app import stages

        job = stages.create_pipeline_job(session, **{k: v for k, v in columns.items()
                                                     if k != "kind"})
    else:
        job = jobs.create_job(session, **columns)
    job.artifact_prefix = job_prefix(settings, model=job.model, dataset=job.dataset,
                                     dtype=job.dtype, job_id=job.id)
    session.commit()
    job_id = str(job.id)
    try:
        enqueue(job_id)
    except Exception:
        log.exception("job %s committed but not enqueued; the reconciler will send it", job_id)
    return job
