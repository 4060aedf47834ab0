"""S3 / MinIO adapter.

Every call goes through :meth:`S3Store._call`, which retries transient failures (connection
errors, 5xx, throttling) for up to ``upload_retry_s`` with backoff and turns whatever is left
into a StorageError that names the endpoint, the bucket and what to check — a raw botocore
trace tells a researcher nothing about which variable to fix.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.errors import ArtifactNotFound, ChatspaceError, StorageError
from app.storage.base import RESERVED, ArtifactStore, StoredObject, sha256_stream
from app.storage.s3_client import s3_client

log = logging.getLogger(__name__)
T = TypeVar("T")
MIB = 1024 * 1024
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestLimitExceeded", "InternalError", "ServiceUnavailable"}
CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                    "InvalidToken", "ExpiredToken"}
MISSING_BUCKET_CODES = {"NoSuchBucket"}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


def _chain(exc: BaseException):
    """The exception and the ones it wraps (s3transfer wraps ClientError in a string)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_error(exc: BaseException):
    from botocore.exceptions import ClientError

    return next((e for e in _chain(exc) if isinstance(e, ClientError)), None)


def error_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore error, or ("", 0) — also for our own errors,
    which may wrap a botocore one that has already been interpreted."""
    if isinstance(exc, ChatspaceError):
        return "", 0
    err = _client_error(exc)
    if err is None:
        return "", 0
    return (str(err.response.get("Error", {}).get("Code", "")),
            int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0))


class S3Store(ArtifactStore):
    def __init__(self, s3_settings, client=None):
        if not s3_settings.bucket:
            raise StorageError("no S3 bucket configured", field="s3.bucket",
                               hint="set CHATSPACE_S3_BUCKET")
        self.settings = s3_settings
        self.bucket = s3_settings.bucket
        self.client = client or s3_client(s3_settings)
        self.endpoint = self.client.meta.endpoint_url
        self.location = f"bucket '{self.bucket}' at {self.endpoint}"
        self._bucket_ok = False

    def fail_fast(self, *, timeout_s: float) -> S3Store:
        """A second store on the same bucket: one attempt per request (no botocore retries,
        no retry loop in :meth:`_call`), connect and read timeouts of ``timeout_s``."""
        quick = self.settings.model_copy(update={
            "upload_retry_s": 0.0, "max_attempts": 1,
            "connect_timeout_s": min(self.settings.connect_timeout_s, timeout_s),
            "read_timeout_s": min(self.settings.read_timeout_s, timeout_s)})
        return S3Store(quick)

    # -- errors and retries ---------------------------------------------------------------
    def _transient(self, exc: BaseException) -> bool:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        if any(isinstance(e, (BotoConnectionError, ReadTimeoutError)) for e in _chain(exc)):
            return True
        code, status = error_code(exc)
        return status >= 500 or code in TRANSIENT_CODES

    def _error(self, exc: BaseException, what: str, key: str | None) -> StorageError:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        where = f"bucket '{self.bucket}'"
        text = " ".join(str(e) for e in _chain(exc)).lower()
        code, status = error_code(exc)
        if any(isinstance(e, (NoCredentialsError, PartialCredentialsError)) for e in _chain(exc)) \
                or code in CREDENTIAL_CODES:
            return StorageError(
                f"S3 endpoint {self.endpoint} rejected the credentials for {where} "
                f"({code or 'no credentials'})",
                hint="check CHATSPACE_S3_ACCESS_KEY_ID and CHATSPACE_S3_SECRET_ACCESS_KEY")
        if code in MISSING_BUCKET_CODES:
            return StorageError(f"S3 bucket '{self.bucket}' does not exist at {self.endpoint}",
                                hint="create the bucket or check CHATSPACE_S3_BUCKET")
        if self._transient(exc) and not code:
            reason = ("connection refused" if "refused" in text else
                      "timed out" if "timeout" in text or "timed out" in text else
                      type(exc).__name__)
            retried = (f"retried for {self.settings.upload_retry_s:g}s"
                       if self.settings.upload_retry_s > 0 else "not retried")
            return StorageError(
                f"S3 endpoint {self.endpoint} unreachable for {where}: {reason} ({retried})",
                hint="check CHATSPACE_S3_ENDPOINT_URL and that the server is running")
        target = f" of '{key}'" if key else ""
        detail = f"{code} (HTTP {status})" if code else f"{type(exc).__name__}: {exc}"
        return StorageError(f"S3 {what}{target} failed at {self.endpoint} for {where}: {detail}",
                            hint="check the S3 server's logs and CHATSPACE_S3_* settings")

    def _call(self, what: str, fn: Callable[[], T], *, key: str | None = None,
              passthrough: set[str] = frozenset(), check_bucket: bool = True) -> T:
        """Run ``fn`` with retries; errors whose code is in ``passthrough`` reach the caller."""
        if check_bucket and not self._bucket_ok:
            self._ensure_bucket()
        deadline = time.monotonic() + self.settings.upload_retry_s
        delay = 0.2
        while True:
            try:
                return fn()
            except Exception as exc:
                if error_code(exc)[0] in passthrough:
                    raise
                if not isinstance(exc, StorageError) and self._transient(exc) \
                        and time.monotonic() + delay < deadline:
                    log.warning("S3 %s%s at %s failed (%s); retrying in %.1fs", what,
                                f" of {key!r}" if key else "", self.endpoint, exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if isinstance(exc, StorageError):
                    raise
                raise self._error(exc, what, key) from exc

    def _ensure_bucket(self) -> None:
        """Checked once per store, so a missing bucket is named before a 404 on a key could be
        mistaken for a missing artifact."""
        try:
            self._call("HeadBucket", lambda: self.client.head_bucket(Bucket=self.bucket),
                       passthrough={"404", "NoSuchBucket", "NotFound"}, check_bucket=False)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"S3 bucket '{self.bucket}' does not exist at {self.endpoint}",
                               hint="create the bucket or check CHATSPACE_S3_BUCKET") from exc
        self._bucket_ok = True

    # -- primitives -------------------------------------------------------------------------
    def _object(self, key: str, resp: dict) -> StoredObject:
        meta = dict(resp.get("Metadata") or {})
        sha = meta.pop("sha256", None)
        return StoredObject(key=key, size=int(resp.get("ContentLength", 0)), sha256=sha,
                            etag=(resp.get("ETag") or "").strip('"') or None,
                            last_modified=resp.get("LastModified"), meta=meta)

    def _head(self, key: str) -> StoredObject | None:
        try:
            resp = self._call("HeadObject", lambda: self.client.head_object(
                Bucket=self.bucket, Key=key), key=key, passthrough=NOT_FOUND_CODES)
        except Exception as exc:
            if error_code(exc)[0] in NOT_FOUND_CODES:
                return None
            raise
        return self._object(key, resp)

    def _put_bytes(self, key, data, sha256, content_type, meta, overwrite) -> bool:
        args = {"Bucket": self.bucket, "Key": key, "Body": data, "ContentType": content_type,
                "Metadata": {**meta, "sha256": sha256}}
        if not overwrite:
            args["IfNoneMatch"] = "*"  # create-only: a racing writer gets 412, not a clobber
        try:
            self._call("PutObject", lambda: self.client.put_object(**args), key=key,
                       passthrough={"PreconditionFailed", "NotImplemented"})
        except Exception as exc:
            code = error_code(exc)[0]
            if code == "PreconditionFailed":
                return False
            if code != "NotImplemented":
                raise
            args.pop("IfNoneMatch")  # a server without conditional writes: head-checked above
            self._call("PutObject", lambda: self.client.put_object(**args), key=key)
        return True

    def _put_file(self, key, path, sha256, content_type, meta, overwrite) -> bool:
        from boto3.s3.transfer import TransferConfig

        threshold = max(1, int(self.settings.multipart_threshold_mb)) * MIB
        config = TransferConfig(multipart_threshold=threshold,
                                multipart_chunksize=max(threshold, 5 * MIB), max_concurrency=4)
        extra = {"ContentType": content_type, "Metadata": {**meta, "sha256": sha256}}
        self._call("upload", lambda: self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs=extra, Config=config), key=key)
        return True

    def _get(self, key: str, fn: Callable[[dict], T]) -> T:
        """GetObject and ``fn(response)`` inside one retried call; ArtifactNotFound if absent."""
        try:
            return self._call("GetObject", lambda: fn(self.client.get_object(
                Bucket=self.bucket, Key=key)), key=key, passthrough=NOT_FOUND_CODES)
        except Exception as exc:
            if error_code(exc)[0] in NOT_FOUND_CODES:
                raise ArtifactNotFound(f"no artifact {key!r} in {self.location}",
                                       field="key") from exc
            raise

    def _read(self, key: str) -> tuple[bytes, StoredObject]:
        data, resp = self._get(key, lambda resp: (resp["Body"].read(), resp))
        return data, self._object(key, resp)

    def _digest(self, key: str) -> str:
        return self._get(key, lambda resp: sha256_stream(resp["Body"]))

    def _download(self, key: str, path: Path) -> StoredObject:
        obj = self._head(key)
        if obj is None:
            raise ArtifactNotFound(f"no artifact {key!r} in {self.location}", field="key")
        self._call("download", lambda: self.client.download_file(self.bucket, key, str(path)),
                   key=key)
        return obj

    def _listing(self, prefix: str, recursive: bool):
        def run():
            objects, folders = [], []
            args = {"Bucket": self.bucket, "Prefix": prefix}
            if not recursive:
                args["Delimiter"] = "/"
            for page in self.client.get_paginator("list_objects_v2").paginate(**args):
                for item in page.get("Contents", []):
                    if item["Key"].startswith(RESERVED):
                        continue
                    objects.append(StoredObject(
                        key=item["Key"], size=int(item["Size"]),
                        etag=item.get("ETag", "").strip('"') or None,
                        last_modified=item.get("LastModified")))
                folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])
                            if not p["Prefix"].startswith(RESERVED)]
            return sorted(objects, key=lambda o: o.key), sorted(folders)

        return self._call("ListObjectsV2", run, key=prefix or None)

    def _delete(self, key: str) -> None:
        self._call("DeleteObject", lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
                   key=key)

    def _url(self, key: str, expires_s: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_s))

    def check(self) -> None:
        self._bucket_ok = False
        self._ensure_bucket()
        probe = f"{RESERVED}check/{uuid.uuid4().hex}"
        self._call("PutObject", lambda: self.client.put_object(
            Bucket=self.bucket, Key=probe, Body=b"ok"), key=probe)
        body = self._call("GetObject", lambda: self.client.get_object(
            Bucket=self.bucket, Key=probe)["Body"].read(), key=probe)
        self._delete(probe)
        if body != b"ok":
            raise StorageError(f"{self.location} did not read back what was written",
                               hint="check the S3 server's health")
