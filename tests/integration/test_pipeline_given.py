"""Capture of given responses: a pipeline job with no generate stage re-reads an earlier
job's responses in one exact prefill pass (the public ``2_activations.py`` step), judges
them, and derives the vectors with those scores.

Real parts: Postgres, Redis, a real Celery worker (transformers backend, tiny model), the
local artifact folder, a scripted OpenAI-compatible judge on 127.0.0.1. The check of
exactness: the given-responses capture equals the capture the first job made of the same
responses right after generating them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.integration import worker_helpers as h
from tests.integration.test_pipeline_resume import services  # noqa: F401  (fixture)
from tests.scripted_openai import Action, ScriptedServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _pipeline(**params) -> tuple[str, str]:
    from app.db import session_scope
    from app.settings import get_settings
    from app.spec import JobSpec
    from app.submit import submit_job
    from workers.dispatch import enqueue_job

    spec = JobSpec(dataset=h.DATASET, model=h.MODEL, dtype=h.DTYPE,
                   params={**h.PARAMS, "max_samples": 4, **params})
    with session_scope() as s:
        job = submit_job(s, request=spec, settings=get_settings(), enqueue=enqueue_job)
        return str(job.id), job.artifact_prefix


def test_given_responses_are_captured_exactly_and_judged(services, monkeypatch):  # noqa: F811
    from app.artifacts import read_persona_artifact
    from app.settings import get_settings
    from app.storage import get_store

    tmp = services
    with ScriptedServer(lambda req, n: Action(text="80")) as srv:
        monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", srv.base_url)
        first_id, first = _pipeline(stages=["generate", "capture"])
        worker = h.start_worker("given-w", tmp / "logs")
        try:
            row = h.wait_for(first_id, timeout=600, log_dir=tmp / "logs", worker=worker)
            assert row["state"] == "succeeded", row
            second_id, second = _pipeline(judge="judge-m", responses=first_id)
            row = h.wait_for(second_id, timeout=600, log_dir=tmp / "logs", worker=worker)
        finally:
            h.stop(worker)
        assert row["state"] == "succeeded", row
        assert len(srv.received) == 3 * 4  # one judge request per given response
    store = get_store(get_settings())
    a = read_persona_artifact(store.get_bytes(f"{first}/activations/curious.safetensors"))
    b = read_persona_artifact(store.get_bytes(f"{second}/activations/curious.safetensors"))
    assert a.keys == b.keys and len(a.keys) == 4
    np.testing.assert_allclose(b.activations, a.activations, rtol=1e-5, atol=1e-6)
    assert not store.list(f"{second}/responses/")  # nothing generated
    scores = json.loads(store.get_bytes(f"{second}/scores/curious.json"))
    assert scores == dict.fromkeys(a.keys, 80)
    summary = json.loads(store.get_bytes(f"{second}/scores/judge_summary.json"))
    assert summary["total"]["requests"] == 12 and summary["total"]["counts"]["scored"] == 12
    assert sorted(summary["personas"]) == ["curious", "optimistic", "sycophantic"]
