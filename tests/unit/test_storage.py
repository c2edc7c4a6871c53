"""storage helpers without a server: retries with backoff, local atomic writes and uploads."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from megatron_ts import storage
from megatron_ts.errors import EXIT_STORAGE, EXIT_USAGE, classify
from megatron_ts.storage import (
    RetryPolicy,
    S3AccessError,
    S3BucketNotFoundError,
    S3NotFoundError,
)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.fixture()
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays `with_retries` asks for (nothing actually sleeps)."""
    delays: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    return delays


def test_transient_errors_are_retried_with_growing_backoff(sleeps):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise _client_error("SlowDown", 503)
        return "ok"

    policy = RetryPolicy(base_delay=1.0, max_delay=3.0)
    assert storage.with_retries(flaky, "s3://b/k", policy=policy) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    # full-jitter exponential backoff: retry i sleeps uniform in [0, min(cap, base * 2**i)]
    for i, delay in enumerate(sleeps):
        assert 0.0 <= delay <= min(3.0, 2**i)
    assert max(policy.delay(3) for _ in range(200)) > 2.0  # the bound grows (capped at 3)


def test_retries_give_up_with_the_url_and_other_errors_are_not_retried(sleeps):
    calls = []

    def down():
        calls.append(1)
        raise ConnectionError("connection reset")

    with pytest.raises(storage.StorageError, match=r"S3 GET of s3://b/k failed after 3 attempts"):
        storage.with_retries(down, "s3://b/k", "GET", policy=RetryPolicy(max_attempts=3))
    assert len(calls) == 3 and len(sleeps) == 2

    def denied():
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    calls.clear()
    with pytest.raises(S3AccessError, match=r"S3 refused GetObject s3://b/k \(AccessDenied\)"):
        storage.with_retries(denied, "s3://b/k")
    assert len(calls) == 1


@pytest.mark.parametrize(
    "exc",
    [
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        _client_error("InternalError", 500),
        _client_error("Whatever", 502),
        _client_error("TooManyRequests", 429),  # the store's throttling, as some answer it
        ConnectionResetError("reset by peer"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_and_server_errors_are_transient(exc, sleeps):
    calls = []

    def once():
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return "ok"

    assert storage.with_retries(once, "s3://b/k") == "ok" and len(sleeps) == 1


def test_local_write_and_upload_are_atomic_and_return_sha256(tmp_path: Path):
    dest = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(dest), b"hello")
    assert dest.read_bytes() == b"hello"
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10_000)
    out = tmp_path / "out" / "c.bin"
    assert storage.upload_file(src, str(out)) == hashlib.sha256(b"x" * 10_000).hexdigest()
    assert out.read_bytes() == src.read_bytes()
    # no temp files left beside the results
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "b.bin",
        "c.bin",
        "src.bin",
    ]
    assert storage.stat_size(str(out)) == 10_000 and storage.stat_size(str(tmp_path / "no")) is None
    assert storage.list_prefix(str(tmp_path / "out"), suffix=".bin") == [str(out)]


_FATAL = [
    NoCredentialsError(),
    PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
    CredentialRetrievalError(provider="iam-role", error_msg="timed out"),
    _client_error("AccessDenied", 403),
    _client_error("InvalidAccessKeyId", 403),
    _client_error("SignatureDoesNotMatch", 403),
    _client_error("ExpiredToken", 400),
    _client_error("InvalidToken", 400),
    _client_error("AllAccessDisabled", 403),
    _client_error("403", 403),  # what botocore makes of a HEAD answered 403 (no body)
]


@pytest.mark.parametrize(
    "exc", _FATAL, ids=lambda e: e.response["Error"]["Code"] if hasattr(e, "response") else None
)
def test_credential_and_access_errors_fail_at_once(exc, sleeps):
    """Built by hand for the codes moto cannot send (it answers InvalidAccessKeyId and 403)."""
    calls = []

    def refused():
        calls.append(1)
        raise exc

    with pytest.raises(S3AccessError, match="s3://b/k") as info:
        storage.with_retries(refused, "s3://b/k")
    assert len(calls) == 1 and sleeps == [] and info.value.__cause__ is exc
    assert classify(info.value)[0] == EXIT_STORAGE
    assert not storage.retryable(exc)


@pytest.mark.parametrize(
    ("code", "status", "cls"),
    [
        ("NoSuchBucket", 404, S3BucketNotFoundError),
        ("NoSuchKey", 404, S3NotFoundError),
        ("404", 404, S3NotFoundError),
    ],
)
def test_missing_bucket_or_object_is_a_file_not_found_error_naming_the_url(
    code, status, cls, sleeps
):
    calls = []

    def missing():
        calls.append(1)
        raise _client_error(code, status)

    with pytest.raises(cls) as info:
        storage.with_retries(missing, "s3://bkt/a/b.tar")
    err = info.value
    assert isinstance(err, FileNotFoundError) and len(calls) == 1 and sleeps == []
    assert err.errno == errno.ENOENT and err.filename == "s3://bkt/a/b.tar"
    assert "s3://bkt/a/b.tar" in str(err) and "\n" not in str(err)
    if cls is S3BucketNotFoundError:
        assert "S3 bucket 'bkt' does not exist" in str(err) and "create the bucket" in str(err)
    assert classify(err) == (EXIT_USAGE, str(err))
    assert not storage.retryable(_client_error(code, status))
