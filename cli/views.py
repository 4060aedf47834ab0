"""Rich renderings of API answers: tables for lists, a detail view, and the live progress
view (per job: bar, personas done/total, rate, ETA, OOMs, worker) used by ``status --watch``
and ``submit --wait``. Pure functions of the JSON, so they render HTTP and in-process alike."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red",
               "cancelled": "magenta"}


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    ts = datetime.fromisoformat(value)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _state(state: str, failure: str | None = None) -> Text:
    label = f"{state}({failure})" if failure else state
    return Text(label, style=STATE_STYLE.get(state, ""))


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def rate_eta(job: dict, now: datetime | None = None) -> tuple[float | None, float | None]:
    """(samples per second since the job started, seconds left) when computable."""
    prog = job.get("progress") or {}
    start = _ts(job.get("started_at"))
    done, total = prog.get("samples_done") or 0, prog.get("samples_total") or 0
    if not start or done <= 0:
        return None, None
    end = _ts(job.get("finished_at")) or now or datetime.now(UTC)
    elapsed = max((end - start).total_seconds(), 1e-3)
    rate = done / elapsed
    eta = (total - done) / rate if total > done and job.get("state") == "running" else None
    return rate, eta


def jobs_table(jobs: list[dict]) -> Table:
    t = Table(title="jobs", expand=False)
    t.add_column("id", no_wrap=True, min_width=32)
    for col in ("kind", "dataset", "model", "dtype", "state", "personas", "created"):
        t.add_column(col)
    for j in jobs:
        p = j.get("progress") or {}
        t.add_row(j["id"], j["kind"], j["dataset"], j["model"], j["dtype"],
                  _state(j["state"], j.get("failure_kind")),
                  f"{p.get('items_done', 0)}/{p.get('items_total', 0)}",
                  (j.get("created_at") or "")[:19])
    return t


def progress_view(jobs: list[dict]) -> Table:
    """One row per job: state, bar over personas, samples, rate, ETA, OOMs, worker."""
    t = Table(title="progress", expand=False)
    t.add_column("job", no_wrap=True, min_width=32)
    for col in ("state", "personas", "", "samples", "rate/s", "eta", "ooms", "worker"):
        t.add_column(col)
    for j in jobs:
        p = j.get("progress") or {}
        done, total = p.get("items_done", 0), p.get("items_total", 0)
        rate, eta = rate_eta(j)
        t.add_row(j["id"], _state(j["state"], j.get("failure_kind")), f"{done}/{total}",
                  ProgressBar(total=max(total, 1), completed=done, width=24),
                  f"{p.get('samples_done', 0)}/{p.get('samples_total', 0)}",
                  "-" if rate is None else f"{rate:.1f}", _dur(eta), str(p.get("ooms", 0)),
                  j.get("worker") or "-")
    return t


def job_detail(job: dict) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for label, value in (("job", job["id"]), ("kind", job["kind"]), ("dataset", job["dataset"]),
                         ("model", f"{job['model']} ({job['dtype']})"),
                         ("state", _state(job["state"], job.get("failure_kind"))),
                         ("artifacts", job.get("artifact_prefix") or "-"),
                         ("created", job.get("created_at") or "-"),
                         ("started", job.get("started_at") or "-"),
                         ("finished", job.get("finished_at") or "-"),
                         ("error", job.get("last_error") or "-")):
        head.add_row(label, value if isinstance(value, Text) else str(value))
    staged = job.get("kind") == "pipeline"
    personas = Table(title="items" if staged else "personas")
    for col in (("stage",) if staged else ()) + ("persona", "state", "samples", "attempt",
                                                  "worker", "error"):
        personas.add_column(col)
    for p in (job.get("progress") or {}).get("personas", []):
        personas.add_row(*((p.get("stage") or "-",) if staged else ()), p["persona"],
                         _state(p.get("state") or "-"),
                         f"{p.get('done') or 0}/{p.get('total') or '?'}", str(p.get("attempt") or 0),
                         p.get("worker") or "-", p.get("error") or "")
    parts = [head, progress_view([job])]
    if staged:
        parts.append(stages_table((job.get("progress") or {}).get("stages") or {}))
    return Group(*parts, personas)


def stages_table(stages: dict) -> Table:
    """A pipeline job's progress per stage, in chain order: items by state, samples."""
    t = Table(title="stages")
    for col in ("stage", "items", "done", "running", "queued", "failed", "samples"):
        t.add_column(col)
    for name, s in stages.items():
        t.add_row(name, str(s.get("items", 0)), str(s.get("succeeded", 0)),
                  str(s.get("running", 0)), str(s.get("queued", 0)),
                  Text(str(s.get("failed", 0)), style="red" if s.get("failed") else ""),
                  f"{s.get('samples_done', 0)}/{s.get('samples_total', 0)}")
    return t


def events_table(events: list[dict]) -> Table:
    t = Table(title="events")
    for col in ("id", "at", "kind", "details"):
        t.add_column(col)
    for e in events:
        data = e.get("data") or {}
        details = ", ".join(f"{k}={v}" for k, v in data.items())
        t.add_row(str(e.get("id")), (e.get("created_at") or "")[:19], e["kind"], details)
    return t


def workers_table(workers: list[dict]) -> Table:
    t = Table(title="workers")
    for col in ("name", "state", "alive", "heartbeat", "gpu", "model", "dtype", "gpu memory",
                "job"):
        t.add_column(col)
    for w in workers:
        mem = w.get("memory") or {}
        memory = (f"{mem.get('used', 0) / 2**30:.1f}/{mem.get('total', 0) / 2**30:.1f} GiB"
                  if mem.get("total") else "-")
        t.add_row(w["name"], w.get("state") or "-", "yes" if w.get("alive") else "no",
                  _dur(w.get("heartbeat_age_s")) + " ago", w.get("gpu") or "cpu",
                  w.get("model") or "-", w.get("dtype") or "-", memory,
                  w.get("current_job_id") or "-")
    return t


def artifacts_table(listing: dict) -> Table:
    t = Table(title=f"artifacts under {listing.get('prefix') or '/'}")
    for col in ("key", "size", "sha256", "modified"):
        t.add_column(col)
    for a in listing.get("artifacts", []):
        t.add_row(a["key"], f"{a['size']:,}", (a.get("sha256") or "-")[:12],
                  (a.get("last_modified") or "")[:19])
    return t


def datasets_table(datasets: list[dict]) -> Table:
    t = Table(title="datasets")
    for col in ("name", "kind", "personas", "samples", "problems", "root"):
        t.add_column(col)
    for d in datasets:
        t.add_row(d["name"], d["kind"], str(d["personas"]), str(d["samples"]),
                  str(d.get("problems", 0)), d["root"])
    return t
