"""Resumable streaming reads of local files and `s3://` objects, registered with webdataset.

`S3Reader` is a read-only file object over one S3 object. It streams a GET and, when the
connection drops, the server answers 5xx / throttles (503 SlowDown), or the stream ends before
the object's length, it reopens the object with `Range: bytes=<offset>-` (and `If-Match` on the
first response's ETag, so a replaced object is an error instead of silently mixed bytes) and
continues where it stopped. Attempts are bounded and spaced by exponential backoff with full
jitter. Failures no retry can fix are raised at the first attempt (`megatron_ts.s3.fatal_error`):
a missing object or bucket as `FileNotFoundError` naming the URL (`S3NotFoundError`), missing or
refused credentials and denied access as `S3AccessError`.

botocore's own retries are switched off for these clients (`max_attempts=0`) so that every retry
is ours: counted in `IOCounters.retries` and reported to the trainer.

`register_s3_scheme()` installs the reader as webdataset's `s3` URL scheme, so
`webdataset.WebDataset("s3://bucket/shard-{000..009}.tar")` uses it as well.
"""

from __future__ import annotations

import importlib
import io
import os
import random
import threading
import time
from dataclasses import dataclass

from megatron_ts.logging import get_logger
from megatron_ts.s3 import (
    S3BucketNotFoundError,
    S3NotFoundError,
    fatal_error,
    make_client,
    split_s3_url,
)

logger = get_logger(__name__)

# Error codes S3 (and S3-compatible stores) send when a retry can succeed.
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "503",
    "500",
    "502",
    "504",
}


@dataclass
class IOCounters:
    """Byte and retry counters of one reader process (reported as loader metrics)."""

    bytes_read: int = 0
    """Bytes delivered by shard readers (local and S3)."""
    retries: int = 0
    """S3 requests retried after throttling, 5xx or a dropped connection."""


