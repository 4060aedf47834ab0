"""A sweep job's summary table and plot (``GET /jobs/{id}/sweep``, ``/jobs/{id}/sweep.png``).

A finished sweep serves what its worker stored (``sweep_summary.json``, ``sweep.png``, both
checked against their recorded sha256). While personas are still running the table is
assembled from the persona summaries stored so far (``complete: false``) and the plot is
drawn from them on request, so a researcher can look at the curve before the last persona.
"""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.deps import Auth, SessionDep, StoreDep
from app.api.jobs import ERRORS, JobId, load_job
from app.errors import ArtifactNotFound, InvalidTransition

router = APIRouter(prefix="/jobs", tags=["sweeps"], dependencies=[Auth])


def _stored(session, job_id: str) -> dict[str, tuple[str, str]]:
    """kind -> (key, sha256) of the job's recorded artifacts."""
    from sqlalchemy import select

    from app.models import Artifact

    rows = session.execute(select(Artifact).where(Artifact.job_id == job_id)).scalars()
    return {a.kind: (a.key, a.sha256) for a in rows if a.item_id is None}


def sweep_table(session, store, job_id: str) -> dict:
    """The sweep's table: stored when the job finished, else built from the personas done."""
    from sqlalchemy import select

    from app import sweeps
    from app.models import JobItem

    job = load_job(session, job_id)
    spec = (job.params or {}).get("sweep")
    if not spec:
        raise InvalidTransition(f"job {job_id} is not a sweep", field="job_id",
                                hint="submit with --steer-from/--scales or --cap-axis")
    stored = _stored(session, job_id)
    if "sweep_summary" in stored:
        key, sha = stored["sweep_summary"]
        table = json.loads(store.get_bytes(key, expect_sha256=sha))
        complete = True
    else:
        items = session.execute(select(JobItem).where(JobItem.job_id == job_id,
                                                      JobItem.state == "succeeded")
                                ).scalars().all()
        summaries = [json.loads(store.get_bytes(i.artifact_key, expect_sha256=i.artifact_sha256))
                     for i in items if i.artifact_key]
        rows = sweeps.summary_table(summaries)
        table = {"job_id": job_id, "spec": spec, "scores": sweeps.job_scores(summaries),
                 "plotted": sweeps.plot_metrics(rows) if rows else [], "rows": rows}
        complete = False
    summary_key, plot_key = sweeps.summary_keys(job.artifact_prefix or "")
    return {**table, "state": job.state, "complete": complete,
            "summary_key": summary_key if complete else None,
            "plot_key": plot_key if "sweep_plot" in stored else None}


@router.get("/{job_id}/sweep", responses={**ERRORS, 409: {"description": "not a sweep"}})
def sweep(job_id: JobId, session: SessionDep, store: StoreDep) -> dict:
    return sweep_table(session, store, job_id)


@router.get("/{job_id}/sweep.png", response_class=Response,
            responses={**ERRORS, 200: {"content": {"image/png": {}}},
                       409: {"description": "not a sweep"}})
def sweep_png(job_id: JobId, session: SessionDep, store: StoreDep) -> Response:
    from app import sweeps

    table = sweep_table(session, store, job_id)
    stored = _stored(session, job_id)
    if "sweep_plot" in stored:
        key, sha = stored["sweep_plot"]
        return Response(store.get_bytes(key, expect_sha256=sha), media_type="image/png")
    if not table["rows"]:
        raise ArtifactNotFound(f"sweep {job_id} has no finished persona yet", field="job_id",
                               hint=f"`chatspace-jobs status {job_id} --watch`")
    return Response(sweeps.render_plot(table["rows"], title=f"sweep {job_id[:8]} (partial)"),
                    media_type="image/png")
