"""The README's main job on the embedded default: SQLite, the filesystem broker, a local
artifact folder and a local worker subprocess started by ``run_local_until_idle``, running
the vLLM engine (``engine.backend=auto``) on the tiny generated Qwen3."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration import worker_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_embedded_default_runs_a_real_capture_job():
    from app.db import session_scope, upgrade
    from app.models import Worker
    from app.settings import get_settings
    from app.vectors import derive_vectors
    from workers.cli import run_local_until_idle

    settings = get_settings()
    assert settings.embedded and settings.broker == "filesystem://"
    upgrade(settings.db_url)
    job_id = h.submit("capture")
    code = run_local_until_idle(job_id, timeout_s=240)
    row = h.job_row(job_id)
    log = settings.data_dir / "logs" / "local-worker.log"
    assert row["state"] == "succeeded", (row, log.read_text()[-4000:] if log.exists() else "")
    assert code == 0
    arts = h.check_artifacts(job_id, row)
    assert any((settings.artifacts_dir / "chatspace").rglob("manifest.json"))
    # the job's end: vectors against the default persona (captured once) and axis.json;
    # no .pt copies unless asked for
    assert any((settings.artifacts_dir / "chatspace").rglob("job_vectors.safetensors"))
    assert any((settings.artifacts_dir / "chatspace").rglob("axis.json"))
    assert not any((settings.artifacts_dir / "chatspace").rglob("*.pt"))
    for art in arts.values():
        assert art.activations.shape[1] == len(art.metadata["layers"]) == 4  # every layer
        persona = art.metadata["persona"]
        again = derive_vectors(art.activations, list(art.keys), kind="traits",
                               persona=persona).vectors
        assert set(again) == set(art.vectors)
        assert ("mean" if persona == "default" else "pos_neg") in again
        for name, vec in again.items():
            np.testing.assert_array_equal(art.vectors[name], vec)
        ref = h.reference_vectors(art)  # the same conversations re-read by transformers
        scale = max(1.0, float(np.abs(ref["activations"]).max()))
        np.testing.assert_allclose(art.activations, ref["activations"], rtol=1e-3,
                                   atol=1e-3 * scale)
    with session_scope() as s:  # the local worker said goodbye and holds nothing
        (worker,) = s.query(Worker).all()
        assert worker.state == "stopped" and worker.model == h.MODEL
        assert worker.model_info == {} or worker.model_info["num_layers"] == 4
