"""Every byte the project reads or writes outside the process: local paths and s3:// URLs.

One module holds what the data tools, the manifest and the loader share:

- URLs: `is_s3_url`, `split_s3_url`, `join`.
- Errors and their classification (`fatal_error`): failures no retry can fix raise at the first
  attempt: missing or refused credentials and denied access as `S3AccessError` (exit 4), a
  missing bucket or object as `S3NotFoundError`, a `FileNotFoundError` whose `filename` is the
  URL (exit 2). Everything else that can pass on a second try (throttling including HTTP 429,
  5xx, dropped connections, timeouts; `retryable`) is retried.
- One retry policy (`RetryPolicy`: bounded exponential backoff with full jitter) used by
  `with_retries` (single requests: HEAD, PUT, LIST, upload parts) and by `S3Reader` (streams).
  botocore's own retries are off for every client, so that every retry is ours: counted in
  `IOCounters.retries` and logged with the URL (never credentials).
- Clients (`client`): one boto3 client per (process id, endpoint), so a forked loader worker
  makes its own instead of sharing a parent's connection pool.
- Reading (`open_url`, `read_bytes`, `stat_size`, `exists`, `list_prefix`, `check_bucket`): an S3
  object streams through one GET; when the connection drops or the server throttles, the reader
  reopens it at the offset it reached with `Range: bytes=N-` and `If-Match` on the first answer's
  ETag, so a replaced object is an error instead of silently mixed bytes.
- Writing (`write_bytes`, `upload_file`, `delete`): local writes are temp file + rename; S3 writes
  are one PUT (small) or a multipart upload (large, aborted on failure), each verified against the
  store's ETag and size, with the sha256 of the bytes stored as the object's `sha256` metadata.
- webdataset: `register_s3_scheme` installs `open_url` as its `s3` URL scheme (`gopen_schemes`).

Credentials come from the usual AWS chain (environment, profile, instance role). The endpoint URL
may come from the caller, or from `TS_S3_ENDPOINT_URL` / `AWS_ENDPOINT_URL` for S3-compatible
stores.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import importlib
import io
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from megatron_ts.errors import EXIT_STORAGE, EXIT_USAGE
from megatron_ts.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Files of this size or more are uploaded in parts."""
PART_SIZE = 32 * 1024 * 1024
"""Multipart part size (S3 needs >= 5 MiB for every part but the last)."""
READ_BUFFER = 1 << 20
"""Buffer of `open_url`'s readers: small reads (tarfile asks for 10 KiB) come from it."""

# ----------------------------------------------------------------------------------------------
# URLs and errors
# ----------------------------------------------------------------------------------------------


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Returns (bucket, key) of an s3://bucket/key URL."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, name: str) -> str:
    """`base/name` for a directory path or s3:// prefix."""
    return base.rstrip("/") + "/" + name


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


class StorageError(OSError):
    """A read or write still failing after its retries, or a write whose checksum did not match."""

    exit_code = EXIT_STORAGE


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


