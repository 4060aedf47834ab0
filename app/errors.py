"""One root error class for the service, and the few kinds callers must tell apart.

Each error carries a ``field`` (where the user went wrong, dotted path) and a ``hint``
(what to do instead) so the API and the CLI can print one clear line; the API maps
``http_status`` to its response code in one place.
"""

from __future__ import annotations


class ChatspaceError(Exception):
    """Root of every error this service raises on purpose."""

    http_status = 500
    code = "error"

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.field:
            text = f"{self.field}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text

    def to_dict(self) -> dict:
        return {"error": self.code, "message": self.message, "field": self.field, "hint": self.hint}


class SpecInvalid(ChatspaceError):
    """A job, dataset or steering spec is malformed; nothing was enqueued."""

    http_status = 422
    code = "invalid"


class DatasetInvalid(SpecInvalid):
    """A dataset file is malformed (names the file, persona and field)."""

    code = "dataset_invalid"


class NotFound(ChatspaceError):
    http_status = 404
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class InvalidTransition(ChatspaceError):
    """A state change that the state machine does not allow, or a lost race for it."""

    http_status = 409
    code = "invalid_transition"


class UploadConflict(ChatspaceError):
    """An upload's name already holds different content (uploads are never overwritten)."""

    http_status = 409
    code = "upload_conflict"


class UploadTooLarge(SpecInvalid):
    http_status = 413
    code = "too_large"


class Unauthorized(ChatspaceError):
    http_status = 401
    code = "unauthorized"


class StorageError(ChatspaceError):
    """The artifact store is unreachable, misconfigured, or returned corrupt data."""

    http_status = 503
    code = "storage_error"


class ChecksumMismatch(StorageError):
    code = "checksum_mismatch"


class RetryableError(ChatspaceError):
    """A transient failure; the caller may try again after ``delay`` seconds."""

    code = "retryable"

    def __init__(self, message: str, *, delay: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.delay = delay


class EngineOOM(ChatspaceError):
    """The engine ran out of (GPU) memory on a batch; carries the figures."""

    code = "oom"

    def __init__(self, message: str, *, batch_size: int | None = None,
                 memory: dict | None = None, **kw):
        super().__init__(message, **kw)
        self.batch_size = batch_size
        self.memory = memory or {}
