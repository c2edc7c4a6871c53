"""Reading and writing local paths and s3:// URLs with one set of helpers.

S3 goes through boto3 (`megatron_ts.s3.make_client`): reads are ranged GETs retried with backoff,
writes are single PUTs (small objects) or multipart uploads (large files), and every write is
verified against the store's ETag (MD5 of the bytes, or of the part MD5s for multipart) and the
object's size. The sha256 of every uploaded object is stored as its `sha256` metadata. Credentials
come from the usual AWS environment or profile and are never logged; messages name only URLs.

Only transient failures are retried (throttling, 5xx, dropped connections, timeouts). Missing or
refused credentials and denied access raise `megatron_ts.s3.S3AccessError` at the first attempt;
a missing bucket or object raises `megatron_ts.s3.S3NotFoundError` (a `FileNotFoundError` whose
`filename` is the URL; `S3BucketNotFoundError` for the bucket).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from megatron_ts.errors import EXIT_STORAGE
from megatron_ts.logging import get_logger
from megatron_ts.s3 import (
    S3AccessError,
    S3BucketNotFoundError,
    S3CredentialsError,
    S3NotFoundError,
    bucket_not_found,
    fatal_error,
    is_s3_url,
    make_client,
    split_s3_url,
)

log = get_logger(__name__)

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Files of this size or more are uploaded in parts."""
PART_SIZE = 32 * 1024 * 1024
"""Multipart part size (S3 needs >= 5 MiB for every part but the last)."""
READ_CHUNK = 8 * 1024 * 1024
"""Bytes per ranged GET when streaming an object."""

_RETRY_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
    "500",
    "502",
    "503",
    "504",
}

_clients: dict[str | None, object] = {}
_clients_lock = threading.Lock()


class StorageError(OSError):
    """A read or write that failed after retries, or an upload whose checksum did not match."""

    exit_code = EXIT_STORAGE


def client(endpoint_url: str | None = None):
    """A shared boto3 client per endpoint; retries are done here, with backoff, not by botocore."""
    with _clients_lock:
        if endpoint_url not in _clients:
            _clients[endpoint_url] = make_client(
                endpoint_url, max_attempts=2, retry_mode="standard"
            )
        return _clients[endpoint_url]


def _retryable(exc: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return err.get("Code") in _RETRY_CODES or status.startswith("5")
    return isinstance(
        exc,
        (
            ConnectionClosedError,
            ConnectTimeoutError,  # not a builtin TimeoutError
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
            ConnectionError,
            TimeoutError,
        ),
    )


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 6,
    base_delay: float = 0.5,
    url: str | None = None,
) -> T:
    """Calls `fn`, retrying transient S3/network errors with jittered exponential backoff.

    Args:
        fn: the operation.
        what: description for messages (a URL, never credentials).
        attempts: tries in all.
        base_delay: first delay in seconds; doubled after every failure (capped at 30 s).
        url: the s3:// URL `fn` accesses, when `what` is more than the URL.

    Raises:
        S3AccessError: credentials missing or refused, or access denied (never retried).
        S3NotFoundError: the bucket or object does not exist (never retried).
        StorageError: the last transient error after all attempts; other errors unchanged.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by fatal_error and _retryable
            fatal = fatal_error(exc, url or what)
            if fatal is not None:
                raise fatal from exc
            if not _retryable(exc):
                raise
            if attempt == attempts - 1:
                raise StorageError(f"{what}: failed after {attempts} attempts: {exc}") from exc
            delay = min(30.0, base_delay * 2**attempt) * (0.5 + random.random())
            log.warning("%s: %s; retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def join(base: str, name: str) -> str:
    """`base/name` for a directory path or s3:// prefix."""
    return base.rstrip("/") + "/" + name


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class _S3RawReader(io.RawIOBase):
    """A forward-reading stream over an S3 object built from retried ranged GETs."""

    def __init__(self, url: str, endpoint_url: str | None, size: int):
        self.url = url
        self.bucket, self.key = split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        n = min(len(buf), READ_CHUNK, self.size - self.pos)
        rng = f"bytes={self.pos}-{self.pos + n - 1}"

        def get() -> bytes:
            resp = client(self.endpoint_url).get_object(Bucket=self.bucket, Key=self.key, Range=rng)
            return resp["Body"].read()

        data = with_retries(get, self.url)
        if not data:
            raise StorageError(f"{self.url}: empty read at byte {self.pos} of {self.size}")
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        # io's default readall reads 8 KiB at a time: one GET per 8 KiB of the object
        chunks = []
        while data := self.read(READ_CHUNK):
            chunks.append(data)
        return b"".join(chunks)


