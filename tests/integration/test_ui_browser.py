"""The web page in a real browser: Debian's Chromium driven by Playwright, against the real
API (uvicorn in a subprocess) on a real finished capture job (tests/integration/
finished_job.py). The tests log in, follow links, read what a person would see, download a
file, and save screenshots under tests/output/screenshots/ (two of them are in docs/).

Chromium comes from Debian's ``chromium`` package (scripts/setup.sh installs it); Playwright
never downloads a browser here (`playwright install` is not run)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_port
from tests.integration.finished_job import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("CHATSPACE_TEST_OUTPUT", ROOT / "tests" / "output")) / "screenshots"


@pytest.fixture
def server(finished_job, tmp_path):
    """``uvicorn --factory app.api:create_app`` in its own process on the job's services."""
    port = free_port()
    env = {**os.environ, **finished_job.env, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "uvicorn.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                                 "app.api:create_app", "--host", "127.0.0.1", "--port",
                                 str(port), "--log-level", "warning"], cwd=str(ROOT), env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's "
                    "chromium package)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A logged-out page that records every URL it requests (to prove nothing leaves us)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  accept_downloads=True)
    pg = context.new_page()
    pg.requested = []
    pg.on("request", lambda r: pg.requested.append(r.url))
    pg.set_default_timeout(60000)
    yield pg
    context.close()


def _login(page, server, token=TOKEN):
    page.goto(f"{server}/")
    assert "/ui/login" in page.url  # the API's bearer auth guards the pages too
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")


def _only_local(page, server):
    foreign = [u for u in page.requested
               if not u.startswith(server) and not u.startswith(("data:", "blob:"))]
    assert foreign == [], foreign


def test_a_person_follows_a_finished_job_to_its_plots_and_files(page, server, finished_job,
                                                                tmp_path, monkeypatch):
    _login(page, server, token="not-the-token")
    assert "not accepted" in page.inner_text(".error")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")

    row = page.locator(f"tr[data-job='{finished_job.job_id}']")
    # three traits and the default persona, captured once per job (#10)
    assert "succeeded" in row.inner_text() and "4/4" in row.inner_text()
    assert "traits_sample" in row.inner_text() and "tiny:qwen3" in row.inner_text()
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)

    row.locator("a").first.click()
    assert page.locator("h1").inner_text() == f"Job {finished_job.job_id}"
    assert page.locator("#personas tbody tr").count() == 4
    for name in ["curious", "optimistic", "sycophantic", "default"]:
        text = page.locator(f"#personas tr[data-persona='{name}']").inner_text()
        assert name in text and "succeeded" in text
    for name in ["curious", "optimistic", "sycophantic"]:
        assert "4/4" in page.locator(f"#personas tr[data-persona='{name}']").inner_text()
    assert page.locator("#events tbody tr").count() >= 8  # submitted, claims, completions
    assert "succeeded" in page.inner_text("#job-state")

    page.select_option("select[name=vector]", "pos_neg")
    page.click("button:has-text('analysis')")
    section = page.locator("#analysis-pos_neg")
    section.wait_for()
    images = section.locator("img")
    assert images.count() >= 10  # norms, variance, 4 PCA scatters, 4 cosine heatmaps
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 200 for w in widths), widths
    captions = section.locator("figcaption").all_inner_texts()
    assert captions[:2] == ["norms.png", "explained_variance.png"]
    assert "pca_layer0.png" in captions and "cosine_layer3.png" in captions
    assert section.locator("tbody tr").count() == 4  # one row of explained variance per layer
    page.screenshot(path=str(SHOTS / "job.png"), full_page=True)

    from app.storage import get_store

    finished_job.apply(monkeypatch)
    manifest = get_store().read_manifest(finished_job.prefix)
    want = next(e["sha256"] for e in manifest["artifacts"]
                if e["key"].endswith("/curious.safetensors"))
    with page.expect_download() as dl:
        page.locator("#files a", has_text="curious.safetensors").click()
    saved = tmp_path / "curious.safetensors"
    dl.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == want

    page.locator("dd a", has_text=finished_job.prefix).click()  # the artifact browser
    assert page.locator("#listing tr.folder", has_text="analysis/").count() == 1
    page.locator("#listing a", has_text="analysis/").click()
    page.locator("#listing a", has_text="pos_neg/").click()
    names = page.locator("#listing tr.object td:first-child").all_inner_texts()
    assert {"analysis.json", "manifest.json", "pca_layer0.png"} <= set(names)
    page.screenshot(path=str(SHOTS / "artifacts.png"), full_page=True)

    page.click("nav >> text=Workers")
    worker = page.locator("tr[data-worker='results-w']")
    assert worker.count() == 1 and "tiny:qwen3" in worker.inner_text()
    page.screenshot(path=str(SHOTS / "workers.png"), full_page=True)
    _only_local(page, server)


