"""End-of-scenario checks and the figures each scenario reports.

Every scenario ends with :func:`verify_jobs`: it reads the job rows, items, artifact rows and
events from Postgres and the objects themselves from the store, and checks what a researcher
relies on — every persona of a succeeded job has exactly one artifact whose bytes hash to the
sha256 the manifest AND the database record; no job is left queued/running; a failed job
has no manifest and says why. It returns the figures for the report table (lost and
duplicates must be 0), so the table is computed by the same code that asserts.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}
REPORT_ENV = "CHATSPACE_TEST_RELIABILITY_REPORT"


@dataclass
class Figures:
    scenario: str
    jobs: int = 0
    personas_expected: int = 0
    personas_stored: int = 0
    duplicates: int = 0
    lost: int = 0
    recovery_s: float | None = None
    p99_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    # figures a scenario measures beyond the common columns, {name: value}: the report's
    # second table (seconds until every idle worker claimed, max broker queue length, ...)
    measures: dict = field(default_factory=dict)

    def record(self) -> None:
        """Append this row to the report file named by CHATSPACE_TEST_RELIABILITY_REPORT."""
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(asdict(self)) + "\n")


def job_state(job_id: str) -> dict:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job, JobEvent, JobItem

    with session_scope() as s:
        job = s.get(Job, job_id)
        items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
        events = s.execute(select(JobEvent).where(JobEvent.job_id == job_id)
                           .order_by(JobEvent.id)).scalars().all()
        return {"id": job_id, "kind": job.kind, "state": job.state, "failure_kind": job.failure_kind,
                "error": job.error, "prefix": job.artifact_prefix,
                "items": [{"id": i.id, "persona": i.persona, "state": i.state,
                           "attempt": i.attempt, "key": i.artifact_key,
                           "sha256": i.artifact_sha256, "lease_owner": i.lease_owner}
                          for i in items],
                "events": [{"kind": e.kind, "to": e.to_state, "item": e.item_id,
                            "data": e.data or {}, "message": e.message} for e in events]}


def wait_jobs(job_ids, *, timeout: float, until=None, logs=None) -> dict[str, dict]:
    """Poll Postgres until every job is terminal (or ``until(rows)``); dump logs if not."""
    deadline = time.monotonic() + timeout
    rows = {}
    while time.monotonic() < deadline:
        try:
            rows = {j: job_state(j) for j in job_ids}
        except Exception:  # noqa: BLE001 - the database may be the thing that is down
            time.sleep(0.5)
            continue
        if until is not None and until(rows):
            return rows
        if until is None and all(r["state"] in TERMINAL for r in rows.values()):
            return rows
        time.sleep(0.3)
    tail = logs() if logs else ""
    summary = {j: (r["state"], [(i["persona"], i["state"], i["attempt"]) for i in r["items"]])
               for j, r in rows.items()}
    raise AssertionError(f"jobs not done after {timeout}s: {summary}\n{tail}")


def verify_jobs(job_ids, *, scenario: str, expect: str = "succeeded",
                failure_kind: str | None = None) -> Figures:
    """Check every job's final state against the store; return the table's figures."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Artifact
    from app.settings import get_settings
    from app.storage import get_store

    store = get_store(get_settings())
    fig = Figures(scenario=scenario, jobs=len(job_ids))
    for job_id in job_ids:
        row = job_state(job_id)
        assert row["state"] in TERMINAL, f"job {job_id} stuck in {row['state']}"
        assert row["state"] == expect, (job_id, row["state"], row["failure_kind"], row["error"])
        if failure_kind:
            assert row["failure_kind"] == failure_kind, row
        for item in row["items"]:
            assert item["state"] in TERMINAL | {"queued"}, f"item stuck: {item}"
            assert item["lease_owner"] is None, f"a lease outlived its job: {item}"
        with session_scope() as s:
            arts = s.execute(select(Artifact.key, Artifact.sha256)
                             .where(Artifact.job_id == job_id)).all()
        art_rows = Counter(k for k, _ in arts)
        art_sha = dict(arts)
        objects = store.list(row["prefix"].rstrip("/") + "/")
        manifest = store.read_manifest(row["prefix"])
        done_events = Counter(e["item"] for e in row["events"] if e["to"] == "succeeded"
                              and e["item"] is not None)
        if expect != "succeeded":
            assert manifest is None, f"job {job_id} is {row['state']} but has a manifest"
            for item in row["items"]:  # items that did finish are still intact and single
                if item["state"] == "succeeded":
                    fig.personas_stored += _check_persona(store, row["kind"], item, objects,
                                                          art_rows, art_sha, None)
            fig.duplicates += sum(max(0, n - 1) for n in done_events.values())
            continue
        assert manifest is not None, f"succeeded job {job_id} has no manifest"
        entries = {e["persona"]: e for e in manifest["artifacts"] if e["kind"] == "persona"}
        assert len(entries) == len([e for e in manifest["artifacts"]
                                    if e["kind"] == "persona"]), "a persona twice in manifest"
        fig.personas_expected += len(row["items"])
        for item in row["items"]:
            fig.duplicates += max(0, done_events[item["id"]] - 1)
            if item["state"] != "succeeded" or item["persona"] not in entries:
                fig.lost += 1
                continue
            stored = _check_persona(store, row["kind"], item, objects, art_rows, art_sha,
                                    entries[item["persona"]])
            fig.personas_stored += stored
            fig.lost += 1 - stored
        for n in art_rows.values():
            fig.duplicates += n - 1
    return fig


def _check_persona(store, kind, item, objects, art_rows, art_sha, entry) -> int:
    """1 when the persona has exactly one artifact whose bytes match every recorded sha."""
    suffix = f"/{item['persona']}.{'safetensors' if kind == 'capture' else 'jsonl'}"
    copies = [o for o in objects if o.key.endswith(suffix)]
    assert len(copies) == 1, f"persona {item['persona']}: {len(copies)} artifacts {copies}"
    key = copies[0].key
    assert item["key"] == key, (item, key)
    assert art_rows.get(key) == 1, f"{key}: {art_rows.get(key)} artifact rows"
    digest = hashlib.sha256(store.get_bytes(key)).hexdigest()
    assert digest == item["sha256"] == art_sha[key], (key, digest, item["sha256"], art_sha[key])
    if entry is not None:
        assert entry["key"] == key and entry["sha256"] == digest, (entry, digest)
    return 1


class StatusPoller:
    """Hits the status API in a loop while a scenario runs: latencies, failures, and every
    answer's status code (``codes``: a database outage must read 503, never 500).

    The API must keep answering during every fault; its p99 goes in the table."""

    def __init__(self, http: httpx.Client, job_ids: list[str], period_s: float = 0.1):
        self.http, self.job_ids, self.period = http, job_ids, period_s
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.codes: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.period):
            ids = list(self.job_ids)
            path = f"/jobs/{ids[i % len(ids)]}" if ids else "/jobs?limit=20"
            i += 1
            t0 = time.perf_counter()
            try:
                r = self.http.get(path)
                ok = r.status_code == 200
                self.codes[r.status_code] += 1
            except httpx.HTTPError as exc:
                ok, r = False, exc
                self.codes[type(exc).__name__] += 1
            dt = time.perf_counter() - t0
            if ok:
                self.latencies.append(dt)
            else:
                self.errors.append(f"{path}: {getattr(r, 'status_code', r)}")

    def p99_ms(self) -> float | None:
        if not self.latencies:
            return None
        lat = sorted(self.latencies)
        return round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)
