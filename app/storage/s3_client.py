"""A configured boto3 S3 client, shared by the artifact store and dataset loading.

Why a custom ``Config``: boto3 >= 1.36 sends CRC32 checksums on every request by default and
some S3-compatible servers (older MinIO, Ceph, moto versions) reject them, so checksums are
only sent/validated when an operation requires them; our own sha256 in object metadata is
the integrity check. MinIO needs path-style addressing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.settings import S3Settings, Settings


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


def s3_client(s3_settings: S3Settings | Settings):
    """Return a boto3 S3 client for ``s3_settings`` (an ``S3Settings``, or ``Settings``).

    Credentials left unset fall back to boto3's usual chain (env, profile, instance role).
    """
    import boto3
    from botocore.config import Config

    s3 = getattr(s3_settings, "s3", s3_settings)
    config = Config(
        region_name=s3.region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if s3.path_style else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"total_max_attempts": max(1, int(s3.max_attempts)), "mode": "standard"},
        connect_timeout=s3.connect_timeout_s,
        read_timeout=s3.read_timeout_s,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint_url or None,
        aws_access_key_id=_secret(s3.access_key_id),
        aws_secret_access_key=_secret(s3.secret_access_key),
        config=config,
    )
