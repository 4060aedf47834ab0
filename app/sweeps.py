"""Steering sweeps: one rollout job over a grid of steering strengths, and its scored summary.

The research compared steering strengths side by side (coefficients on a persona vector, or
projection caps on the assistant axis at chosen percentiles). A sweep is that comparison as
one job: every persona's prompts are generated once per grid point, in the same engine
batches, and the job ends with one summary table and one plot instead of N jobs the user
stitches together by hand.

The spec as submitted (``params.sweep``), either form:

- add:  ``{"source": JOB, "vector": "pos_neg_50", "layers": [20], "scales": [-8, 0, 8],
  "normalize": true}`` — each grid point adds ``scale * v`` at one layer, ``v`` the named
  vector of the item's persona (or of ``persona``) from the capture job ``source``, unit
  length with ``normalize``;
- cap:  ``{"cap_axis": JOB, "cap_percentiles": [1, 5, 25], "layers": [20]}`` — each grid point
  keeps the projection on the assistant axis at or above the given percentile of the
  projections of the capture job's stored response means (see :func:`axis_from_means`).

The grid is ``layers × scales`` (or ``layers × percentiles``): one steering op per point.
Everything is checked at submit (:func:`check_sweep`); the stored spec adds ``form`` and the
grid size (``grid``: points, personas, samples, requests), which the submit response shows.

This module also owns the summary (:func:`summarize_point`, :func:`summary_table`) and the
plot (:func:`render_plot`), so the worker that writes them and the API that serves them read
one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.errors import SpecInvalid
from app.sweepscore import find_job

SWEEP_KEYS = {"source", "vector", "persona", "layers", "scales", "normalize", "cap_axis",
              "cap_percentiles", "minilm_from"}
MAX_POINTS = 256
MAX_SCALE = 1e6
VECTOR_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# Score columns the summary always carries; None with a reason when not computed.
SCORE_COLUMNS = ("judge_mean", "refusal_rate", "minilm_mean")
SCORES_UNAVAILABLE = ("not computed: the job named no judge (submit the sweep with --judge "
                      "MODEL); the columns stay null rather than guessed")
MINILM_UNAVAILABLE = ("not computed: the sweep named no MiniLM classifier (params.sweep."
                      "minilm_from: a pipeline job that ran the minilm stage); the column "
                      "stays null rather than guessed")
SUMMARY_NAME = "sweep_summary.json"
PLOT_NAME = "sweep.png"


@dataclass(frozen=True)
class GridPoint:
    """One steering setting of a sweep. ``value`` is the scale (add) or percentile (cap)."""

    id: str
    layer: int
    form: str  # add | cap
    value: float

    def as_dict(self) -> dict:
        key = "scale" if self.form == "add" else "percentile"
        return {"point": self.id, "layer": self.layer, key: self.value}


def grid(spec: dict) -> list[GridPoint]:
    """The points of a stored (checked) spec, layer-major, in the order given."""
    form = spec["form"]
    values = spec["scales"] if form == "add" else spec["cap_percentiles"]
    tag = "s" if form == "add" else "p"
    return [GridPoint(f"L{layer}_{tag}{v:g}", int(layer), form, float(v))
            for layer in spec["layers"] for v in values]


# ---- submit-time checks ----------------------------------------------------------------

def _numbers(raw, field: str, *, lo: float, hi: float, hint: str) -> list[float]:
    if not isinstance(raw, list) or not raw:
        raise SpecInvalid("the grid is empty: give at least one value", field=field, hint=hint)
    out: list[float] = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SpecInvalid(f"must be a finite number, got {v!r}"[:200], field=f"{field}[{i}]",
                              hint=hint)
        if not lo <= v <= hi:
            raise SpecInvalid(f"{v:g} is out of range [{lo:g}, {hi:g}]", field=f"{field}[{i}]",
                              hint=hint)
        if float(v) in out:
            raise SpecInvalid(f"{v:g} is listed twice", field=f"{field}[{i}]",
                              hint="each grid value once")
        out.append(float(v))
    return out


def _layers(raw, info) -> list[int]:
    field = "params.sweep.layers"
    if raw == "all":
        raise SpecInvalid("a sweep steers named layers, not all of them", field=field,
                          hint="e.g. --layers 20 (each layer is its own grid row)")
    if not isinstance(raw, list) or not raw:
        raise SpecInvalid("the grid is empty: give at least one layer", field=field,
                          hint="e.g. [20]")
    top = info.num_layers - 1 if info else 100_000
    out: list[int] = []
    for i, layer in enumerate(raw):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SpecInvalid(f"must be a layer index, got {layer!r}"[:200],
                              field=f"{field}[{i}]")
        if not 0 <= layer <= top:
            hint = (f"the model has {info.num_layers} layers (0..{top}), from {info.source}"
                    if info else "a layer index >= 0")
            raise SpecInvalid(f"layer {layer} is out of range", field=f"{field}[{i}]", hint=hint)
        if layer in out:
            raise SpecInvalid(f"layer {layer} is listed twice", field=f"{field}[{i}]")
        out.append(layer)
    return out


def _source_job(session, job_id, field: str):
    """A succeeded capture job, or a SpecInvalid naming ``field``."""
    job = find_job(session, job_id, field=field, kind="capture")
    if job.kind != "capture":
        raise SpecInvalid(f"job {job_id} is a {job.kind} job, not a capture job", field=field,
                          hint="steer from a succeeded capture job")
    if job.state != "succeeded":
        raise SpecInvalid(f"job {job_id} is {job.state}, not finished", field=field,
                          hint="wait for it to succeed (`chatspace-jobs status "
                               f"{job_id} --watch`), then submit the sweep")
    return job


def _persona_artifacts(session, job_id: str) -> dict[str, dict]:
    """persona -> the recorded artifact info (shapes name every stored vector)."""
    from sqlalchemy import select

    from app.models import Artifact

    rows = session.execute(select(Artifact).where(Artifact.job_id == job_id)).scalars()
    return {r.key.rsplit("/", 1)[-1].rsplit(".", 1)[0]: (r.meta or {})
            for r in rows if r.key.endswith(".safetensors")}


def _check_source(session, src, field: str, layers: list[int], personas: list[str],
                  model: str, info, settings) -> dict[str, dict]:
    from app.modelinfo import resolve

    src_info = resolve(src.model, settings=settings, session=session)
    if info and src_info and src_info.hidden_size != info.hidden_size:
        raise SpecInvalid(f"job {src.id} captured {src.model} (hidden {src_info.hidden_size}), "
                          f"not {model} (hidden {info.hidden_size})", field=field)
    captured = (src.params or {}).get("layers")
    for i, layer in enumerate(layers):
        if captured is not None and layer not in captured:
            raise SpecInvalid(f"job {src.id} did not capture layer {layer}",
                              field=f"params.sweep.layers[{i}]",
                              hint=f"captured layers: {captured}")
    arts = _persona_artifacts(session, str(src.id))
    missing = [p for p in personas if p not in arts]
    if missing:
        raise SpecInvalid(f"job {src.id} has no stored artifact for persona "
                          f"{str(missing[0])[:80]!r}", field=field,
                          hint=f"it has: {', '.join(sorted(arts)) or 'none'}")
    return arts


def check_sweep(session, raw, *, model: str, info, dataset, personas: list[str],
                max_samples: int | None, settings) -> dict:
    """The stored spec (with ``form`` and ``grid``) or a SpecInvalid naming the field."""
    if not isinstance(raw, dict):
        raise SpecInvalid("must be an object", field="params.sweep",
                          hint='e.g. {"source": JOB, "vector": "pos_neg", "layers": [20], '
                               '"scales": [-8, 0, 8]}')
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise SpecInvalid(f"unknown key {unknown[0]!r}", field=f"params.sweep.{unknown[0]}",
                          hint=f"allowed: {', '.join(sorted(SWEEP_KEYS))}")
    is_add, is_cap = raw.get("source") is not None, raw.get("cap_axis") is not None
    if is_add == is_cap:
        raise SpecInvalid("give exactly one of 'source' (add a vector) or 'cap_axis' (cap on "
                          "the axis)", field="params.sweep.source",
                          hint="--steer-from JOB --vector NAME --scales ..., or "
                               "--cap-axis JOB --cap-percentiles ...")
    layers = _layers(raw.get("layers"), info)
    out: dict = {"layers": layers}
    if is_add:
        for k in ("cap_percentiles",):
            if raw.get(k) is not None:
                raise SpecInvalid("only the cap form takes percentiles",
                                  field=f"params.sweep.{k}", hint="use 'scales' with 'source'")
        out["form"] = "add"
        out["scales"] = _numbers(raw.get("scales"), "params.sweep.scales", lo=-MAX_SCALE,
                                 hi=MAX_SCALE, hint="e.g. [-8, -4, 0, 4, 8]")
        normalize = raw.get("normalize", False)
        if not isinstance(normalize, bool):
            raise SpecInvalid("must be true or false", field="params.sweep.normalize")
        out["normalize"] = normalize
        name = raw.get("vector")
        if not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= \
                VECTOR_NAME_CHARS:
            raise SpecInvalid("missing or not a vector name", field="params.sweep.vector",
                              hint="e.g. pos_neg, pos_neg_50, contrast")
        src = _source_job(session, raw["source"], "params.sweep.source")
        persona = raw.get("persona")
        if persona is not None and not isinstance(persona, str):
            raise SpecInvalid("must be a persona name", field="params.sweep.persona")
        wanted = [persona] if persona else personas
        arts = _check_source(session, src, "params.sweep.source", layers, wanted, model, info,
                             settings)
        for p in wanted:
            have = sorted(k.split(".", 1)[1] for k in (arts[p].get("shapes") or {})
                          if k.startswith("vectors."))
            if name not in have:
                raise SpecInvalid(f"job {src.id} has no vector {name!r} for persona {p!r}",
                                  field="params.sweep.vector",
                                  hint=f"it has: {', '.join(have) or 'none'}")
        out.update(source=str(src.id), vector=name, persona=persona)
    else:
        for k in ("scales", "vector", "normalize", "persona"):
            if raw.get(k) is not None:
                raise SpecInvalid("the cap form takes no " + k, field=f"params.sweep.{k}",
                                  hint="the cap form is cap_axis + cap_percentiles + layers")
        out["form"] = "cap"
        out["cap_percentiles"] = _numbers(raw.get("cap_percentiles"),
                                          "params.sweep.cap_percentiles", lo=0, hi=100,
                                          hint="percents in [0, 100], e.g. [1, 5, 25]")
        src = _source_job(session, raw["cap_axis"], "params.sweep.cap_axis")
        arts = _check_source(session, src, "params.sweep.cap_axis", layers, [], model, info,
                             settings)
        if not arts:
            raise SpecInvalid(f"job {src.id} stored no activations", field="params.sweep.cap_axis")
        out["cap_axis"] = str(src.id)
    if raw.get("minilm_from") is not None:  # score every point with that job's classifier
        from app.sweepscore import check_minilm_from

        out["minilm_from"] = check_minilm_from(session, raw["minilm_from"],
                                               dataset=dataset.name)
    points = len(grid(out))
    if points > MAX_POINTS:
        raise SpecInvalid(f"{points} grid points is too many", field="params.sweep.layers",
                          hint=f"<= {MAX_POINTS} points (layers x values)")
    samples = sum(len(dataset.samples(p, max_samples=max_samples)) for p in personas)
    out["grid"] = {"points": points, "personas": len(personas), "samples": samples,
                   "requests": points * samples}
    return out


# ---- the cap form's axis and thresholds -------------------------------------------------

def axis_from_means(per_persona: dict[str, tuple], layer_index: int):
    """The assistant axis at one layer from a capture job's response means, and which
    vectors made it.

    safety-research/assistant-axis ``pipeline/5_axis.py``: ``axis = mean(default vectors) -
    mean(role vectors)``. Here each persona's role vector is the mean of its ``pos``
    samples' response means and the default vector the mean of the ``default`` samples
    (every persona artifact of a roles dataset carries the same default prompts); both are
    averaged over personas. ``per_persona``: persona -> (activations (n, n_layers, hidden),
    keys).
    """
    import numpy as np

    defaults, roles = [], []
    for persona, (acts, keys) in sorted(per_persona.items()):
        labels = [k.split("_", 1)[0] for k in keys]
        pos = [i for i, lab in enumerate(labels) if lab == "pos"]
        dft = [i for i, lab in enumerate(labels) if lab == "default"]
        if pos:
            roles.append(np.asarray(acts)[pos, layer_index].astype(np.float64).mean(axis=0))
        if dft:
            defaults.append(np.asarray(acts)[dft, layer_index].astype(np.float64).mean(axis=0))
    if not defaults or not roles:
        raise SpecInvalid("the axis job has no " + ("default" if not defaults else "pos")
                          + " samples: the axis is mean(default) - mean(roles)",
                          field="params.sweep.cap_axis",
                          hint="use a capture job over a roles dataset with a default persona")
    axis = np.mean(defaults, axis=0) - np.mean(roles, axis=0)
    return axis, {"n_default_personas": len(defaults), "n_role_personas": len(roles)}


def cap_thresholds(per_persona: dict[str, tuple], layer_index: int, axis,
                   percentiles: list[float]) -> list[float]:
    """Percentiles (numpy's linear rule) of the projections ``h · axis/|axis|`` of every
    stored response mean of the axis job at that layer."""
    import numpy as np

    unit = np.asarray(axis, dtype=np.float64)
    norm = float(np.linalg.norm(unit))
    if not norm > 0:
        raise SpecInvalid("the axis is zero at this layer", field="params.sweep.layers")
    unit = unit / norm
    proj = np.concatenate([np.asarray(acts)[:, layer_index].astype(np.float64) @ unit
                           for acts, _ in per_persona.values()])
    return [float(x) for x in np.percentile(proj, percentiles)]


# ---- summary and plot -------------------------------------------------------------------

def summarize_point(records: list[dict], scores: dict | None = None) -> dict:
    """One persona at one grid point: sample count, mean response length (tokens and
    characters) and the score columns — from ``scores`` (:func:`app.sweepscore.columns`:
    judge mean, refusal rate, the judge's counts) when they were computed, else None, with
    the reason kept in the summary's ``scores`` block."""
    n = len(records)
    row = {"n": n,
           "mean_response_tokens": (sum(r["response_tokens"] for r in records) / n) if n else None,
           "mean_response_chars": (sum(len(r["response"]) for r in records) / n) if n else None}
    for col in SCORE_COLUMNS:
        row[col] = None
    row.update(scores or {})
    return row


def scores_status(judge: dict | None = None, minilm: dict | None = None) -> dict:
    """Why each score column is (or is not) filled: written into every summary. ``judge``,
    ``minilm``: :func:`app.sweepscore.judge_status` / ``minilm_status`` when they scored."""
    return {"judge": judge or {"computed": False, "reason": SCORES_UNAVAILABLE},
            "minilm": minilm or {"computed": False, "reason": MINILM_UNAVAILABLE}}


def job_scores(persona_summaries: list[dict]) -> dict:
    """The job's ``scores`` block: the personas' own (one judge per job, so they agree),
    or the null-with-reason one when no persona has finished."""
    for s in sorted(persona_summaries, key=lambda s: s["persona"]):
        if s.get("scores"):
            return s["scores"]
    return scores_status()


def summary_table(persona_summaries: list[dict]) -> list[dict]:
    """The rows of every persona's summary, one per (persona, grid point)."""
    rows = []
    for s in sorted(persona_summaries, key=lambda s: s["persona"]):
        for point in s["points"]:
            rows.append({"persona": s["persona"], **point})
    return rows


LABELS = {"judge_mean": "mean judge score", "refusal_rate": "refusal rate",
          "minilm_mean": "mean MiniLM score",
          "mean_response_tokens": "mean response length (tokens)",
          "mean_response_chars": "mean response length (characters)"}


def plot_metrics(rows: list[dict]) -> list[str]:
    """The columns the plot shows, one panel each: the scores that were computed, else the
    two length measures (the score columns are null, and a null is not drawn as a value)."""
    scores = [c for c in SCORE_COLUMNS if any(r.get(c) is not None for r in rows)]
    return scores or ["mean_response_tokens", "mean_response_chars"]


def plot_metric(rows: list[dict]) -> tuple[str, str]:
    """(column, label) of the first panel: the judge score when there is one, else length."""
    column = plot_metrics(rows)[0]
    return column, LABELS[column]


def render_plot(rows: list[dict], *, title: str = "") -> bytes:
    """PNG of each plotted metric against scale (or cap percentile), one line per persona and
    layer. matplotlib's Agg backend: no display needed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    columns = plot_metrics(rows)
    fig = Figure(figsize=(6 * len(columns), 4.5), dpi=100, layout="constrained")
    xkey = "scale" if any("scale" in r for r in rows) else "percentile"
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((r["persona"], r["layer"]), []).append(r)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(1, len(columns), i + 1)
        for (persona, layer), pts in sorted(lines.items()):
            pts = sorted(pts, key=lambda r: r[xkey])
            ax.plot([p[xkey] for p in pts],
                    [p[column] if p.get(column) is not None else math.nan for p in pts],
                    marker="o", label=f"{persona} (layer {layer})")
        ax.set_xlabel("steering scale" if xkey == "scale"
                      else "cap percentile of axis projections")
        ax.set_ylabel(LABELS[column])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle((title or "sweep") + ("" if any(c in SCORE_COLUMNS for c in columns) else
                                       "\njudge / MiniLM scores not computed (null): length shown"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def summary_keys(prefix: str) -> tuple[str, str]:
    """Where a sweep job's summary and plot live under its artifact prefix."""
    return f"{prefix}/{SUMMARY_NAME}", f"{prefix}/{PLOT_NAME}"


def persona_summary_key(prefix: str, persona: str) -> str:
    return f"{prefix}/sweep/{persona}.summary.json"


def point_key(prefix: str, persona: str, point_id: str) -> str:
    return f"{prefix}/sweep/{persona}/{point_id}.jsonl"


def finish_sweep(job_id: str, *, store) -> list[dict]:
    """When every persona of a sweep job is done: the job's summary table and plot, stored
    and recorded as job artifacts (so the manifest, built next, lists them). Idempotent, and
    a no-op for other jobs or while items are open. Returns what it stored."""
    import json

    from sqlalchemy import select

    from app import jobs
    from app.db import session_scope
    from app.models import Job, JobItem

    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or not (job.params or {}).get("sweep"):
            return []
        items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
        if not items or any(i.state != "succeeded" for i in items):
            return []
        prefix = job.artifact_prefix or items[0].artifact_key.rsplit("/sweep/", 1)[0]
        spec = job.params["sweep"]
        done = [(i.artifact_key, i.artifact_sha256) for i in items]
    summaries = [json.loads(store.get_bytes(k, expect_sha256=sha)) for k, sha in done]
    rows = summary_table(summaries)
    table = {"job_id": job_id, "spec": spec, "scores": job_scores(summaries),
             "plotted": plot_metrics(rows), "rows": rows}
    summary_key, plot_key = summary_keys(prefix)
    png = render_plot(rows, title=f"sweep {job_id[:8]}: {_title(spec)}")
    stored = [(store.put_bytes(summary_key, json.dumps(table, indent=2, sort_keys=True).encode(),
                               content_type="application/json", overwrite=True), "sweep_summary"),
              (store.put_bytes(plot_key, png, content_type="image/png", overwrite=True),
               "sweep_plot")]
    with session_scope() as s:
        for obj, kind in stored:
            jobs.record_artifact(s, job_id=job_id, key=obj.key, sha256=obj.sha256,
                                 size=obj.size, kind=kind, meta={"kind": kind})
    return [{"key": o.key, "sha256": o.sha256, "kind": k} for o, k in stored]


def _title(spec: dict) -> str:
    if spec["form"] == "add":
        return (f"add {spec['vector']}{' (unit)' if spec.get('normalize') else ''} "
                f"at layers {spec['layers']}")
    return f"cap on the axis of {spec['cap_axis'][:8]} at layers {spec['layers']}"