def stat_size(url: str, endpoint_url: str | None = None) -> int | None:
    """Size in bytes of a file or object; None when it does not exist."""
    if not is_s3_url(url):
        p = Path(url)
        return p.stat().st_size if p.is_file() else None
    bucket, key = split_s3_url(url)
    try:
        head = with_retries(lambda: client(endpoint_url).head_object(Bucket=bucket, Key=key), url)
    except S3BucketNotFoundError:
        raise
    except S3NotFoundError:
        return None  # a HEAD answers a bare 404 for a missing bucket too: see check_bucket
    return int(head["ContentLength"])


def check_bucket(url: str, endpoint_url: str | None = None) -> None:
    """Fails fast when the bucket of an s3:// URL does not exist (local paths pass).

    Called before a command starts work, so that a mistyped bucket is one error naming it
    rather than a failure per object. A bucket that exists but refuses HeadBucket (credentials
    allowed only objects under a prefix) passes: the objects' own requests decide.

    Raises:
        S3BucketNotFoundError: naming the bucket and `url`.
    """
    if not is_s3_url(url):
        return
    bucket = split_s3_url(url)[0]
    try:
        with_retries(lambda: client(endpoint_url).head_bucket(Bucket=bucket), url)
    except S3NotFoundError as exc:
        raise bucket_not_found(url) from exc
    except S3CredentialsError:
        raise
    except S3AccessError:
        pass  # see above: the bucket exists


def exists(url: str, endpoint_url: str | None = None) -> bool:
    """Whether a file or object exists."""
    return stat_size(url, endpoint_url) is not None


def open_url_for_read(url: str, endpoint_url: str | None = None) -> BinaryIO:
    """A binary stream over a local file or an S3 object (streamed in ranged GETs).

    Raises:
        FileNotFoundError: naming the path or URL (for S3 an `S3NotFoundError`).
    """
    if not is_s3_url(url):
        if not Path(url).is_file():
            raise FileNotFoundError(f"{url} does not exist")
        return open(url, "rb")
    size = stat_size(url, endpoint_url)
    if size is None:
        raise S3NotFoundError.of(
            url, f"S3 object {url} does not exist: check the bucket, key and endpoint"
        )
    # one GET per READ_CHUNK: small reads (tarfile asks for 10 KiB) come from the buffer
    return io.BufferedReader(_S3RawReader(url, endpoint_url, size), buffer_size=READ_CHUNK)


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    """Whole contents of a file or object."""
    with open_url_for_read(url, endpoint_url) as f:
        return f.read()


