"""The web page: jobs with live per-persona progress, events and errors, workers with their
GPUs and memory, an artifact browser with download links, a capture job's analysis plots, and
a sweep job's score-versus-scale curve with its summary table.

Server-rendered (jinja2) from the same rows the JSON API reads; one small script refreshes
a running job's progress. Every asset is served from this package (no CDN), and so is
``/docs``: Swagger UI's files come from the ``fastapi-offline`` package, not a CDN.

Auth is the API's bearer tokens: a browser cannot send a header from a link, so the login
form stores the token in an HttpOnly, SameSite=Strict cookie, which these pages (and only
these) accept besides the ``Authorization`` header.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.api.deps import check_token
from app.errors import ChatspaceError

HERE = Path(__file__).parent
COOKIE = "chatspace_token"
TERMINAL = ("succeeded", "failed", "cancelled")
ERROR_EVENTS = ("oom_retry", "oom_failed", "lost", "error", "engine_error", "start_failed")
# the sweep table's columns on the job page (a column shows when any row has it)
SWEEP_COLUMNS = (("persona", "persona"), ("point", "point"), ("layer", "layer"),
                 ("scale", "scale"), ("percentile", "cap percentile"), ("threshold", "floor"),
                 ("n", "samples"), ("judge_mean", "mean judge score"),
                 ("refusal_rate", "refusal rate"), ("unparseable", "unparseable"),
                 ("minilm_mean", "MiniLM"), ("mean_response_tokens", "mean tokens"),
                 ("mean_response_chars", "mean chars"))
PLOT_ORDER = ("norms", "explained_variance", "pca", "cosine", "axis")
router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))


class LoginRequired(Exception):
    def __init__(self, path: str):
        self.path = path


def _authed(request: Request) -> bool:
    tokens = request.app.state.settings.api_tokens
    if not tokens:
        return True
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    presented = value.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE)
    return check_token(presented, tokens)


def require_login(request: Request) -> None:
    if not _authed(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)


# -- formatting helpers used by the templates ------------------------------------------------
def human_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(value) -> str:
    if not value:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pct(done, total) -> int:
    return round(100 * (done or 0) / total) if total else 0


templates.env.filters.update(bytes=human_bytes, when=when, q=lambda s: quote(str(s), safe=""),
                             tojson_pretty=lambda v: json.dumps(v, indent=1, default=str))
templates.env.globals.update(pct=pct, TERMINAL=TERMINAL)


def _page(request: Request, name: str, **ctx) -> HTMLResponse:
    auth = bool(request.app.state.settings.api_tokens)
    return templates.TemplateResponse(request, name, {"auth": auth, **ctx})


def _session(request: Request):
    return request.app.state.session_factory()


def _store(request: Request):
    from app.api.deps import get_store_dep

    return get_store_dep(request)


def _plot_rank(name: str):
    rank = next((i for i, p in enumerate(PLOT_ORDER) if name.startswith(p)), len(PLOT_ORDER))
    digits = "".join(c for c in name if c.isdigit())
    return rank, int(digits) if digits else 0


# -- login ------------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui/", error: str | None = None):
    return _page(request, "login.html", next=_safe_next(next), error=error)


@router.post("/login")
async def login(request: Request):
    form = parse_qs((await request.body()).decode(errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or ["/ui/"])[0])
    tokens = request.app.state.settings.api_tokens
    if tokens and not check_token(token, tokens):
        return _page(request, "login.html", next=target,
                     error="That token is not accepted by this API (CHATSPACE_API_TOKENS).")
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
    return resp


@router.get("/logout")
def logout():
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


def _safe_next(target: str) -> str:
    """Only paths on this site (no //host, no scheme): a login link cannot send you away."""
    return target if target.startswith("/") and not target.startswith("//") else "/ui/"


# -- pages ------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, state: str | None = None):
    from app import jobs
    from app.api.views import job_out

    require_login(request)
    with _session(request) as s:
        rows = [job_out(j, s) for j in jobs.list_jobs(s, state=state or None, limit=200)]
    live = any(j.state not in TERMINAL for j in rows)
    return _page(request, "jobs.html", jobs=rows, state=state, live=live)


def _job_context(request: Request, job_id: str) -> dict:
    from app import jobs
    from app.api.views import event_out, job_out

    with _session(request) as s:
        job = job_out(jobs.get_job(s, job_id=job_id), s)
        events = [event_out(e) for e in jobs.list_events(s, job_id=job_id, limit=10000)]
    errors = [e for e in events if e.kind in ERROR_EVENTS or (isinstance(e.data, dict) and (
        e.data.get("error") or e.data.get("to_state") == "failed"))]
    return {"job": job, "events": events[::-1], "errors": errors}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str):
    require_login(request)
    ctx = _job_context(request, job_id)
    job, store = ctx["job"], _store(request)
    manifest, analyses, vector_names = None, {}, []
    if job.artifact_prefix:
        from app.analysis import load_analysis, stored_vectors

        manifest = store.read_manifest(job.artifact_prefix)
        for vector in stored_vectors(store, job.artifact_prefix):
            found = load_analysis(store, job.artifact_prefix, vector)
            if found:
                found["plots"] = sorted(found.get("plots", []), key=_plot_rank)
                analyses[vector] = found
        for entry in (manifest or {}).get("artifacts", []):
            for name in (entry.get("shapes") or {}):
                if name.startswith("vectors.") and name[8:] not in vector_names:
                    vector_names.append(name[8:])
    sweep = None
    if (job.params or {}).get("sweep"):  # the score-versus-scale curve and its table
        from app.api.sweeps import sweep_table

        with _session(request) as s:
            sweep = sweep_table(s, store, job_id)
        sweep["columns"] = [(c, h) for c, h in SWEEP_COLUMNS if any(
            c in r or (c == "unparseable" and r.get("judge")) for r in sweep["rows"])]
        sweep["reasons"] = sorted({v["reason"] for v in sweep["scores"].values()
                                   if not v.get("computed")})
    return _page(request, "job.html", **ctx, manifest=manifest, analyses=analyses,
                 vector_names=sorted(vector_names), sweep=sweep,
                 can_analyze=job.kind == "capture" and job.state == "succeeded")


