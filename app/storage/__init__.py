"""Artifact store: S3/MinIO and local-folder adapters with one behaviour.

``get_store()`` picks the adapter from settings (S3 when ``CHATSPACE_S3_BUCKET`` is set, else
a folder under the data directory); callers never branch on which one they got.
"""

from __future__ import annotations

from app.errors import ChecksumMismatch, StorageError
from app.storage.base import MANIFEST_NAME, ArtifactStore, StoredObject
from app.storage.local import LocalStore
from app.storage.s3 import S3Store
from app.storage.s3_client import s3_client

__all__ = [
    "MANIFEST_NAME",
    "ArtifactStore",
    "ChecksumMismatch",
    "LocalStore",
    "S3Store",
    "StorageError",
    "StoredObject",
    "get_store",
    "s3_client",
]


def get_store(settings=None) -> ArtifactStore:
    """The configured store; ``settings`` defaults to ``get_settings()``."""
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    if settings.s3.bucket:
        return S3Store(settings.s3)
    return LocalStore(settings.artifacts_dir)