# botocore raises these before a request is sent; retrying cannot make credentials appear.
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
# Codes of a store that refused the credentials or the access. "403"/"Forbidden" are what
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
# Codes S3 and S3-compatible stores send when a later attempt can succeed.
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "429",
    "500",
    "502",
    "503",
    "504",
}
_CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run on a node with an "
    "instance role)"
)


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
    """The error to raise at once, instead of retrying, for an S3 failure; None if not fatal.

    Args:
        exc: what boto3 raised.
        url: the s3:// URL being accessed (named in the message; never credentials).
        what: the operation, for messages when boto3 does not name it (`GET`, `read`).

    Returns:
        `S3CredentialsError` when no credentials were found, `S3AccessError` for invalid or
        refused credentials and denied access, `S3BucketNotFoundError` for a missing bucket,
        `S3NotFoundError` for a missing object, else None (`retryable` decides the rest).
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


def retryable(exc: BaseException) -> bool:
    """Whether another attempt can succeed: throttling (429 included), 5xx, network failures."""
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    if fatal_error(exc, "") is not None or isinstance(exc, ParamValidationError):
        return False  # credentials, access, a missing bucket or object, a malformed request
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return str(err.get("Code")) in _RETRY_CODES or status >= 500 or status == 429
    # Dropped connections surface as botocore errors (ResponseStreamingError, IncompleteReadError,
    # ConnectionClosedError, ReadTimeoutError, EndpointConnectionError), urllib3 ProtocolError or
    # plain socket errors, depending on where the stream broke.
    if isinstance(exc, StorageError | FileNotFoundError | PermissionError):
        return False  # ours, already final; or a local path
    if isinstance(exc, BotoCoreError | OSError | http.client.HTTPException):
        return True
    return type(exc).__module__.startswith("urllib3")


# ----------------------------------------------------------------------------------------------
# Retries and clients
# ----------------------------------------------------------------------------------------------


@dataclass
class IOCounters:
    """Byte and retry counters of one process (the loader reports them as metrics)."""

    bytes_read: int = 0
    """Bytes delivered by `open_url` readers (local and S3)."""
    retries: int = 0
    """S3 requests retried after throttling, 5xx or a dropped connection."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    max_attempts: int = 10
    """Attempts per request or read position (the first try included)."""
    base_delay: float = 0.2
    """Upper bound of the first backoff sleep in seconds; doubled on each further retry."""
    max_delay: float = 20.0
    """Cap on one backoff sleep in seconds."""

    def delay(self, attempt: int) -> float:
        """Seconds to sleep before retry number `attempt` (1-based): uniform in [0, bound]."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


DEFAULT_POLICY = RetryPolicy()


def _backoff(
    exc: BaseException,
    attempt: int,
    url: str,
    what: str,
    policy: RetryPolicy,
    counters: IOCounters | None,
) -> None:
    """Raises what `exc` means after `attempt` tries, or sleeps before the next one."""
    fatal = fatal_error(exc, url, what)
    if fatal is not None:
        raise fatal from exc
    if not retryable(exc):
        raise exc
    if attempt >= policy.max_attempts:
        raise StorageError(
            f"S3 {what} of {url} failed after {attempt} attempts: {exc}; check the endpoint and "
            "the network"
        ) from exc
    delay = policy.delay(attempt)
    if counters is not None:
        counters.retries += 1
    log.warning(
        "S3 %s of %s failed (%s: %s); retry %d/%d in %.2fs",
        what, url, type(exc).__name__, exc, attempt, policy.max_attempts - 1, delay,
    )  # fmt: skip
    time.sleep(delay)


def with_retries(
    fn: Callable[[], T],
    url: str,
    what: str = "request",
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    counters: IOCounters | None = None,
) -> T:
    """Calls `fn` (one request about `url`), retrying transient failures per `policy`.

    Raises:
        S3AccessError: credentials missing or refused, or access denied (never retried).
        S3NotFoundError: the bucket or object does not exist (never retried).
        StorageError: the last transient failure once the attempts are spent.
        Exception: anything neither fatal nor transient, unchanged.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified in _backoff
            _backoff(exc, attempt, url, what, policy, counters)