def test_progress_and_errors_appear_live_without_a_reload(page, server, finished_job,
                                                          monkeypatch):
    """A job moving in the database (through the service layer, as a worker moves it) shows
    on an open page within a few seconds: the claimed persona's samples, then its error."""
    from app import jobs
    from app.db import dispose_all, session_scope

    finished_job.apply(monkeypatch)
    with session_scope() as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="tiny:qwen3",
                              dtype="float32", params={"max_samples": 4},
                              personas=["curious", "optimistic"])
        job_id = str(job.id)
    _login(page, server)
    page.goto(f"{server}/ui/jobs/{job_id}")
    assert "queued" in page.inner_text("#job-state")
    assert "waiting for a worker" in page.inner_text("#live")
    page.evaluate("window.__marker = 'same page'")
    with session_scope() as s:
        item = jobs.claim_item(s, job_id=job_id, worker="ui-test-worker", lease_s=60)
        jobs.update_item_progress(s, item_id=item.id, done=3, total=4)
        item_id, attempt = item.id, item.attempt
    first = page.locator("#personas tr[data-persona='curious']")
    page.wait_for_function("document.querySelector(\"#personas tr[data-persona='curious']\")"
                           ".innerText.includes('3/4')", timeout=15000)
    assert "running" in first.inner_text() and "ui-test-worker" in first.inner_text()
    assert "running" in page.inner_text("#job-state")
    with session_scope() as s:
        jobs.fail_item(s, item_id=item_id, attempt=attempt, worker="ui-test-worker",
                       failure_kind="oom", error="CUDA out of memory at batch size 1 "
                       "(tried 4, 2, 1)", requeue=False)
    page.wait_for_function("document.querySelector('#personas').innerText"
                           ".includes('CUDA out of memory')", timeout=15000)
    assert page.evaluate("window.__marker") == "same page"  # updated in place, no reload
    assert "failed" in first.inner_text()
    page.screenshot(path=str(SHOTS / "live-error.png"), full_page=True)
    dispose_all()
    _only_local(page, server)


def _minilm_job() -> str:
    """A pipeline job row whose minilm stage succeeded, its minilm.json a classifier the
    real packaged all-MiniLM-L6-v2 trained (app.minilm.score_dataset) on prompted vs plain
    answers, stored in the test's S3 bucket."""
    import json

    from app import stages
    from app.db import session_scope
    from app.minilm import Rollout, score_dataset
    from app.models import JobItem
    from app.storage import get_store

    pos = [f"Oh, how wonderful, {t}! I love asking why it works." for t in
           ("bread", "tides", "music", "stars", "coffee", "gardens")]
    plain = [f"{t.capitalize()} is a topic. A short neutral note." for t in
             ("bread", "tides", "music", "stars", "coffee", "gardens")]
    out = score_dataset([Rollout("curious", f"pos_p0_q{i}", "pos", t) for i, t in enumerate(pos)]
                        + [Rollout("curious", f"default_p0_q{i}", "default", t)
                           for i, t in enumerate(plain)])
    with session_scope() as s:
        job = stages.create_pipeline_job(s, dataset="traits_sample", model="tiny:qwen3",
                                         dtype="float32", params={"stages": ["minilm"]},
                                         items=[("minilm", "*")])
        job_id = str(job.id)
        obj = get_store().put_bytes(f"ui-test/{job_id}/minilm.json", json.dumps(out).encode(),
                                    content_type="application/json", overwrite=True)
        item = s.query(JobItem).filter_by(job_id=job_id).one()
        item.state, item.artifact_key, item.artifact_sha256 = "succeeded", obj.key, obj.sha256
    return job_id


