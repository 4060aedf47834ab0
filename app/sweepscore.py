"""Scoring a sweep's grid points with the LLM judge (#11), so the summary's score columns
are numbers rather than nulls.

Why here and not in :mod:`app.sweeps`: the judge is an HTTP client with its own failure
modes; the summary module stays pure arithmetic and reads what this one returns.

Per (persona, grid point) the point's responses go through :func:`app.judge.judge_persona`
exactly as the pipeline's judge stage sends them (the persona file's ``eval_prompt`` filled
with question and answer, the dataset kind's scale from :func:`app.judge.scale_for`, the
``CHATSPACE_JUDGE_*`` settings, the job's ``--judge`` model). One call per point, so the
HTTP requests and tokens counted are that point's own.

The columns a point gets:

- ``judge_mean``: mean of the numeric scores (traits 0..100, roles 0..3); a traits
  ``REFUSAL`` is not a number and is not averaged (``4_judge.py`` keeps it as a label);
- ``refusal_rate``: refusals over judged samples (scored + refused): traits ``REFUSAL``,
  roles score 0 (``assistant_axis/judge.py``: "0 = refused");
- ``judge``: requests sent (client retries included), tokens, and every outcome counted
  (``unparseable``, ``malformed``, ``rejected``, ... stay in the counts: never dropped).
"""

from __future__ import annotations

from collections.abc import Callable

from app.errors import SpecInvalid

JUDGE_PARAMS = ("judge", "judge_structured_outputs", "judge_reply_retries")


def check_submit(params: dict, *, dataset, personas: list[str], settings) -> None:
    """A sweep's judge, checked at submit: a model (``--judge`` or CHATSPACE_JUDGE_MODEL,
    filled into ``params["judge"]``) and a usable ``eval_prompt`` in every persona file."""
    from app.judge.backend import check_judge
    from app.stages import _check_eval_prompts

    model = params.get("judge")
    if not isinstance(model, str) or not model.strip():
        raise SpecInvalid("the sweep's judge needs a model name", field="params.judge",
                          hint="--judge MODEL, or set CHATSPACE_JUDGE_MODEL")
    check_judge(model, settings)
    _check_eval_prompts(dataset, personas)


def point_scorer(*, dataset_name: str, persona: str, params, settings
                 ) -> Callable[[list[dict]], tuple[dict, dict]] | None:
    """A function records -> (score columns, judge detail) for one persona's grid points,
    or None when the job named no judge (the columns then stay null with the reason)."""
    model = getattr(params, "judge", None)
    if not model:
        return None
    from app.datasets import load_dataset
    from app.judge import OpenAIBackend, judge_persona, scale_for

    dataset = load_dataset(dataset_name, settings=settings)
    eval_prompt = dataset.persona(persona).eval_prompt
    if not eval_prompt:
        raise SpecInvalid(f"persona {persona!r} has no eval_prompt to judge with",
                          field="params.judge")
    scale = scale_for(dataset.kind)
    structured = getattr(params, "judge_structured_outputs", None)
    retries = getattr(params, "judge_reply_retries", None)
    retries = settings.judge.reply_retries if retries is None else int(retries)

    def backend():
        return OpenAIBackend.for_judge(settings, model, structured=structured)

    def score(records: list[dict]) -> tuple[dict, dict]:
        from app.responses import Response

        responses = [Response(key=r["key"], label=r["label"], prompt_index=r["prompt_index"],
                              question_index=r["question_index"],
                              system_prompt=r["system_prompt"] or "", question=r["question"],
                              answer=r["response"]) for r in records]
        result = judge_persona(backend, persona=persona, eval_prompt=eval_prompt, scale=scale,
                               responses=responses, reply_retries=retries)
        return columns(result, scale), result.detail()

    return score


def columns(result, scale) -> dict:
    """The summary columns of one judged point (see the module docstring)."""
    from app.judge import REFUSAL

    scores = [s.score for s in result.samples if s.outcome in ("scored", "refusal")]
    numbers = [v for v in scores if v != REFUSAL]
    refused = sum(1 for v in scores if v == REFUSAL or (not scale.refusal and v == 0))
    summary = result.summary()
    return {"judge_mean": (sum(numbers) / len(numbers)) if numbers else None,
            "refusal_rate": (refused / len(scores)) if scores else None,
            "judge": {"scale": scale.name, "model": result.model, "judged": len(scores),
                      "requests": summary["requests"], "asks": summary["asks"],
                      "tokens": summary["tokens"], "counts": summary["counts"],
                      "unparseable": summary["counts"]["unparseable"],
                      "usage_missing": summary["usage_missing"]}}