def make_client(endpoint_url: str | None = None):
    """A new boto3 S3 client without botocore retries (every retry is `with_retries`' or the
    reader's, counted and logged).

    Args:
        endpoint_url: S3-compatible endpoint; None falls back to TS_S3_ENDPOINT_URL,
            AWS_ENDPOINT_URL, then AWS itself.

    Without credentials in the environment or a profile, botocore asks the EC2 instance-metadata
    service once per client, which costs up to about 2 s on a machine where 169.254.169.254 does
    not answer; `AWS_EC2_METADATA_DISABLED=true` skips that lookup off EC2.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    endpoint_url = (
        endpoint_url or os.environ.get("TS_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = BotoConfig(
        retries={"max_attempts": 0, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


_clients: dict[tuple[int, str | None], object] = {}
_clients_lock = threading.Lock()


def client(endpoint_url: str | None = None):
    """The boto3 client of this process for `endpoint_url`, made on first use.

    Keyed by process id: a client does not survive fork (its connection pool would be shared
    with the parent), so a forked loader worker makes its own.
    """
    key = (os.getpid(), endpoint_url)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = make_client(endpoint_url)
        return _clients[key]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class S3Reader(io.RawIOBase):
    """A sequential reader of one S3 object that resumes where a failed read stopped.

    Args:
        url: s3://bucket/key.
        endpoint_url: S3-compatible endpoint (None: `make_client`'s defaults).
        counters: where bytes and retries are counted.
        policy: retry policy of every (re)open and read position.

    Raises:
        S3NotFoundError, S3AccessError: at construction, for a missing object or refused access.
    """

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        counters: IOCounters | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
    ):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.counters = counters if counters is not None else IOCounters()
        self.policy = policy
        self.offset = 0
        self.size: int | None = None
        """Content-Length of the first answer: the object's size."""
        self.etag: str | None = None
        """ETag of the first answer; every later GET asks `If-Match` on it."""
        self._body = None
        self._open()

    def readable(self) -> bool:
        return True

    def _get(self):
        from botocore.exceptions import ClientError

        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.offset > 0:
            kwargs["Range"] = f"bytes={self.offset}-"
        if self.etag is not None:
            kwargs["IfMatch"] = self.etag
        try:
            return client(self.endpoint_url).get_object(**kwargs)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                raise StorageError(
                    f"S3 object {self.url} changed while it was being read (ETag {self.etag}); "
                    "shards must not be rewritten while they are read"
                ) from exc
            raise

    def _open(self) -> None:
        what = f"GET at byte {self.offset}"
        resp = with_retries(self._get, self.url, what, policy=self.policy, counters=self.counters)
        if self.size is None:
            self.size = int(resp["ContentLength"])
            self.etag = resp.get("ETag")
        self._body = resp["Body"]

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - the connection is being dropped anyway
                pass
            self._body = None

    def readinto(self, buf) -> int:
        want = len(buf)
        if want == 0 or self.size is None or self.offset >= self.size:
            return 0
        attempt = 0
        while True:
            if self._body is None:
                self._open()  # bounded retries of its own; raises when they are spent
            try:
                data = self._body.read(want)
                if not data:
                    # The server closed the stream before the object's length: a dropped connection.
                    raise ConnectionError(f"stream ended at byte {self.offset} of {self.size}")
            except Exception as exc:  # noqa: BLE001 - classified in _backoff
                self._close_body()
                attempt += 1
                what = f"read at byte {self.offset}"
                _backoff(exc, attempt, self.url, what, self.policy, self.counters)
                continue
            n = len(data)
            buf[:n] = data
            self.offset += n
            self.counters.bytes_read += n
            return n

    def close(self) -> None:
        self._close_body()
        super().close()


class CountingFile(io.RawIOBase):
    """A local file whose reads are counted in `IOCounters.bytes_read`."""

    def __init__(self, path: str, counters: IOCounters):
        super().__init__()
        self.path = path
        self.size = os.stat(path).st_size
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self.counters = counters

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        self.counters.bytes_read += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def open_url(
    url: str,
    endpoint_url: str | None = None,
    counters: IOCounters | None = None,
    bufsize: int = READ_BUFFER,
) -> io.BufferedReader:
    """Opens a local path, file:// URL or s3:// URL for buffered sequential reading.

    `.raw.size` of the result is the file's or object's size (for S3 from the GET that opened
    it, without another request).

    Raises:
        FileNotFoundError: naming the path or URL when it does not exist (for S3 an
            `S3NotFoundError`).
    """
    counters = counters if counters is not None else IOCounters()
    if is_s3_url(url):
        raw = S3Reader(url, endpoint_url=endpoint_url, counters=counters)
    else:
        path = _local_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"{path} does not exist", path)
        raw = CountingFile(path, counters)
    return io.BufferedReader(raw, buffer_size=bufsize)


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    """Whole contents of a file or object."""
    with open_url(url, endpoint_url) as f:
        return f.read()


