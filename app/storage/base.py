"""The ArtifactStore interface and the behaviour both adapters share.

Adapters implement a handful of primitives (``_put``, ``_head``, ``_open``...); everything
that must behave the same on S3 and on a local folder — key validation, sha256 bookkeeping,
"never overwrite silently", checksum verification, manifests — lives here once, so the
contract tests exercise one implementation of the rules.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from app.errors import ArtifactNotFound, ChecksumMismatch, StorageError

MANIFEST_NAME = "manifest.json"
CHUNK = 1024 * 1024
RESERVED = ".chatspace-"  # first key segment kept for the store's own files


@dataclass(frozen=True)
class StoredObject:
    """One stored object. ``sha256`` is ours (recorded at upload); ``etag`` is the server's
    and is NOT an MD5 for multipart uploads, so never compare content by it."""

    key: str
    size: int
    sha256: str | None = None
    etag: str | None = None
    last_modified: datetime | None = None
    meta: dict[str, str] = field(default_factory=dict)


def validate_key(key: str, *, what: str = "key") -> str:
    """Reject keys that could escape the store root or mean different things per adapter."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"artifact {what} must be a non-empty string", field=what)
    if key.startswith("/") or "\\" in key:
        raise StorageError(f"artifact {what} {key!r} must be relative and '/'-separated",
                           field=what, hint="drop the leading '/'")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"artifact {what} {key!r} has an empty, '.' or '..' segment",
                           field=what, hint="use plain names separated by single '/'")
    if parts[0].startswith(RESERVED):
        raise StorageError(f"artifact {what} {key!r} starts with the reserved {RESERVED!r}",
                           field=what, hint="rename the first segment")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix may be empty or end with '/'; otherwise it follows key rules."""
    if prefix in ("", None):
        return ""
    validate_key(prefix.rstrip("/") or "/", what="prefix")
    return prefix


def clean_meta(meta: dict | None) -> dict[str, str]:
    """S3 user metadata is lower-cased ASCII strings; apply the same rule on both adapters."""
    out: dict[str, str] = {}
    for k, v in (meta or {}).items():
        k2, v2 = str(k).lower(), str(v)
        if not (k2.isascii() and v2.isascii()) or k2 == "sha256":
            raise StorageError(f"metadata entry {k!r} must be ASCII and not named 'sha256'",
                               field=f"meta.{k}", hint="encode the value or rename the key")
        out[k2] = v2
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def split_listing(keys: Iterable[StoredObject], prefix: str, recursive: bool
                  ) -> tuple[list[StoredObject], list[str]]:
    """S3 ``Delimiter='/'`` semantics over a flat listing: objects and sub-'folders'."""
    objects, folders = [], set()
    for obj in keys:
        rest = obj.key[len(prefix):]
        if not recursive and "/" in rest:
            folders.add(prefix + rest.split("/", 1)[0] + "/")
        else:
            objects.append(obj)
    return sorted(objects, key=lambda o: o.key), sorted(folders)


class ArtifactStore(ABC):
    """Keys are '/'-separated and relative to the store root (the bucket on S3)."""

    #: where the store lives, for messages ("s3://bucket" or a folder)
    location: str = ""

    # -- adapter primitives ---------------------------------------------------------------
    @abstractmethod
    def _head(self, key: str) -> StoredObject | None: ...

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes, sha256: str, content_type: str,
                   meta: dict[str, str], overwrite: bool) -> bool:
        """Store ``data``; return False (writing nothing) if ``overwrite`` is False and the key
        appeared meanwhile, where the adapter can detect that atomically."""

    @abstractmethod
    def _put_file(self, key: str, path: Path, sha256: str, content_type: str,
                  meta: dict[str, str], overwrite: bool) -> bool: ...

    @abstractmethod
    def _read(self, key: str) -> tuple[bytes, StoredObject]:
        """Raw content and its recorded metadata; ArtifactNotFound if absent."""

    @abstractmethod
    def _digest(self, key: str) -> str:
        """sha256 of the stored content, streamed (artifacts can be GBs); ArtifactNotFound."""

    @abstractmethod
    def _download(self, key: str, path: Path) -> StoredObject:
        """Copy the raw object to ``path`` (a temp file the caller renames)."""

    @abstractmethod
    def _listing(self, prefix: str, recursive: bool) -> tuple[list[StoredObject], list[str]]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _url(self, key: str, expires_s: int) -> str: ...

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the store can be written, read back and cleaned."""

    def fail_fast(self, *, timeout_s: float) -> ArtifactStore:
        """This store for callers who wait on it (the status API): no retries, each request
        bounded by about ``timeout_s``. A worker's upload may retry for minutes through an
        outage; a status request must answer 503 at once instead. Adapters that cannot hang
        return themselves."""
        return self

    # -- shared behaviour -------------------------------------------------------------------
    def head(self, key: str) -> StoredObject | None:
        return self._head(validate_key(key))

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error (as on S3)."""
        self._delete(validate_key(key))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  meta: dict | None = None, overwrite: bool = False) -> StoredObject:
        validate_key(key)
        digest = sha256_bytes(data)
        meta = clean_meta(meta)
        existing = None if overwrite else self._same_or_conflict(key, digest)
        if existing is not None:
            return existing
        if not self._put_bytes(key, data, digest, content_type, meta, overwrite):
            existing = self._same_or_conflict(key, digest)
            if existing is not None:
                return existing
        return StoredObject(key=key, size=len(data), sha256=digest, meta=meta,
                            **self._server_fields(key))

    def put_file(self, key: str, path: str | Path, *,
                 content_type: str = "application/octet-stream", meta: dict | None = None,
                 overwrite: bool = False) -> StoredObject:
        """Upload a file without loading it into memory (multipart on S3 above the threshold)."""
        validate_key(key)
        path = Path(path)
        if not path.is_file():
            raise StorageError(f"cannot upload {path}: not a file", field="path")
        digest = sha256_file(path)
        meta = clean_meta(meta)
        existing = None if overwrite else self._same_or_conflict(key, digest)
        if existing is not None:
            return existing
        if not self._put_file(key, path, digest, content_type, meta, overwrite):
            existing = self._same_or_conflict(key, digest)
            if existing is not None:
                return existing
        return StoredObject(key=key, size=path.stat().st_size, sha256=digest, meta=meta,
                            **self._server_fields(key))

    def get_bytes(self, key: str, *, expect_sha256: str | None = None) -> bytes:
        data, obj = self._read(validate_key(key))
        actual = sha256_bytes(data)
        self._verify_digest(key, actual, obj.sha256, expect_sha256)
        return data

    def download_file(self, key: str, path: str | Path, *,
                      expect_sha256: str | None = None) -> StoredObject:
        """Download to ``path`` atomically; the file appears only if its checksum matched."""
        validate_key(key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            obj = self._download(key, tmp)
            self._verify_digest(key, sha256_file(tmp), obj.sha256, expect_sha256)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return obj

    def verify(self, key: str, sha256: str) -> bool:
        """True if ``key`` exists, its recorded checksum is ``sha256`` and its content hashes
        to it. Resume relies on this, so the content is read, not only the metadata."""
        obj = self.head(key)
        if obj is None or obj.sha256 != sha256:
            return False
        try:
            return self._digest(key) == sha256
        except ArtifactNotFound:
            return False

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[StoredObject]:
        """Objects whose key starts with ``prefix`` (a plain string prefix, as on S3). With
        ``recursive=False`` only those with no further '/' after the prefix."""
        return self._listing(validate_prefix(prefix), recursive)[0]

    def folders(self, prefix: str = "") -> list[str]:
        """The 'folders' one level below ``prefix`` (each ending in '/'), for browsing."""
        return self._listing(validate_prefix(prefix), False)[1]

    def url(self, key: str, *, expires_s: int = 3600) -> str:
        """A download URL: presigned GET on S3, file:// locally. ArtifactNotFound if absent."""
        if self.head(key) is None:
            raise ArtifactNotFound(f"no artifact {key!r} in {self.location}", field="key")
        return self._url(key, expires_s)

    def write_manifest(self, prefix: str, manifest: dict, *,
                       overwrite: bool = False) -> StoredObject:
        """Write ``<prefix>/manifest.json`` after checking every listed artifact is stored.

        ``manifest["artifacts"]`` entries need a ``key`` (store-relative); size and sha256
        are filled from the store and must agree with any given. Without an ``artifacts``
        list, every object under the prefix is listed. Call it last: a job without a
        manifest is not complete."""
        base = validate_key(prefix.rstrip("/"), what="prefix")
        entries = manifest.get("artifacts")
        if entries is None:
            entries = [{"key": o.key} for o in self.list(base + "/")
                       if o.key != f"{base}/{MANIFEST_NAME}"]
        filled = []
        for entry in entries:
            key = validate_key(entry.get("key", ""), what="manifest.artifacts[].key")
            obj = self.head(key)
            if obj is None:
                raise StorageError(f"manifest lists {key!r} but it is not in {self.location}",
                                   field="manifest.artifacts", hint="upload it before the manifest")
            if obj.sha256 is None:
                raise StorageError(f"{key!r} has no recorded sha256", field="manifest.artifacts",
                                   hint="upload it through the ArtifactStore")
            for name, value in (("sha256", obj.sha256), ("size", obj.size)):
                if entry.get(name) not in (None, value):
                    raise ChecksumMismatch(f"manifest entry {key!r} says {name}={entry[name]!r} "
                                           f"but the store has {value!r}", field="manifest")
            filled.append({**entry, "key": key, "size": obj.size, "sha256": obj.sha256})
        body = json.dumps({**manifest, "artifacts": filled}, sort_keys=True, indent=2)
        return self.put_bytes(f"{base}/{MANIFEST_NAME}", body.encode(),
                              content_type="application/json", overwrite=overwrite)

    def read_manifest(self, prefix: str) -> dict | None:
        key = f"{validate_key(prefix.rstrip('/'), what='prefix')}/{MANIFEST_NAME}"
        try:
            return json.loads(self.get_bytes(key))
        except ArtifactNotFound:
            return None

    # -- helpers ----------------------------------------------------------------------------
    def _server_fields(self, key: str) -> dict:
        obj = self._head(key)
        return {"etag": obj.etag, "last_modified": obj.last_modified} if obj else {}

    def _same_or_conflict(self, key: str, digest: str) -> StoredObject | None:
        """None if ``key`` is free; the existing object if it holds the same content; else
        StorageError — artifacts are never overwritten silently."""
        existing = self._head(key)
        if existing is None:
            return None
        current = existing.sha256
        if current is None:
            current = self._digest(key)
        if current == digest:
            return existing
        raise StorageError(f"{key!r} already exists in {self.location} with different content "
                           f"(sha256 {current[:12]}…, new {digest[:12]}…)", field="key",
                           hint="pass overwrite=True to replace it, or write to a new key")

    @staticmethod
    def _verify_digest(key: str, actual: str, recorded: str | None,
                       expected: str | None) -> None:
        for label, want in (("recorded", recorded), ("expected", expected)):
            if want is not None and want != actual:
                raise ChecksumMismatch(f"artifact {key!r} is corrupt: content sha256 {actual} "
                                       f"does not match the {label} {want}", field="key",
                                       hint="re-upload it or re-run the item")
