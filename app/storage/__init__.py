"""Artifact store: S3/MinIO and local-folder adapters with one behaviour."""

from app.storage.s3_client import s3_client

__all__ = ["s3_client"]