def stat_size(url: str, endpoint_url: str | None = None) -> int | None:
    """Size in bytes of a file or object; None when it does not exist."""
    if not is_s3_url(url):
        p = Path(_local_path(url))
        return p.stat().st_size if p.is_file() else None
    bucket, key = split_s3_url(url)
    try:
        head = with_retries(
            lambda: client(endpoint_url).head_object(Bucket=bucket, Key=key), url, "HEAD"
        )
    except S3BucketNotFoundError:
        raise
    except S3NotFoundError:
        return None  # a HEAD answers a bare 404 for a missing bucket too: see check_bucket
    return int(head["ContentLength"])


def exists(url: str, endpoint_url: str | None = None) -> bool:
    """Whether a file or object exists."""
    return stat_size(url, endpoint_url) is not None


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
        with_retries(lambda: client(endpoint_url).head_bucket(Bucket=bucket), url, "HeadBucket")
    except S3NotFoundError as exc:
        raise bucket_not_found(url) from exc
    except S3CredentialsError:
        raise
    except S3AccessError:
        pass  # see above: the bucket exists


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
        p = Path(_local_path(url))
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
        resp = with_retries(lambda kw=kw: client(endpoint_url).list_objects_v2(**kw), url, "LIST")
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


def _replace_local(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes `path` through a temp file beside it, then renames: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Writes a whole file or object atomically (local: temp file + rename; S3: one verified PUT).

    Raises:
        StorageError: the upload failed after retries or its checksum did not match.
        S3BucketNotFoundError: the bucket does not exist.
        S3AccessError: credentials missing or refused.
    """
    if not is_s3_url(url):
        _replace_local(Path(_local_path(url)), lambda f: f.write(data))
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

    resp = with_retries(put, url, "PUT")
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

        def copy(out: io.BufferedWriter) -> None:
            with open(local_path, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    sha.update(chunk)
                    out.write(chunk)

        _replace_local(Path(_local_path(url)), copy)
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
        "CreateMultipartUpload",
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

                resp = with_retries(put_part, url, f"UploadPart {number}")
                _verify_etag(f"{url} part {number}", resp["ETag"], md5.hexdigest())
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                number += 1
        done = with_retries(
            lambda: s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
            url,
            "CompleteMultipartUpload",
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
        Path(_local_path(url)).unlink(missing_ok=True)
        return
    bucket, key = split_s3_url(url)
    with_retries(lambda: client(endpoint_url).delete_object(Bucket=bucket, Key=key), url, "DELETE")


# ----------------------------------------------------------------------------------------------
# webdataset
# ----------------------------------------------------------------------------------------------

_default_endpoint: str | None = None


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> io.BufferedReader:
    if mode not in ("rb", "r"):
        raise ValueError(f"{url}: the s3 scheme is read-only (mode {mode!r})")
    endpoint_url = kw.get("endpoint_url") or _default_endpoint
    return open_url(url, endpoint_url=endpoint_url, counters=kw.get("counters"))


def register_s3_scheme(endpoint_url: str | None = None) -> None:
    """Installs `open_url` as webdataset's handler of `s3://` URLs in this process, so that
    `webdataset.WebDataset("s3://bucket/shard-{000..009}.tar")` reads through it too.

    Args:
        endpoint_url: default endpoint for S3-compatible stores (None: AWS or the environment
            variables read by `make_client`).
    """
    # `webdataset.gopen` the attribute is the function; the module is in sys.modules.
    wds_gopen = importlib.import_module("webdataset.gopen")
    global _default_endpoint
    _default_endpoint = endpoint_url
    wds_gopen.gopen_schemes["s3"] = _gopen_s3