def list_prefix(url: str, endpoint_url: str | None = None, suffix: str = "") -> list[str]:
    """Sorted full URLs (or paths) of the objects/files directly under a directory or prefix.

    Args:
        url: local directory or s3://bucket/prefix (treated as a directory).
        endpoint_url: S3 endpoint.
        suffix: keep only names ending with this.

    Raises:
        S3BucketNotFoundError: the bucket does not exist (a missing prefix is an empty list).
    """
    if not is_s3_url(url):
        p = Path(url)
        if not p.is_dir():
            return []
        return sorted(str(c) for c in p.iterdir() if c.is_file() and c.name.endswith(suffix))
    bucket, prefix = split_s3_url(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    out: list[str] = []
    token = None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        if token:
            kw["ContinuationToken"] = token
        resp = with_retries(lambda kw=kw: client(endpoint_url).list_objects_v2(**kw), url)
        out += [f"s3://{bucket}/{o['Key']}" for o in resp.get("Contents", [])]
        if not resp.get("IsTruncated"):
            break
        token = resp["NextContinuationToken"]
    return sorted(u for u in out if u.endswith(suffix))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _verify_etag(url: str, etag: str, expected: str) -> None:
    if etag.strip('"') != expected:
        raise StorageError(
            f"{url}: upload checksum mismatch (store ETag {etag}, expected {expected}); the "
            "object was corrupted in transit; re-run the command to upload it again"
        )


def write_bytes(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Writes a whole file or object atomically (local: temp file + rename; S3: one verified PUT).

    Raises:
        StorageError: the upload failed after retries or its checksum did not match.
        S3BucketNotFoundError: the bucket does not exist.
        S3AccessError: credentials missing or refused.
    """
    if not is_s3_url(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    bucket, key = split_s3_url(url)
    md5 = hashlib.md5(data)
    sha = hashlib.sha256(data).hexdigest()

    def put():
        return client(endpoint_url).put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentMD5=base64.b64encode(md5.digest()).decode(),
            Metadata={"sha256": sha},
        )

    resp = with_retries(put, url)
    _verify_etag(url, resp["ETag"], md5.hexdigest())


def upload_file(
    local_path: str | Path,
    url: str,
    endpoint_url: str | None = None,
    part_size: int = PART_SIZE,
    threshold: int = MULTIPART_THRESHOLD,
) -> str:
    """Copies a local file to a local path or S3 URL, verifying the result.

    Large files go up as a multipart upload (each part retried on its own, the upload aborted on
    failure so no partial object is left); the ETag and size are checked afterwards.

    Args:
        local_path: the file to copy.
        url: destination path or s3:// URL.
        endpoint_url: S3 endpoint.
        part_size: multipart part size in bytes (>= 5 MiB on AWS).
        threshold: files of at least this size use multipart.

    Returns:
        The sha256 hex digest of the file.
    """
    local_path = Path(local_path)
    size = local_path.stat().st_size
    sha = hashlib.sha256()
    if not is_s3_url(url):
        dest = Path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(local_path, "rb") as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                sha.update(chunk)
                out.write(chunk)
        os.replace(tmp, dest)
        return sha.hexdigest()
    with open(local_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    digest = sha.hexdigest()
    if size < threshold:
        write_bytes(url, local_path.read_bytes(), endpoint_url)
        return digest
    bucket, key = split_s3_url(url)
    s3 = client(endpoint_url)
    upload = with_retries(
        lambda: s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata={"sha256": digest}),
        url,
    )
    upload_id = upload["UploadId"]
    parts, md5s = [], []
    try:
        with open(local_path, "rb") as f:
            number = 1
            while chunk := f.read(part_size):
                md5 = hashlib.md5(chunk)
                md5s.append(md5.digest())

                def put_part(chunk=chunk, number=number, md5=md5):
                    return s3.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ContentMD5=base64.b64encode(md5.digest()).decode(),
                    )

                resp = with_retries(put_part, f"{url} part {number}", url=url)
                _verify_etag(f"{url} part {number}", resp["ETag"], md5.hexdigest())
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                number += 1
        done = with_retries(
            lambda: s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
            url,
        )
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    expected = hashlib.md5(b"".join(md5s)).hexdigest() + f"-{len(md5s)}"
    _verify_etag(url, done["ETag"], expected)
    remote = stat_size(url, endpoint_url)
    if remote != size:
        raise StorageError(f"{url}: uploaded {size} bytes but the store reports {remote}")
    return digest


def delete(url: str, endpoint_url: str | None = None) -> None:
    """Removes a file or object if it exists."""
    if not is_s3_url(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_s3_url(url)
    with_retries(lambda: client(endpoint_url).delete_object(Bucket=bucket, Key=key), url)