def judge_status(model: str | None, base_url: str | None) -> dict:
    """The summary's ``scores.judge`` block when a judge ran."""
    from app.judge.backend import safe_url

    return {"computed": True, "model": model, "base_url": safe_url(base_url),
            "columns": ["judge_mean", "refusal_rate"],
            "refusal": "traits: the REFUSAL score; roles: score 0",
            "mean_of": "numeric scores only; unparseable and other outcomes counted in "
                       "each row's judge.counts"}


def find_job(session, job_id, *, field: str, kind: str):
    """The job a sweep names in ``field``, or a SpecInvalid naming it: a missing or malformed
    id and an unknown job read alike ("no such job"). ``kind`` is the kind the hint asks for."""
    from app.models import Job

    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        raise SpecInvalid("missing or not a job id", field=field,
                          hint=f"the id of a succeeded {kind} job")
    try:
        job = session.get(Job, job_id)
    except Exception:  # noqa: BLE001 - a malformed id is just "no such job"
        session.rollback()
        job = None
    if job is None:
        raise SpecInvalid(f"no job {job_id!r}", field=field,
                          hint=f"`chatspace-jobs list --kind {kind} --state succeeded`")
    return job


# ---- MiniLM: the classifier an earlier pipeline job trained (its minilm stage) ----------

def check_minilm_from(session, job_id, *, dataset: str) -> str:
    """``params.sweep.minilm_from``: a succeeded pipeline job over the same dataset whose
    minilm stage stored a classifier (``minilm.json``). The classifier is per dataset: it
    tells this dataset's prompted answers from its unprompted ones."""
    from sqlalchemy import select

    from app.models import JobItem

    field = "params.sweep.minilm_from"
    job = find_job(session, job_id, field=field, kind="pipeline")
    item = session.execute(select(JobItem).where(JobItem.job_id == job_id,
                                                 JobItem.stage == "minilm")).scalars().first()
    if item is None or item.state != "succeeded" or not item.artifact_key:
        raise SpecInvalid(f"job {job_id} stored no MiniLM classifier", field=field,
                          hint="a pipeline job submitted with --stages ...,minilm, succeeded")
    if job.dataset != dataset:
        raise SpecInvalid(f"job {job_id} trained its classifier on {job.dataset}, not "
                          f"{dataset}", field=field, hint="use a job over the same dataset")
    return str(job.id)


def minilm_classifier(session, store, job_id: str) -> tuple[dict, str]:
    """(the classifier dict of ``job_id``'s minilm.json, its key), checked by sha256."""
    import json

    from sqlalchemy import select

    from app.models import JobItem

    item = session.execute(select(JobItem).where(JobItem.job_id == job_id,
                                                 JobItem.stage == "minilm")).scalars().first()
    if item is None or not item.artifact_key:
        raise SpecInvalid(f"job {job_id} stored no MiniLM classifier",
                          field="params.sweep.minilm_from")
    data = json.loads(store.get_bytes(item.artifact_key, expect_sha256=item.artifact_sha256))
    return data["classifier"], item.artifact_key


def minilm_scorer(classifier: dict, *, encoder=None) -> Callable[[list[dict]], dict]:
    """records -> ``{"minilm_mean": mean P(prompted)}`` under the stored classifier
    (:meth:`app.minilm.Classifier.score` on the packaged all-MiniLM-L6-v2 embeddings).
    The encoder loads once, on the first point."""
    from app.minilm import Classifier, embed, load_encoder

    clf = Classifier.from_dict(classifier)
    held: dict = {"encoder": encoder}

    def score(records: list[dict]) -> dict:
        if not records:
            return {"minilm_mean": None}
        if held["encoder"] is None:
            held["encoder"] = load_encoder()
        probs = clf.score(embed([r["response"] for r in records], encoder=held["encoder"]))
        return {"minilm_mean": float(probs.mean())}

    return score


def minilm_status(job_id: str, key: str, classifier: dict) -> dict:
    """The summary's ``scores.minilm`` block when the classifier scored the points."""
    return {"computed": True, "from_job": job_id, "classifier_key": key,
            "embedding_model": classifier.get("embedding_model"),
            "cv_auc": classifier.get("cv_auc"), "columns": ["minilm_mean"],
            "mean_of": "P(prompted) per response under the stored classifier"}