@router.get("/jobs/{job_id}/sweep.png")
def job_sweep_png(request: Request, job_id: str):
    """The sweep's plot for the page's <img>: GET /jobs/{id}/sweep.png (app/api/sweeps.py)
    behind the page's login, since an image link cannot send the bearer header."""
    from app.api.sweeps import sweep_png

    require_login(request)
    with _session(request) as s:
        return sweep_png(job_id, s, _store(request))


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, job_id: str):
    """The running part of the job page (progress, personas, events), polled by ui.js."""
    require_login(request)
    return _page(request, "job_live.html", **_job_context(request, job_id))


@router.post("/jobs/{job_id}/analyze")
async def job_analyze(request: Request, job_id: str):
    from app.analysis import analyze_job

    require_login(request)
    form = parse_qs((await request.body()).decode(errors="replace"))
    vector = (form.get("vector") or ["pos_neg"])[0]
    with _session(request) as s:
        analyze_job(s, _store(request), job_id=job_id, vector=vector)
    return RedirectResponse(f"/ui/jobs/{job_id}#analysis-{quote(vector)}", status_code=303)


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request):
    from app import jobs
    from app.api.views import worker_out

    require_login(request)
    stale = request.app.state.settings.worker_stale_s
    with _session(request) as s:
        rows = [worker_out(w, stale_s=stale) for w in jobs.list_workers(s)]
    return _page(request, "workers.html", workers=rows)


@router.get("/artifacts", response_class=HTMLResponse)
def artifacts_page(request: Request, prefix: str = ""):
    from app.api.artifacts import artifact_prefix

    require_login(request)
    prefix = artifact_prefix(prefix, request.app.state.settings)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    store = _store(request)
    folders = store.folders(prefix)
    objects = store.list(prefix, recursive=False)
    crumbs, acc = [], ""
    for part in [p for p in prefix.split("/") if p]:
        acc += part + "/"
        crumbs.append((part, acc))
    return _page(request, "artifacts.html", prefix=prefix, folders=folders, objects=objects,
                 crumbs=crumbs)


@router.get("/file")
def file(request: Request, key: str, download: int = 1):
    """One artifact's bytes (a download, or inline for the plots)."""
    from app.api.artifacts import artifact_key, stream_artifact

    require_login(request)
    return stream_artifact(_store(request), artifact_key(key, request.app.state.settings),
                           attachment=bool(download))


# -- wiring -----------------------------------------------------------------------------------
def install(app: FastAPI) -> None:
    """Mount the pages, their static files and an offline ``/docs`` (create_app passes
    ``docs_url=None``); ``/`` goes to the jobs page."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html

    docs_static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/ui/static/docs", StaticFiles(directory=str(docs_static)), name="docs-static")
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="ui-static")
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url="/ui/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/ui/static/docs/swagger-ui.css",
                                   swagger_favicon_url="/ui/static/docs/favicon.png")

    @app.exception_handler(LoginRequired)
    async def to_login(_request: Request, exc: LoginRequired):
        return RedirectResponse(f"/ui/login?next={quote(exc.path, safe='')}", status_code=303)

    @app.exception_handler(ChatspaceError)
    async def html_errors(request: Request, exc: ChatspaceError):
        """On a page, an error (no such job, a bad prefix) is a readable page; elsewhere the
        API's JSON body, unchanged."""
        from app.api.errors import chatspace_error

        if not request.url.path.startswith("/ui/"):
            return await chatspace_error(request, exc)
        return templates.TemplateResponse(request, "error.html", {
            "auth": bool(request.app.state.settings.api_tokens), "error": exc},
            status_code=exc.http_status)
