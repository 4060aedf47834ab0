"""The research chain as tracked work: one item per (stage, persona), claimed in order.

A pipeline job runs the public pipeline's steps over one dataset (safety-research/
assistant-axis ``pipeline/1_generate.py`` .. ``5_axis.py``; persona-subspace's traits
pipeline the same with a 0-100 judge)::

    generate -> capture ----\\
             -> judge -------> vectors -> axis
             -> minilm

Every (stage, persona) is a :class:`~app.models.JobItem` row with the item's state, attempt,
lease and progress, moved by the same guarded UPDATE + event as any item
(:func:`app.jobs.transition_item`). An item is claimable when every item it needs has
succeeded: the same persona's earlier stages, or every item of the stage for a stage over
the whole dataset (``minilm``, ``axis``: persona ``*``). Judge and capture need only the
generated responses, so they run side by side, as the public README advises ("3_judge.py can
be run in parallel with 2_activations.py"). A crash or redeploy therefore resumes at the
first unfinished stage and never repeats a succeeded one: succeeded rows are final.

Given responses (``--responses``) replace ``generate``: the plan then has no generate items
and capture/judge read the given file. A stage a job does not run (no ``--judge``) is simply
absent, and a dependency on an absent item is satisfied.

An item that failed for good leaves the items that need it unable to run; when the worker
loop finds nothing to claim, :func:`fail_blocked` fails them (naming the failed item), so
the job ends ``failed`` instead of waiting forever.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidTransition, SpecInvalid
from app.models import Job, JobItem
from app.states import FailureKind, ItemState, JobKind, JobState, Stage

ALL = "*"  # the persona of a stage over the whole dataset
CHAIN = (Stage.GENERATE, Stage.CAPTURE, Stage.JUDGE, Stage.MINILM, Stage.VECTORS, Stage.AXIS)
NEEDS: dict[Stage, tuple[Stage, ...]] = {
    Stage.GENERATE: (),
    Stage.CAPTURE: (Stage.GENERATE,),
    Stage.JUDGE: (Stage.GENERATE,),
    Stage.MINILM: (Stage.GENERATE,),
    Stage.VECTORS: (Stage.CAPTURE, Stage.JUDGE),
    Stage.AXIS: (Stage.VECTORS,),
}
DATASET_STAGES = frozenset({Stage.MINILM, Stage.AXIS})
ENGINE_STAGES = frozenset({Stage.GENERATE, Stage.CAPTURE})  # need the job's model loaded
RANK = {s: i for i, s in enumerate(CHAIN)}


def plan(stages: list[str], personas: list[str], *,
         skip: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """The (stage, persona) items of a pipeline job, in claim order.

    ``skip``: personas a stage does not run for (the default persona is not judged, as
    ``3_judge.py --skip_default`` does).
    """
    unknown = [s for s in stages if s not in {c.value for c in CHAIN}]
    if unknown:
        raise SpecInvalid(f"unknown stage(s) {', '.join(unknown)}", field="stages",
                          hint=f"from: {', '.join(c.value for c in CHAIN)}")
    if not personas:
        raise SpecInvalid("a pipeline job needs at least one persona", field="personas")
    skip = skip or {}
    items = []
    for stage in sorted({Stage(s) for s in stages}, key=RANK.get):
        if stage in DATASET_STAGES:
            items.append((stage.value, ALL))
            continue
        items += [(stage.value, p) for p in personas if p not in skip.get(stage.value, ())]
    return items


def create_pipeline_job(session: Session, *, dataset: str, model: str, dtype: str,
                        params: dict, items: list[tuple[str, str]], queue: str | None = None,
                        artifact_prefix: str | None = None) -> Job:
    """A queued pipeline job with one queued item per planned (stage, persona)."""
    from app import jobs
    from app.queues import queue_name

    if not items:
        raise SpecInvalid("nothing to run", field="stages")
    if len(set(items)) != len(items):
        raise SpecInvalid("a (stage, persona) is listed twice", field="stages")
    queue = queue or queue_name(model, dtype)
    now = datetime.now(UTC)
    job = Job(kind=JobKind.PIPELINE.value, dataset=dataset, model=model, dtype=dtype,
              params=dict(params), queue=queue, state=JobState.QUEUED.value,
              items_total=len(items), artifact_prefix=artifact_prefix, created_at=now,
              updated_at=now)
    session.add(job)
    session.flush()
    order = {}
    for stage, persona in items:
        order.setdefault(persona, len(order))
    session.add_all(JobItem(job_id=job.id, stage=stage, persona=persona,
                            position=order[persona], state=ItemState.QUEUED.value)
                    for stage, persona in items)
    session.flush()
    counts = Counter(stage for stage, _ in items)
    jobs.record_event(session, job_id=job.id, kind="state", to_state=JobState.QUEUED.value,
                      message="submitted", data={"items": len(items), "queue": queue,
                                                 "stages": dict(counts)})
    return job


def _rows(session: Session, job_id: str):
    return session.execute(select(JobItem.id, JobItem.stage, JobItem.persona, JobItem.state,
                                  JobItem.position).where(JobItem.job_id == job_id)).all()


def _blockers(row, by_key: dict, by_stage: dict) -> list:
    """The existing items ``row`` needs that have not succeeded."""
    out = []
    for dep in NEEDS[Stage(row.stage)]:
        if row.persona == ALL or dep in DATASET_STAGES:
            out += [r for r in by_stage.get(dep.value, ()) if r.state != ItemState.SUCCEEDED]
        else:
            r = by_key.get((dep.value, row.persona))
            if r is not None and r.state != ItemState.SUCCEEDED:
                out.append(r)
    return out


def _index(rows):
    by_key = {(r.stage, r.persona): r for r in rows}
    by_stage: dict[str, list] = defaultdict(list)
    for r in rows:
        by_stage[r.stage].append(r)
    return by_key, by_stage


def claim(session: Session, *, job: Job, worker: str, lease_s: float,
          stages: frozenset[str] | None = None) -> JobItem | None:
    """Take the first ready queued item (chain order, then persona order) for ``worker``.

    ``stages`` narrows what this worker may take. Races are settled by the guarded UPDATE in
    :func:`app.jobs.transition_item`: a loser moves on to the next ready item.
    """
    from app import jobs

    rows = _rows(session, job.id)
    by_key, by_stage = _index(rows)
    ready = sorted((r for r in rows if r.state == ItemState.QUEUED
                    and (stages is None or r.stage in stages)
                    and not _blockers(r, by_key, by_stage)),
                   key=lambda r: (RANK[Stage(r.stage)], r.position, r.id))
    for r in ready:
        try:
            item = jobs.transition_item(session, item_id=r.id, to=ItemState.RUNNING,
                                        allowed_from=[ItemState.QUEUED], worker=worker,
                                        lease_s=lease_s, message="claimed")
        except InvalidTransition:
            continue
        if job.state == JobState.QUEUED.value:
            try:
                jobs.transition_job(session, job_id=job.id, to=JobState.RUNNING,
                                    allowed_from=[JobState.QUEUED], worker=worker,
                                    message="first claim")
            except InvalidTransition:
                pass
        return item
    return None


def fail_blocked(session: Session, *, job_id: str, worker: str | None = None) -> int:
    """Fail queued items that can never run because an item they need failed or was
    cancelled (transitively). Returns how many were failed."""
    from app import jobs

    failed = 0
    while True:
        rows = _rows(session, job_id)
        by_key, by_stage = _index(rows)
        changed = False
        for r in rows:
            if r.state != ItemState.QUEUED:
                continue
            dead = [b for b in _blockers(r, by_key, by_stage)
                    if b.state in (ItemState.FAILED, ItemState.CANCELLED)]
            if not dead:
                continue
            names = ", ".join(f"{b.stage}/{b.persona} {b.state}" for b in dead[:3])
            try:
                jobs.transition_item(session, item_id=r.id, to=ItemState.FAILED,
                                     allowed_from=[ItemState.QUEUED], worker=worker,
                                     failure_kind=FailureKind.ERROR,
                                     error=f"not run: it needs {names}")
            except InvalidTransition:
                continue
            failed += 1
            changed = True
        if not changed:
            return failed


def stage_progress(session: Session, *, job_id: str) -> dict[str, dict]:
    """Per stage: item counts by state and samples done/total, in chain order."""
    rows = session.execute(select(JobItem.stage, JobItem.state, JobItem.samples_done,
                                  JobItem.samples_total).where(JobItem.job_id == job_id)).all()
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: RANK.get(Stage(r.stage), -1)):
        s = out.setdefault(r.stage, {"items": 0, **{st.value: 0 for st in ItemState},
                                     "samples_done": 0, "samples_total": 0})
        s["items"] += 1
        s[r.state] += 1
        s["samples_done"] += r.samples_done or 0
        s["samples_total"] += r.samples_total or 0
    return out


PIPELINE_PARAMS = ("judge", "responses", "stages", "judge_structured_outputs",
                   "judge_reply_retries")


def check_submit(*, params: dict, dataset, personas: list[str], settings,
                 session=None) -> list[tuple[str, str]]:
    """A pipeline job's own checks at submit; fills ``params["stages"]`` (and
    ``params["responses_prefix"]`` for ``responses``) and returns the planned items.

    Default chain: ``generate`` (or the given responses), ``capture``, ``judge`` when a judge
    model is named, ``vectors``, and ``axis`` for roles datasets.
    """
    judge = params.get("judge") or None
    responses = params.get("responses") or None
    wanted = params.get("stages")
    if wanted is None:
        wanted = ([] if responses else ["generate"]) + ["capture"] + (
            ["judge"] if judge else []) + ["vectors"] + (["axis"] if dataset.kind == "roles"
                                                         else [])
    wanted = list(dict.fromkeys(wanted))
    bad = [s for s in wanted if s not in {c.value for c in CHAIN}]
    if bad or not wanted:
        raise SpecInvalid(f"unknown stage {bad[0]!r}" if bad else "no stage to run",
                          field="params.stages",
                          hint=f"from: {', '.join(c.value for c in CHAIN)}")
    if "judge" in wanted and not (judge or settings.judge.model):
        raise SpecInvalid("the judge stage needs a judge model", field="params.judge",
                          hint="--judge MODEL, or set CHATSPACE_JUDGE_MODEL")
    if "judge" in wanted and not judge:
        params["judge"] = settings.judge.model
    if "judge" in wanted:
        from app.judge.backend import check_judge

        check_judge(params["judge"], settings)
    if responses and "generate" in wanted:
        raise SpecInvalid("given responses replace the generate stage", field="params.stages",
                          hint="drop generate, or drop --responses")
    readers = {"capture", "judge", "minilm"} & set(wanted)
    if readers and "generate" not in wanted and not responses:
        raise SpecInvalid(f"{', '.join(sorted(readers))} needs responses",
                          field="params.stages", hint="add generate, or give --responses JOB")
    for stage, needs in (("vectors", "capture"), ("axis", "vectors")):
        if stage in wanted and needs not in wanted:
            raise SpecInvalid(f"the {stage} stage needs the {needs} stage",
                              field="params.stages", hint=f"add {needs}")
    if "axis" in wanted and dataset.kind != "roles":
        raise SpecInvalid("the assistant axis is computed for roles datasets",
                          field="params.stages", hint=f"{dataset.name} is a {dataset.kind} "
                                                       "dataset: drop axis")
    if "judge" in wanted:
        _check_eval_prompts(dataset, personas)
    if responses:
        params["responses_prefix"] = _responses_prefix(responses, personas, settings, session)
    params["stages"] = wanted
    return plan(wanted, personas)


def _check_eval_prompts(dataset, personas: list[str]) -> None:
    from app.judge.scales import judge_prompt

    missing, broken = [], []
    for name in personas:
        prompt = dataset.persona(name).eval_prompt
        if not prompt:
            missing.append(name)
            continue
        try:
            judge_prompt(prompt, question="q", answer="a")
        except (KeyError, IndexError, ValueError) as exc:
            broken.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        raise SpecInvalid(f"no eval_prompt in persona file(s) {', '.join(missing[:10])}",
                          field="params.judge", hint="add eval_prompt to those persona "
                                                     "files, or drop the judge stage")
    if broken:
        raise SpecInvalid(f"eval_prompt does not fill with {{question}} and {{answer}}: "
                          f"{'; '.join(broken[:5])}", field="params.judge",
                          hint="only {question} and {answer} may be in braces; double "
                               "other braces ({{ }})")


def _responses_prefix(responses: str, personas: list[str], settings, session) -> str:
    """Where the given responses are: an earlier job's, or an uploads/ prefix. Every
    persona must have its file there."""
    from app.artifacts import job_prefix
    from app.responses import UPLOADS
    from app.storage import get_store

    store = get_store(settings)
    if responses.startswith(UPLOADS + "/"):  # app.responses.upload_key: <prefix>/<persona>.jsonl
        prefix, layouts = responses.rstrip("/"), ("{p}/{n}.jsonl",)
    else:
        src = session.get(Job, responses) if session is not None else None
        if src is None:
            raise SpecInvalid(f"no job {responses!r}", field="params.responses",
                              hint="the id of a succeeded rollout or pipeline job")
        if src.state != JobState.SUCCEEDED.value or src.kind not in (JobKind.ROLLOUT.value,
                                                                     JobKind.PIPELINE.value):
            raise SpecInvalid(f"job {responses} is a {src.state} {src.kind} job",
                              field="params.responses",
                              hint="use a succeeded rollout job or a pipeline job that ran "
                                   "generate")
        prefix = src.artifact_prefix or job_prefix(settings, model=src.model,
                                                   dataset=src.dataset, dtype=src.dtype,
                                                   job_id=src.id)
        layouts = ("{p}/responses/{n}.jsonl",) if src.kind == JobKind.PIPELINE.value \
            else ("{p}/{n}.jsonl",)
    missing = [n for n in personas
               if not any(store.exists(lay.format(p=prefix, n=n)) for lay in layouts)]
    if missing:
        raise SpecInvalid(f"no responses for persona(s) {', '.join(missing[:10])} under "
                          f"{prefix}", field="params.responses",
                          hint="give responses for every persona of the job")
    return prefix
