"""The README's main job on the embedded default: SQLite, the filesystem broker, a local
artifact folder and a local worker subprocess started by ``run_local_until_idle``."""

from __future__ import annotations

import pytest

pytest.importorskip("app.jobs", reason="foundation (app.jobs) not in the tree yet")
pytest.importorskip("workers.engine.engine", reason="steering engine not in the tree yet")

from tests.integration import worker_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_embedded_default_runs_a_real_capture_job():
    from app.db import upgrade

    from app.settings import get_settings
    from workers.cli import run_local_until_idle

    settings = get_settings()
    assert settings.embedded and settings.broker == "filesystem://"
    upgrade(settings.db_url)
    job_id = h.submit("capture")
    code = run_local_until_idle(job_id, timeout_s=240)
    row = h.job_row(job_id)
    log = (settings.data_dir / "logs" / "local-worker.log")
    assert row["state"] == "succeeded", (row, log.read_text()[-4000:] if log.exists() else "")
    assert code == 0
    arts = h.check_artifacts(job_id)
    assert (settings.artifacts_dir).exists()
    for art in arts.values():
        assert art.activations.shape[1] == len(art.metadata["layers"])
        assert "pos_neg" in art.vectors
