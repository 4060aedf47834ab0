"""Local-folder adapter: the embedded default, same behaviour as S3.

Layout under the root: ``<key>`` holds the bytes; ``.chatspace-meta/<key>.json`` a sidecar with
the sha256, content type and metadata (S3 keeps these on the object itself);
``.chatspace-tmp/`` holds partial writes so a reader never sees half a file (temp + rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from app.errors import ArtifactNotFound, StorageError
from app.storage.base import ArtifactStore, StoredObject, sha256_file, split_listing

META_DIR = ".chatspace-meta"
TMP_DIR = ".chatspace-tmp"


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.location = f"local folder {self.root}"

    # -- paths --------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key

    def _sidecar(self, key: str) -> Path:
        return self.root / META_DIR / f"{key}.json"

    def _tmp(self) -> Path:
        tmp = self.root / TMP_DIR
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / uuid.uuid4().hex

    @contextlib.contextmanager
    def _os_errors(self, key: str):
        try:
            yield
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} in {self.location}: {exc.strerror or exc}",
                               hint="check CHATSPACE_DATA_DIR exists, is writable and has space"
                               ) from exc

    # -- primitives ---------------------------------------------------------------------------
    def _head(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        side = self._read_sidecar(key)
        return StoredObject(
            key=key, size=st.st_size, sha256=side.get("sha256"), etag=None,
            last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            meta=side.get("meta", {}),
        )

    def _read_sidecar(self, key: str) -> dict:
        try:
            return json.loads(self._sidecar(key).read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return {}

    def _write_sidecar(self, key: str, sha256: str, content_type: str, meta: dict) -> None:
        side = self._sidecar(key)
        side.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp()
        tmp.write_text(json.dumps({"sha256": sha256, "content_type": content_type, "meta": meta}))
        os.replace(tmp, side)

    def _place(self, key: str, tmp: Path, sha256: str, content_type: str, meta: dict,
               overwrite: bool) -> bool:
        """Move a complete temp file to ``key``. Without overwrite, ``os.link`` creates the
        key only if absent (atomic), so two racing writers cannot both win."""
        dest = self._path(key)
        if dest.is_dir():
            raise StorageError(f"{key!r} is a folder in {self.location}", field="key",
                               hint="choose a key that is not a prefix of other keys")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if overwrite:
                self._write_sidecar(key, sha256, content_type, meta)
                os.replace(tmp, dest)
                return True
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return False
            self._write_sidecar(key, sha256, content_type, meta)
            return True
        except (NotADirectoryError, FileExistsError) as exc:
            raise StorageError(f"cannot create {key!r} in {self.location}: a parent segment is "
                               f"an existing object", field="key") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _put_bytes(self, key, data, sha256, content_type, meta, overwrite) -> bool:
        with self._os_errors(key):
            tmp = self._tmp()
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._place(key, tmp, sha256, content_type, meta, overwrite)

    def _put_file(self, key, path, sha256, content_type, meta, overwrite) -> bool:
        with self._os_errors(key):
            tmp = self._tmp()
            shutil.copyfile(path, tmp)
            return self._place(key, tmp, sha256, content_type, meta, overwrite)

    def _read(self, key: str) -> tuple[bytes, StoredObject]:
        obj = self._head(key)
        if obj is None:
            raise ArtifactNotFound(f"no artifact {key!r} in {self.location}", field="key")
        return self._path(key).read_bytes(), obj

    def _digest(self, key: str) -> str:
        if self._head(key) is None:
            raise ArtifactNotFound(f"no artifact {key!r} in {self.location}", field="key")
        return sha256_file(self._path(key))

    def _download(self, key: str, path: Path) -> StoredObject:
        obj = self._head(key)
        if obj is None:
            raise ArtifactNotFound(f"no artifact {key!r} in {self.location}", field="key")
        shutil.copyfile(self._path(key), path)
        return obj

    def _iter(self, prefix: str) -> Iterator[StoredObject]:
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d not in (META_DIR, TMP_DIR)]
            for name in filenames:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    obj = self._head(key)
                    if obj is not None:
                        yield obj

    def _listing(self, prefix: str, recursive: bool):
        return split_listing(self._iter(prefix), prefix, recursive)

    def _delete(self, key: str) -> None:
        for path, top in ((self._path(key), self.root),
                          (self._sidecar(key), self.root / META_DIR)):
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != top and parent.is_relative_to(top):
                try:
                    parent.rmdir()  # only empty folders: S3 has no empty "folders" either
                except OSError:
                    break
                parent = parent.parent

    def _url(self, key: str, expires_s: int) -> str:
        return self._path(key).as_uri()

    def check(self) -> None:
        probe = f"{TMP_DIR}/check-{uuid.uuid4().hex}"
        with self._os_errors(probe):
            self.root.mkdir(parents=True, exist_ok=True)
            path = self._path(probe)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"ok")
            ok = path.read_bytes() == b"ok"
            path.unlink()
        if not ok:
            raise StorageError(f"{self.location} did not read back what was written")
