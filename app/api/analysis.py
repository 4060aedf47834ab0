"""Analysis routes: compute (and store) or read the per-layer PCA, cosine similarities and
axis projections of a finished capture job's persona vectors (:mod:`app.analysis`).

Computed on demand in the API process: it reads only the persona artifacts. A worker-side
stage kind (so a pipeline runs it after the capture without anyone asking) can come later.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import Auth, SessionDep, StoreDep
from app.api.jobs import JobId, load_job
from app.errors import NotFound

router = APIRouter(prefix="/jobs", tags=["analysis"], dependencies=[Auth])
Vector = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                              description="which persona vector (pos_neg, pos_all, ...)")]
ERRORS = {401: {"description": "no or bad token"}, 404: {"description": "no such job or analysis"},
          409: {"description": "not a succeeded capture job"}}


class AnalysisNotFound(NotFound):
    code = "analysis_not_found"


@router.post("/{job_id}/analysis", response_model=dict[str, Any], responses=ERRORS)
def compute(job_id: JobId, session: SessionDep, store: StoreDep,
            vector: Vector = "pos_neg") -> dict:
    """Compute the analysis of a succeeded capture job, store it beside the job's artifacts
    (JSON, safetensors, PNG plots, a manifest) and return its summary."""
    from app.analysis import analyze_job

    load_job(session, job_id)
    return analyze_job(session, store, job_id=job_id, vector=vector)


@router.get("/{job_id}/analysis", response_model=dict[str, Any], responses=ERRORS)
def read(job_id: JobId, session: SessionDep, store: StoreDep,
         vector: Vector = "pos_neg") -> dict:
    """The stored analysis summary (404 until one was computed)."""
    from app.analysis import load_analysis

    job = load_job(session, job_id)
    found = load_analysis(store, job.artifact_prefix, vector) if job.artifact_prefix else None
    if found is None:
        raise AnalysisNotFound(f"job {job_id} has no stored {vector!r} analysis",
                               field="vector",
                               hint=f"POST /jobs/{job_id}/analysis or `chatspace-jobs analyze`")
    return found
