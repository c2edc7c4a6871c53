"""boto3 clients and URL parsing shared by the data tools and the loader.

Credentials come from the usual AWS chain (environment, profile, instance role) and are never
logged. The endpoint URL may come from the caller, or from `TS_S3_ENDPOINT_URL` /
`AWS_ENDPOINT_URL` for S3-compatible stores.

`fatal_error` is the one classification of S3 failures that no retry can fix, shared by the two
retry loops (`megatron_ts.storage.with_retries` and the loader's `S3Reader`): missing or refused
credentials and access (`S3AccessError`, exit 4) and a missing bucket or object
(`S3NotFoundError`, a `FileNotFoundError` naming the URL, exit 2). Both loops raise these at once.
"""

from __future__ import annotations

import errno
import os
from urllib.parse import urlparse

from megatron_ts.errors import EXIT_STORAGE, EXIT_USAGE

# botocore raises these before a request is sent; retrying cannot make credentials appear.
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
# Error codes of a store that refused the credentials or the access. "403"/"Forbidden" are what
# botocore reports for a HEAD answered 403 (a HEAD response has no body to carry a code).
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "Forbidden",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404"}
_CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run on a node with an "
    "instance role)"
)


class S3AccessError(Exception):
    """S3 credentials missing or refused, or access denied: fatal at once, never retried."""

    exit_code = EXIT_STORAGE


class S3CredentialsError(S3AccessError):
    """No usable credentials were found: nothing was sent to the store."""


class S3NotFoundError(FileNotFoundError):
    """A missing S3 object or bucket: errno ENOENT, `filename` the s3:// URL."""

    exit_code = EXIT_USAGE

    @classmethod
    def of(cls, url: str, message: str) -> S3NotFoundError:
        """The error for `url` (OSError's own arguments, so that it pickles across processes)."""
        return cls(errno.ENOENT, message, url)

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class S3BucketNotFoundError(S3NotFoundError):
    """The bucket of a URL does not exist: no object under it can be read or written."""


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

    botocore's retries never repeat a request for missing credentials (`NoCredentialsError` is
    raised while signing, before its retry loop) nor for 403/404 answers. Without credentials
    in the environment or a profile, botocore asks the EC2 instance-metadata service once per
    client, which costs up to about 2 s (two 1 s timeouts) on a machine where 169.254.169.254
    does not answer; `AWS_EC2_METADATA_DISABLED=true` skips that lookup off EC2.
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


def bucket_not_found(url: str, bucket: str | None = None) -> S3BucketNotFoundError:
    """The error for a URL whose bucket does not exist (bucket: when `url` does not name it)."""
    if bucket is None:
        bucket = split_s3_url(url)[0] if is_s3_url(url) else "?"
    return S3BucketNotFoundError.of(
        url,
        f"S3 bucket {bucket!r} does not exist ({url}): check the bucket name and the endpoint "
        "(--endpoint-url / TS_S3_ENDPOINT_URL), or create the bucket",
    )


def fatal_error(exc: BaseException, url: str, what: str = "request") -> Exception | None:
    """The error to raise at once, instead of retrying, for an S3 failure; None if transient.

    Args:
        exc: what boto3 raised.
        url: the s3:// URL being accessed (named in the message; never credentials).
        what: the operation, for messages when boto3 does not name it (`GET`, `read`).

    Returns:
        `S3CredentialsError` when no credentials were found, `S3AccessError` for invalid or
        refused credentials and denied access, `S3BucketNotFoundError` for a missing bucket,
        `S3NotFoundError` for a missing object, else None (the caller decides whether `exc` is
        worth a retry).
    """
    name = type(exc).__name__
    if name in _CREDENTIAL_ERRORS:
        return S3CredentialsError(
            f"no usable S3 credentials to access {url} ({exc}): {_CREDENTIALS_FIX}"
        )
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _ACCESS_CODES:
        operation = getattr(exc, "operation_name", None) or what
        return S3AccessError(
            f"S3 refused {operation} {url} ({code}): check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or AWS_PROFILE) and that "
            "the bucket policy grants this access"
        )
    if code == "NoSuchBucket":
        bucket = None if is_s3_url(url) else response["Error"].get("BucketName", "?")
        return bucket_not_found(url, bucket)
    if code in _MISSING_CODES or (status == 404 and not code):
        return S3NotFoundError.of(
            url, f"S3 object {url} does not exist: check the bucket, key and endpoint"
        )
    return None