@dataclass
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    max_attempts: int = 10
    """Attempts per read position (the first try included) before giving up."""
    base_delay: float = 0.2
    """Seconds before the first retry; doubled on each further retry."""
    max_delay: float = 20.0
    """Cap on one backoff sleep in seconds."""

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff before retry number `attempt` (1-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


_clients: dict[tuple[int, str | None], object] = {}
_clients_lock = threading.Lock()
_default_endpoint: str | None = None


def get_client(endpoint_url: str | None = None):
    """A boto3 S3 client per (process, endpoint), created lazily (clients do not survive fork)."""
    key = (os.getpid(), endpoint_url)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            # no botocore retries or rate limiting: every retry is ours, counted and backed off
            client = make_client(endpoint_url, max_attempts=0, retry_mode="standard")
            _clients[key] = client
        return client


def _is_retryable(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    if fatal_error(exc, "") is not None or isinstance(exc, ParamValidationError):
        return False  # credentials, access, a missing bucket or object, a malformed request
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return err.get("Code") in _RETRY_CODES or status >= 500 or status == 429
    # Dropped connections surface as botocore errors (ResponseStreamingError, IncompleteReadError,
    # ConnectionClosedError, ReadTimeoutError, EndpointConnectionError), urllib3 ProtocolError or
    # plain socket errors depending on where the stream broke.
    if isinstance(exc, BotoCoreError | OSError):
        return True
    return type(exc).__module__.startswith("urllib3")


def _fatal(exc: BaseException, url: str, what: str) -> Exception | None:
    """The error to raise at once for `exc` (see `megatron_ts.s3.fatal_error`), or None."""
    fatal = fatal_error(exc, url, what)
    if isinstance(fatal, S3NotFoundError) and not isinstance(fatal, S3BucketNotFoundError):
        return S3NotFoundError.of(
            url,
            f"S3 object {url} does not exist (404); check the source URL and that the "
            "manifest lists only uploaded shards",
        )
    return fatal


class S3Reader(io.RawIOBase):
    """A sequential, resumable reader of one S3 object.

    Args:
        url: s3://bucket/key.
        endpoint_url: S3-compatible endpoint (None: `megatron_ts.s3.make_client` defaults).
        counters: where bytes and retries are counted.
        policy: retry policy.
    """

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        counters: IOCounters | None = None,
        policy: RetryPolicy | None = None,
    ):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3_url(url)
        self.client = get_client(endpoint_url)
        self.counters = counters if counters is not None else IOCounters()
        self.policy = policy or RetryPolicy()
        self.offset = 0
        self.size: int | None = None
        self.etag: str | None = None
        self._body = None
        self._open()

    def readable(self) -> bool:
        return True

    def _retry_or_raise(self, exc: BaseException, attempt: int, what: str) -> None:
        fatal = _fatal(exc, self.url, what)
        if fatal is not None:
            raise fatal from exc
        if not _is_retryable(exc):
            raise OSError(f"S3 {what} of {self.url} failed: {exc}") from exc
        if attempt >= self.policy.max_attempts:
            raise OSError(
                f"S3 {what} of {self.url} at byte {self.offset} failed after {attempt} attempts: "
                f"{exc}; check the endpoint and network, or raise RetryPolicy.max_attempts"
            ) from exc
        delay = self.policy.delay(attempt)
        self.counters.retries += 1
        logger.warning(
            "S3 %s of %s at byte %d failed (%s: %s); retry %d/%d in %.2fs",
            what,
            self.url,
            self.offset,
            type(exc).__name__,
            exc,
            attempt,
            self.policy.max_attempts - 1,
            delay,
        )
        time.sleep(delay)

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        for attempt in range(1, self.policy.max_attempts + 1):
            kwargs = {"Bucket": self.bucket, "Key": self.key}
            if self.offset > 0:
                kwargs["Range"] = f"bytes={self.offset}-"
            if self.etag is not None:
                kwargs["IfMatch"] = self.etag
            try:
                resp = self.client.get_object(**kwargs)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:
                    raise OSError(
                        f"S3 object {self.url} changed while it was being read (ETag "
                        f"{self.etag}); shards must not be rewritten during training"
                    ) from exc
                self._retry_or_raise(exc, attempt, "GET")
                continue
            except Exception as exc:  # noqa: BLE001 - classified in _retry_or_raise
                self._retry_or_raise(exc, attempt, "GET")
                continue
            if self.size is None:
                self.size = int(resp["ContentLength"])
                self.etag = resp.get("ETag")
            self._body = resp["Body"]
            return

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
            except Exception as exc:  # noqa: BLE001 - classified in _retry_or_raise
                self._close_body()
                attempt += 1
                self._retry_or_raise(exc, attempt, "read")
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
    bufsize: int = 1 << 20,
) -> io.BufferedReader:
    """Opens a local path, file:// URL or s3:// URL for buffered sequential reading.

    Raises:
        FileNotFoundError: naming the path or URL when it does not exist.
    """
    counters = counters if counters is not None else IOCounters()
    if url.startswith("s3://"):
        raw = S3Reader(url, endpoint_url=endpoint_url, counters=counters)
    else:
        path = url[len("file://") :] if url.startswith("file://") else url
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {path} does not exist; check the source directory")
        raw = CountingFile(path, counters)
    return io.BufferedReader(raw, buffer_size=bufsize)


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    """Reads a whole small object (a manifest) from a local path or S3."""
    with open_url(url, endpoint_url) as f:
        return f.read()


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> io.BufferedReader:
    if mode not in ("rb", "r"):
        raise ValueError(f"{url}: the s3 scheme is read-only (mode {mode!r})")
    endpoint_url = kw.get("endpoint_url") or _default_endpoint
    return open_url(url, endpoint_url=endpoint_url, counters=kw.get("counters"))


def register_s3_scheme(endpoint_url: str | None = None) -> None:
    """Installs `S3Reader` as webdataset's handler for `s3://` URLs in this process.

    Args:
        endpoint_url: default endpoint for S3-compatible stores (None: AWS or the environment
            variables read by `megatron_ts.s3.make_client`).
    """
    # `webdataset.gopen` the attribute is the function; the module is in sys.modules.
    wds_gopen = importlib.import_module("webdataset.gopen")
    global _default_endpoint
    _default_endpoint = endpoint_url
    wds_gopen.gopen_schemes["s3"] = _gopen_s3
