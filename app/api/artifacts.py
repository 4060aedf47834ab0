"""Artifact routes: list by job or prefix, one object's metadata, a download URL.

Keys are checked here before the store sees them: a malformed key is the caller's mistake
(422 naming ``key``), while the store's own ``StorageError`` means it is unreachable (503).

Only artifact keys are served: keys under ``CHATSPACE_ARTIFACTS_PREFIX`` (``chatspace/`` by
default). The bucket may hold other things — datasets (``CHATSPACE_DATASETS_ROOT`` can point
into the same bucket), other teams' files — and a token to this API is not a key to the
bucket. A job's own listing uses the prefix recorded on the job at submit.

Reads here give up fast (one attempt, a short timeout: :meth:`ArtifactStore.for_reads`):
the store's upload retry (minutes) is for workers, and a caller of the API must get a 503
while S3 is down, not a request that hangs behind it.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import Auth, SessionDep, SettingsDep, StoreDep
from app.api.schemas import ArtifactList, ArtifactOut, ArtifactUrl
from app.errors import ArtifactNotFound, SpecInvalid, StorageError
from app.models import Job

router = APIRouter(prefix="/artifacts", tags=["artifacts"], dependencies=[Auth])
KEY_RE = re.compile(r"^[^\x00-\x1f\x7f\\]{1,1024}$")
ERRORS = {401: {"description": "no or bad token"}, 404: {"description": "no such artifact"},
          422: {"description": "bad key or prefix"},
          503: {"description": "the store is unreachable"}}


def _checked(value: str, what: str, *, prefix: bool = False) -> str:
    from app.storage.base import validate_key, validate_prefix

    if prefix and value == "":
        return value
    if not KEY_RE.match(value):
        raise SpecInvalid(f"{what} has control characters or is too long", field=what)
    try:
        return validate_prefix(value) if prefix else validate_key(value, what=what)
    except StorageError as exc:
        raise SpecInvalid(exc.message, field=what, hint=exc.hint) from None


def artifact_root(settings) -> str:
    """The key prefix every artifact lives under ('' when the prefix is the whole bucket)."""
    root = (settings.artifacts_prefix or "").strip("/")
    return f"{root}/" if root else ""


def _in_scope(value: str, what: str, settings) -> str:
    root = artifact_root(settings)
    inside = value.startswith(root) or (what == "prefix" and value.rstrip("/") + "/" == root)
    if not inside:
        raise SpecInvalid(f"{what} {value[:200]!r} is not under the artifacts prefix {root!r}",
                          field=what, hint=f"artifact keys start with {root!r} "
                                           "(`chatspace-jobs artifacts ls` lists them)")
    return value


def artifact_key(key: str, settings) -> str:
    """``key`` checked: well-formed and an artifact's (under the artifacts prefix)."""
    return _in_scope(_checked(key, "key"), "key", settings)


def artifact_prefix(prefix: str | None, settings) -> str:
    """A listing prefix checked the same way; none means every artifact."""
    if not prefix:
        return artifact_root(settings)
    return _in_scope(_checked(prefix, "prefix", prefix=True), "prefix", settings)


def _out(obj) -> ArtifactOut:
    return ArtifactOut(key=obj.key, size=obj.size, sha256=obj.sha256,
                       last_modified=obj.last_modified, meta=dict(obj.meta or {}))


@router.get("", response_model=ArtifactList, responses=ERRORS)
def list_artifacts(session: SessionDep, store: StoreDep, settings: SettingsDep,
                   job: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
                   prefix: Annotated[str | None, Query(max_length=1024)] = None,
                   limit: Annotated[int, Query(ge=1, le=100000)] = 10000) -> ArtifactList:
    if job is not None:
        row = session.get(Job, job)
        if row is None:
            raise SpecInvalid(f"no job {job!r}", field="job", hint="`chatspace-jobs list`")
        if not row.artifact_prefix:
            return ArtifactList(prefix="", artifacts=[])
        where = row.artifact_prefix.rstrip("/") + "/"
    else:
        where = artifact_prefix(prefix, settings)
    objects = store.list(where)[:limit]
    return ArtifactList(prefix=where, artifacts=[_out(o) for o in objects])


@router.get("/meta", response_model=ArtifactOut, responses=ERRORS)
def meta(store: StoreDep, settings: SettingsDep,
         key: Annotated[str, Query(max_length=1024)]) -> ArtifactOut:
    obj = store.head(artifact_key(key, settings))
    if obj is None:
        raise ArtifactNotFound(f"no artifact {key!r}", field="key",
                               hint="`chatspace-jobs artifacts ls` lists keys")
    return _out(obj)


@router.get("/url", response_model=ArtifactUrl, responses=ERRORS)
def url(store: StoreDep, settings: SettingsDep, key: Annotated[str, Query(max_length=1024)],
        expires_s: Annotated[int, Query(ge=1, le=7 * 24 * 3600)] = 3600) -> ArtifactUrl:
    checked = artifact_key(key, settings)
    return ArtifactUrl(key=key, url=store.url(checked, expires_s=expires_s),
                       expires_s=expires_s)


def stream_artifact(store, key: str, *, attachment: bool = True):
    """A file response with the artifact's bytes, checked against its recorded sha256 on the
    server (the object is first copied to a temp file, so a multi-GB artifact never sits in
    memory) and carrying that sha256 in ``X-Content-SHA256`` for the client to check."""
    import mimetypes
    import shutil
    import tempfile
    from pathlib import Path

    from fastapi.responses import FileResponse
    from starlette.background import BackgroundTask

    obj = store.head(key)
    if obj is None:
        raise ArtifactNotFound(f"no artifact {key!r}", field="key",
                               hint="`chatspace-jobs artifacts ls` lists keys")
    folder = tempfile.mkdtemp(prefix="chatspace-dl-")
    name = key.rsplit("/", 1)[-1]
    try:
        store.download_file(key, Path(folder) / name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"X-Content-SHA256": obj.sha256} if obj.sha256 else {}
    return FileResponse(Path(folder) / name, media_type=media, headers=headers,
                        filename=name if attachment else None,
                        content_disposition_type="attachment" if attachment else "inline",
                        background=BackgroundTask(shutil.rmtree, folder, True))


@router.get("/content", responses={**ERRORS, 200: {
    "description": "the artifact's bytes; X-Content-SHA256 carries its recorded sha256",
    "content": {"application/octet-stream": {}}}})
def content(store: StoreDep, settings: SettingsDep,
            key: Annotated[str, Query(max_length=1024)]):
    """Download one artifact through the API (checked against its sha256 on the way out)."""
    return stream_artifact(store, artifact_key(key, settings))
