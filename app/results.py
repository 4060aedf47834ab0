"""Reading a job's results from where they live: the status API (with a token) or straight
from the database and the artifact store. One interface, two transports, so the Python API
(``chatspace_jobs``), the whole-job download (``chatspace-jobs artifacts get JOB -o DIR``)
and the analysis read a job the same way wherever they run.

``ApiSource`` needs only an API URL and a token (a laptop reading a cluster's results);
``StoreSource`` needs the configured database and store (on the cluster, or the embedded
default on one machine). Both return the API's JSON shapes (:mod:`app.api.schemas`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from app.errors import ArtifactNotFound, ChatspaceError, ChecksumMismatch, NotFound, StorageError
from app.storage.base import CHUNK, MANIFEST_NAME, sha256_file

ANALYSIS_DIR = "analysis"
TIMEOUT_S = 60.0


class JobIncomplete(ChatspaceError):
    """The job has no manifest yet (it is not finished, or it failed)."""

    http_status = 409
    code = "job_incomplete"


class Source(Protocol):
    """What reading results needs; ``where`` names the transport for messages."""

    where: str

    def jobs(self, **filters) -> list[dict]: ...
    def job(self, job_id: str) -> dict: ...
    def events(self, job_id: str) -> list[dict]: ...
    def workers(self) -> list[dict]: ...
    def list(self, prefix: str) -> list[dict]: ...
    def read(self, key: str, *, sha256: str | None = None) -> bytes: ...
    def fetch(self, key: str, path: Path, *, sha256: str | None = None,
              on_bytes: Callable[[int], None] | None = None) -> int: ...
    def analyze(self, job_id: str, *, vector: str) -> dict: ...


# -- straight from the database and the store --------------------------------------------
class StoreSource:
    """The configured database (job rows) and artifact store (files), no server needed."""

    def __init__(self, settings=None, *, store=None, session_factory=None):
        from app.settings import get_settings
        from app.storage import get_store

        self.settings = settings or get_settings()
        self.store = store or get_store(self.settings)
        if session_factory is None:
            from app.db import default_factory, upgrade

            if self.settings.embedded:  # the embedded SQLite file is migrated on first use
                upgrade(self.settings.db_url)
            session_factory = default_factory(self.settings.db_url)
        self._factory = session_factory
        self.where = f"database {self.settings.db_url.split('@')[-1]} and {self.store.location}"

    def _session(self):
        from app.db import session_scope

        return session_scope(self._factory)

    def jobs(self, **filters) -> list[dict]:
        from app import jobs
        from app.api.views import job_out

        with self._session() as s:
            rows = jobs.list_jobs(s, **{k: v for k, v in filters.items() if v is not None})
            return [job_out(j, s).model_dump(mode="json") for j in rows]

    def job(self, job_id: str) -> dict:
        from app import jobs
        from app.api.views import job_out

        with self._session() as s:
            out = job_out(jobs.get_job(s, job_id=job_id), s).model_dump(mode="json")
        if not out.get("artifact_prefix"):  # created without submit: where workers write
            from app.artifacts import job_prefix

            out["artifact_prefix"] = job_prefix(self.settings, model=out["model"],
                                                dataset=out["dataset"], dtype=out["dtype"],
                                                job_id=out["id"])
        return out

    def events(self, job_id: str) -> list[dict]:
        from app import jobs
        from app.api.views import event_out

        with self._session() as s:
            jobs.get_job(s, job_id=job_id)
            return [event_out(e).model_dump(mode="json")
                    for e in jobs.list_events(s, job_id=job_id, limit=10000)]

    def workers(self) -> list[dict]:
        from app import jobs
        from app.api.views import worker_out

        with self._session() as s:
            return [worker_out(w, stale_s=self.settings.worker_stale_s).model_dump(mode="json")
                    for w in jobs.list_workers(s)]

    def list(self, prefix: str) -> list[dict]:
        return [{"key": o.key, "size": o.size, "sha256": o.sha256}
                for o in self.store.list(prefix)]

    def read(self, key: str, *, sha256: str | None = None) -> bytes:
        return self.store.get_bytes(key, expect_sha256=sha256)

    def fetch(self, key: str, path: Path, *, sha256: str | None = None,
              on_bytes: Callable[[int], None] | None = None) -> int:
        size = self.store.download_file(key, path, expect_sha256=sha256).size
        if on_bytes is not None:
            on_bytes(size)
        return size

    def analyze(self, job_id: str, *, vector: str) -> dict:
        from app.analysis import analyze_job

        with self._session() as s:
            return analyze_job(s, self.store, job_id=job_id, vector=vector)


# -- through the status API ---------------------------------------------------------------
class ApiSource:
    """The status API over HTTP with a bearer token (``CHATSPACE_API_URL`` / ``_TOKEN``)."""

    def __init__(self, url: str, token: str | None = None, *, http=None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = http or httpx.Client(base_url=url.rstrip("/"), headers=headers,
                                         timeout=TIMEOUT_S)
        self.where = url

    def _get(self, path: str, **params):
        return self._call("GET", path, params={k: v for k, v in params.items()
                                               if v is not None})

    def _call(self, method: str, path: str, **kw):
        import httpx

        try:
            resp = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise StorageError(f"cannot reach the API at {self.where}: {type(exc).__name__}",
                               hint="check CHATSPACE_API_URL") from None
        _raise_for(resp, self.where)
        return resp.json()

    def jobs(self, **filters) -> list[dict]:
        return self._get("/jobs", **filters)["jobs"]

    def job(self, job_id: str) -> dict:
        return self._get(f"/jobs/{job_id}")

    def events(self, job_id: str) -> list[dict]:
        return self._get(f"/jobs/{job_id}/events", limit=10000)["events"]

    def workers(self) -> list[dict]:
        return self._get("/workers")["workers"]

    def list(self, prefix: str) -> list[dict]:
        return [{"key": a["key"], "size": a["size"], "sha256": a.get("sha256")}
                for a in self._get("/artifacts", prefix=prefix)["artifacts"]]

    def read(self, key: str, *, sha256: str | None = None) -> bytes:
        chunks: list[bytes] = []
        self._stream(key, chunks.append, sha256=sha256)
        return b"".join(chunks)

    def fetch(self, key: str, path: Path, *, sha256: str | None = None,
              on_bytes: Callable[[int], None] | None = None) -> int:
        """Stream to ``<path>.part``, check the sha256, then rename: a file at ``path``
        always has the content the manifest names."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            with open(tmp, "wb") as f:
                def write(chunk: bytes) -> None:
                    f.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                size = self._stream(key, write, sha256=sha256)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def _stream(self, key: str, sink: Callable[[bytes], None], *, sha256: str | None) -> int:
        import httpx

        h, size = hashlib.sha256(), 0
        try:
            with self.http.stream("GET", "/artifacts/content", params={"key": key}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp, self.where)
                recorded = resp.headers.get("x-content-sha256")
                for chunk in resp.iter_bytes(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    sink(chunk)
        except httpx.HTTPError as exc:
            raise StorageError(f"download of {key!r} from {self.where} failed: "
                               f"{type(exc).__name__}", hint="run the command again: "
                               "finished files are kept") from None
        actual = h.hexdigest()
        for label, want in (("recorded", recorded), ("expected", sha256)):
            if want and want != actual:
                raise ChecksumMismatch(f"artifact {key!r} arrived corrupt: sha256 {actual} "
                                       f"does not match the {label} {want}", field="key",
                                       hint="run the command again")
        return size

    def analyze(self, job_id: str, *, vector: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/analysis", params={"vector": vector})


def _raise_for(resp, where: str) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except ValueError:
        body = {}
    message = body.get("message") or f"HTTP {resp.status_code} from {where}"
    cls = {401: ChatspaceError, 404: NotFound, 409: JobIncomplete}.get(resp.status_code)
    if cls is None:
        cls = StorageError if resp.status_code >= 500 else ChatspaceError
    err = cls(message, field=body.get("field"), hint=body.get("hint"))
    err.http_status = resp.status_code
    raise err


def default_source(settings=None) -> Source:
    """The API when ``CHATSPACE_API_URL`` is set (with ``CHATSPACE_API_TOKEN``), else the
    configured database and store."""
    from app.settings import get_settings

    settings = settings or get_settings()
    if settings.api_url:
        token = settings.api_token.get_secret_value() if settings.api_token else None
        return ApiSource(settings.api_url, token)
    return StoreSource(settings)


# -- a job's files ----------------------------------------------------------------------------
def manifest(source: Source, job: dict) -> dict:
    """The job's manifest; JobIncomplete when it has none yet (it is written last)."""
    return json.loads(_manifest_bytes(source, job))


def _manifest_bytes(source: Source, job: dict) -> bytes:
    prefix = (job.get("artifact_prefix") or "").rstrip("/")
    if not prefix:
        raise JobIncomplete(f"job {job['id']} has no artifact prefix", field="job_id")
    try:
        return source.read(f"{prefix}/{MANIFEST_NAME}")
    except (ArtifactNotFound, NotFound):
        raise JobIncomplete(
            f"job {job['id']} is {job['state']} and has no manifest yet: its artifacts are "
            "not complete", field="job_id",
            hint="wait for it to succeed (`chatspace-jobs status JOB --watch`)") from None


def job_files(source: Source, job: dict) -> list[dict]:
    """Every file of a finished job, each with the sha256 it must have: the manifest's
    entries, the manifests of stored analyses and their entries, and the job manifest (the
    manifests' own sha256 is that of the bytes just read, which the store checked)."""
    raw = _manifest_bytes(source, job)
    prefix = job["artifact_prefix"].rstrip("/")
    files = [dict(e) for e in json.loads(raw).get("artifacts", [])]
    for obj in source.list(f"{prefix}/{ANALYSIS_DIR}/"):
        if obj["key"].endswith("/" + MANIFEST_NAME):
            sub_raw = source.read(obj["key"], sha256=obj.get("sha256"))
            sub = json.loads(sub_raw)
            files += [dict(e, kind=e.get("kind", "analysis")) for e in sub.get("artifacts", [])]
            files.append({"key": obj["key"], "kind": "analysis-manifest", "size": len(sub_raw),
                          "sha256": hashlib.sha256(sub_raw).hexdigest()})
    files.append({"key": f"{prefix}/{MANIFEST_NAME}", "kind": "manifest", "size": len(raw),
                  "sha256": hashlib.sha256(raw).hexdigest()})
    return files


def local_path(dest: Path, prefix: str, key: str) -> Path:
    """Where ``key`` goes under ``dest``: its path below the job prefix (keys outside it keep
    their whole path). Never outside ``dest``, whatever a manifest says."""
    rel = key[len(prefix) + 1:] if key.startswith(prefix + "/") else key
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
        raise StorageError(f"manifest key {key!r} cannot be placed under {dest}", field="key")
    return dest.joinpath(*parts)


@dataclass
class DownloadReport:
    job_id: str
    dest: str
    files: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes_total: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("job_id", "dest", "files", "downloaded",
                                              "skipped", "bytes_total", "bytes_downloaded",
                                              "seconds")}


class Progress(Protocol):
    def start(self, total_bytes: int, files: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def file(self, key: str, skipped: bool) -> None: ...


def download_job(source: Source, job_id: str, dest: str | Path, *,
                 progress: Progress | None = None) -> DownloadReport:
    """Download every file of a finished job under ``dest``, resumably: a file already there
    whose sha256 matches the manifest is skipped; every other file is streamed to a temp
    file, checked against the manifest's sha256 and only then renamed into place. The job
    manifest is written last, so a folder with ``manifest.json`` is complete."""
    started = time.monotonic()
    dest = Path(dest)
    job = source.job(job_id)
    files = job_files(source, job)
    prefix = job["artifact_prefix"].rstrip("/")
    report = DownloadReport(job_id=job_id, dest=str(dest), files=len(files))
    report.bytes_total = sum(int(f.get("size") or 0) for f in files)
    if progress is not None:
        progress.start(report.bytes_total, len(files))
    dest.mkdir(parents=True, exist_ok=True)
    for entry in files:
        key, want = entry["key"], entry.get("sha256")
        path = local_path(dest, prefix, key)
        report.paths.append(str(path))
        if want and path.is_file() and sha256_file(path) == want:
            report.skipped += 1
            if progress is not None:
                progress.advance(int(entry.get("size") or path.stat().st_size))
                progress.file(key, True)
            continue
        size = source.fetch(key, path, sha256=want,
                            on_bytes=progress.advance if progress is not None else None)
        report.downloaded += 1
        report.bytes_downloaded += size
        if progress is not None:
            progress.file(key, False)
    report.seconds = round(time.monotonic() - started, 3)
    return report

