"""storage helpers without a server: retries with backoff, local atomic writes and uploads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from megatron_ts import storage


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

    assert storage.with_retries(flaky, "s3://b/k", base_delay=1.0) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    # jittered exponential backoff: attempt i waits base * 2**i * [0.5, 1.5)
    for i, delay in enumerate(sleeps):
        assert 0.5 * 2**i <= delay < 1.5 * 2**i


def test_retries_give_up_with_the_url_and_other_errors_are_not_retried(sleeps):
    calls = []

    def down():
        calls.append(1)
        raise ConnectionError("connection reset")

    with pytest.raises(storage.StorageError, match=r"s3://b/k: failed after 3 attempts"):
        storage.with_retries(down, "s3://b/k", attempts=3)
    assert len(calls) == 3 and len(sleeps) == 2

    def denied():
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    calls.clear()
    with pytest.raises(ClientError, match="AccessDenied"):
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
