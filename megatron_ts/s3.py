"""boto3 clients and URL parsing shared by the data tools and the loader.

Credentials come from the usual AWS chain (environment, profile, instance role) and are never
logged. The endpoint URL may come from the caller, or from `TS_S3_ENDPOINT_URL` /
`AWS_ENDPOINT_URL` for S3-compatible stores.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Returns (bucket, key) of an s3://bucket/key URL."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def make_client(
    endpoint_url: str | None = None, max_attempts: int = 10, retry_mode: str = "adaptive"
):
    """A boto3 S3 client with retries (throttling, 5xx, dropped connections).

    Args:
        endpoint_url: S3-compatible endpoint; None falls back to TS_S3_ENDPOINT_URL,
            AWS_ENDPOINT_URL, then AWS itself.
        max_attempts: botocore retry attempts per request (0: the caller retries itself).
        retry_mode: botocore mode: adaptive (client-side rate limiting after throttling),
            standard or legacy. Callers that count and back off on their own use standard.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    endpoint_url = (
        endpoint_url or os.environ.get("TS_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = BotoConfig(
        retries={"max_attempts": max_attempts, "mode": retry_mode},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