def test_a_sweep_job_shows_its_score_curve_and_table(page, server, finished_job,
                                                    monkeypatch, tmp_path):
    """A real sweep (a Celery worker steering with the finished capture job's pos_neg
    vector at three scales, judged by a scripted OpenAI-compatible server on 127.0.0.1):
    its page shows the score-versus-scale plot (GET /ui/jobs/{id}/sweep.png, the API's
    /jobs/{id}/sweep.png behind the page login) and the summary table with judge scores."""
    from app.api.schemas import JobSubmit
    from app.db import dispose_all, session_scope
    from app.settings import get_settings
    from app.submit import submit_job
    from tests.integration import worker_helpers as h
    from tests.scripted_openai import Action, ScriptedServer, answer_of
    from workers.dispatch import enqueue_job

    finished_job.apply(monkeypatch)
    classifier_job = _minilm_job()
    with ScriptedServer(lambda req, n: Action(text=str(
            len(answer_of(req["messages"][0]["content"])) * 7 % 101))) as judge:
        monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", judge.base_url)
        get_settings.cache_clear()
        with session_scope() as s:
            job = submit_job(s, request=JobSubmit(
                kind="rollout", dataset=h.DATASET, model=h.MODEL, dtype=h.DTYPE,
                params={"max_samples": 2, "max_tokens": 6, "temperature": 0.0, "seed": 0,
                        "judge": "judge-m", "sweep": {"source": finished_job.job_id,
                                                      "vector": "pos_neg", "layers": [2],
                                                      "scales": [-4, 0, 4],
                                                      "minilm_from": classifier_job}}),
                settings=get_settings(), enqueue=lambda _id: None)
            job_id = str(job.id)
        enqueue_job(job_id)
        worker = h.start_worker("ui-sweep-w", tmp_path / "logs")
        try:
            row = h.wait_for(job_id, log_dir=tmp_path / "logs", worker=worker, timeout=240)
        finally:
            h.stop(worker)
        assert row["state"] == "succeeded", row
        assert len(judge.received) >= 3 * 3 * 2  # personas x scales x samples
    dispose_all()

    _login(page, server)
    page.goto(f"{server}/ui/jobs/{job_id}")
    assert page.locator("#sweep").count() == 1
    assert "judged by judge-m" in page.inner_text("body")
    plot = page.locator("#sweep-plot")
    page.wait_for_function("document.getElementById('sweep-plot').complete")
    assert plot.evaluate("i => i.naturalWidth") > 600  # the PNG decoded, two panels wide
    assert plot.get_attribute("alt").startswith("sweep: judge_mean")  # judge score plotted
    heads = page.locator("#sweep-table thead th").all_inner_texts()
    assert heads[:4] == ["persona", "point", "layer", "scale"]
    assert {"mean judge score", "refusal rate", "unparseable"} <= set(heads)
    rows = page.locator("#sweep-table tbody tr")
    assert rows.count() == 9  # 3 personas x 3 scales
    judge_col = heads.index("mean judge score")
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[0] in ("curious", "optimistic", "sycophantic")
        assert 0 <= float(cells[judge_col]) <= 100  # a number, not null
        minilm = float(cells[heads.index("MiniLM")])
        assert 0 < minilm < 1  # P(prompted) under the stored classifier
    assert "null scores" not in page.inner_text("body")
    page.screenshot(path=str(SHOTS / "sweep.png"), full_page=True)
    _only_local(page, server)


def test_api_docs_are_served_without_a_cdn(page, server):
    """Behind the API's token like every route: the page's login cookie opens them."""
    assert page.goto(f"{server}/docs").status == 401
    _login(page, server)
    page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock")
    text = page.inner_text("body")
    assert "/jobs/{job_id}/analysis" in text and "/artifacts/content" in text
    page.screenshot(path=str(SHOTS / "docs.png"))
    _only_local(page, server)
    assert any(u.endswith("/ui/static/docs/swagger-ui-bundle.js") for u in page.requested)


def teardown_module(_module):
    """Keep the two screenshots the README shows in step with what the tests saw."""
    if os.environ.get("CHATSPACE_UPDATE_DOCS_SCREENSHOTS"):
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        for name in ("job.png", "live-error.png"):
            if (SHOTS / name).exists():
                shutil.copy(SHOTS / name, docs / f"ui-{name}")
