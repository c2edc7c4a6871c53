"""S3 failure semantics against a real endpoint (moto on loopback): fatal at once, or retried.

Missing or refused credentials and a missing bucket or object are never retried: the library
raises at the first attempt and a command ends with one line and its exit code (4 storage,
2 usage, see `megatron_ts.errors`). Dropped connections are still retried and succeed.

Requests are counted by the fault-injecting TCP proxy of `test_loader_s3.py` sitting between
boto3 and moto; moto checks credentials (`InvalidAccessKeyId`, HEAD `403`) only inside
`moto.core.authorization.enable_iam_authentication()`, which works here because the threaded
server runs in this process.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.demo import make_demo
from megatron_ts import storage
from megatron_ts.errors import EXIT_STORAGE, EXIT_USAGE, classify, run_cli
from megatron_ts.hf.vq_token_shuffle import NativeVQ, NativeVQConfig, save_native
from megatron_ts.storage import (
    IOCounters,
    RetryPolicy,
    S3AccessError,
    S3BucketNotFoundError,
    S3CredentialsError,
    S3NotFoundError,
    S3Reader,
    make_client,
)
from tests.integration.test_loader_s3 import FaultProxy, _proxy

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
NO_BUCKET = "ts-no-such-bucket-5e1c"  # a valid name that no test creates
_AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture()
def fresh_clients(monkeypatch):
    """Empty client caches: boto3 resolves credentials when a client is made."""
    monkeypatch.setattr(storage, "_clients", {})


def _no_credentials_env(env: dict, tmp_path: Path) -> dict:
    """`env` without any AWS credential source (the instance-metadata lookup switched off: off
    EC2 it costs up to ~2 s per client, which is botocore's, not a retry of ours)."""
    env = {k: v for k, v in env.items() if k not in _AWS_CREDENTIAL_VARS}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-credentials")
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-config")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


@pytest.fixture()
def no_credentials(s3_bucket, monkeypatch, tmp_path, fresh_clients):
    """(endpoint, bucket) with every credential source removed from this process."""
    for key in _AWS_CREDENTIAL_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in _no_credentials_env({}, tmp_path).items():
        monkeypatch.setenv(key, value)
    return s3_bucket


@pytest.fixture(scope="module")
def tokenize_inputs(tmp_path_factory) -> dict[str, Path]:
    """4 demo images in 2 local shards and an untrained native VQ (enough to start tokenize)."""
    root = tmp_path_factory.mktemp("s3err")
    make_demo(root / "raw", 4, resolution=32, per_shard=2)
    vq = root / "vq.safetensors"
    save_native(NativeVQ(NativeVQConfig(codebook_size=64, channels=[8, 16, 16])), vq)
    return {"raw": root / "raw", "vq": vq}


def _ts_data(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`ts-data ARGS` in a fresh process, as a user runs it (INFO logs off)."""
    env = dict(os.environ if env is None else env, TS_LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "data_tools.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tokenize_args(inputs: list[str], output: str, vq: Path, endpoint: str) -> list[str]:
    args = ["tokenize", "--input", *inputs, "--output", output, "--resolution", "32"]
    return args + ["--vq-checkpoint", str(vq), "--device", "cpu", "--endpoint-url", endpoint]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Credentials
# ----------------------------------------------------------------------------------------------


def test_missing_credentials_fail_at_once_without_retries(
    no_credentials, warnings_logged, capsys, monkeypatch
):
    """No request is sent and no backoff is taken (counted, not timed: making the client alone can
    take a second on a loaded machine)."""
    endpoint, bucket = no_credentials
    backoffs: list[int] = []
    monkeypatch.setattr(
        storage.RetryPolicy, "delay", lambda policy, attempt: backoffs.append(attempt) or 0.0
    )
    proxy = _proxy(endpoint)
    url = f"s3://{bucket}/raw/a.tar"
    counters = IOCounters()
    operations = {
        "read": lambda: storage.read_bytes(url, proxy.url),
        "write": lambda: storage.write_bytes(url, b"x", proxy.url),
        "list": lambda: storage.list_prefix(f"s3://{bucket}/raw/", proxy.url),
        "loader": lambda: S3Reader(url, endpoint_url=proxy.url, counters=counters),
    }
    try:
        for name, operation in operations.items():
            with pytest.raises(S3CredentialsError) as info:
                operation()
            assert backoffs == [], (name, backoffs)
            code, line = classify(info.value)
            assert code == EXIT_STORAGE and "\n" not in line
            assert line.startswith("no usable S3 credentials to access s3://") and "AWS_" in line
        capsys.readouterr()
        assert run_cli("ts-data", lambda: storage.read_bytes(url, proxy.url)) == EXIT_STORAGE
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"ts-data: no usable S3 credentials to access {url} (")
    finally:
        proxy.close()
    assert proxy.requests == []  # nothing was sent, so nothing could be retried
    assert counters.retries == 0 and warnings_logged == []


def test_tokenize_without_credentials_is_one_line_and_exit_4(s3_bucket, tokenize_inputs, tmp_path):
    endpoint, bucket = s3_bucket
    env = _no_credentials_env(dict(os.environ), tmp_path)
    args = _tokenize_args(
        [str(tokenize_inputs["raw"])], f"s3://{bucket}/tok/", tokenize_inputs["vq"], endpoint
    )
    proc = _ts_data(args, env)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == EXIT_STORAGE, proc.stderr
    assert line.startswith(f"ts-data: no usable S3 credentials to access s3://{bucket}/tok/")
    assert "retry" not in proc.stderr and proc.stdout == ""


def test_invalid_access_key_is_refused_once_and_not_retried(s3_bucket, warnings_logged):
    from moto.core.authorization import enable_iam_authentication

    endpoint, bucket = s3_bucket
    make_client(endpoint).put_object(Bucket=bucket, Key="raw/a.tar", Body=b"abc")
    proxy = _proxy(endpoint)
    url = f"s3://{bucket}/raw/a.tar"
    counters = IOCounters()
    # moto answers a HEAD with a bare 403 and a GET/PUT/LIST with InvalidAccessKeyId
    operations = {
        "read": ("GetObject", "InvalidAccessKeyId", lambda: storage.read_bytes(url, proxy.url)),
        "stat": ("HeadObject", "403", lambda: storage.stat_size(url, proxy.url)),
        "write": (
            "PutObject",
            "InvalidAccessKeyId",
            lambda: storage.write_bytes(url, b"x", proxy.url),
        ),
        "list": (
            "ListObjectsV2",
            "InvalidAccessKeyId",
            lambda: storage.list_prefix(f"s3://{bucket}/raw/", proxy.url),
        ),
        "loader": (
            "GetObject",
            "InvalidAccessKeyId",
            lambda: S3Reader(url, endpoint_url=proxy.url, counters=counters),
        ),
    }
    try:
        with enable_iam_authentication():  # moto now checks keys; "testing" is not one of them
            for name, (operation, code, call) in operations.items():
                before = len(proxy.requests)
                with pytest.raises(S3AccessError) as info:
                    call()
                # one request, no retry (timing says little here: the proxy does not answer a
                # PUT's "Expect: 100-continue", so botocore waits 1 s before sending the body)
                assert len(proxy.requests) == before + 1, (name, proxy.requests[before:])
                assert str(info.value).startswith(f"S3 refused {operation} s3://{bucket}/raw")
                assert f"({code})" in str(info.value)
                assert classify(info.value)[0] == EXIT_STORAGE
    finally:
        proxy.close()
    assert counters.retries == 0 and warnings_logged == []
    assert storage.read_bytes(url, endpoint) == b"abc"  # moto accepts any key again


# ----------------------------------------------------------------------------------------------
# Missing buckets and objects
# ----------------------------------------------------------------------------------------------


def _assert_not_found(exc: BaseException, url: str) -> None:
    assert isinstance(exc, FileNotFoundError)
    assert exc.errno == errno.ENOENT and exc.filename == url
    assert url in str(exc) and "\n" not in str(exc)
    assert classify(exc) == (EXIT_USAGE, str(exc))


def test_missing_bucket_on_read_list_and_write_names_the_url(
    s3_endpoint, warnings_logged, tmp_path
):
    proxy = _proxy(s3_endpoint)
    url = f"s3://{NO_BUCKET}/raw/a.tar"
    small = tmp_path / "a.tar"
    small.write_bytes(b"abc")
    big = tmp_path / "big.tar"
    big.write_bytes(bytes(6 << 20))
    operations = {
        # a HEAD cannot tell a missing bucket from a missing key: the object is not found
        "read": (S3NotFoundError, url, lambda: storage.read_bytes(url, proxy.url)),
        "loader": (S3BucketNotFoundError, url, lambda: S3Reader(url, endpoint_url=proxy.url)),
        "list": (
            S3BucketNotFoundError,
            f"s3://{NO_BUCKET}/raw/",
            lambda: storage.list_prefix(f"s3://{NO_BUCKET}/raw/", proxy.url),
        ),
        "write": (S3BucketNotFoundError, url, lambda: storage.write_bytes(url, b"x", proxy.url)),
        "upload": (S3BucketNotFoundError, url, lambda: storage.upload_file(small, url, proxy.url)),
        "multipart": (
            S3BucketNotFoundError,
            url,
            lambda: storage.upload_file(big, url, proxy.url, part_size=5 << 20, threshold=5 << 20),
        ),
        "check": (S3BucketNotFoundError, url, lambda: storage.check_bucket(url, proxy.url)),
    }
    try:
        for name, (cls, named, call) in operations.items():
            before = len(proxy.requests)
            with pytest.raises(cls) as info:
                call()
            assert len(proxy.requests) == before + 1, (name, proxy.requests[before:])
            _assert_not_found(info.value, named)
            if cls is S3BucketNotFoundError:
                assert f"S3 bucket '{NO_BUCKET}' does not exist" in str(info.value), name
    finally:
        proxy.close()
    assert warnings_logged == []


def test_missing_object_in_a_bucket_is_not_found_and_not_retried(s3_bucket, warnings_logged):
    endpoint, bucket = s3_bucket
    proxy = _proxy(endpoint)
    url = f"s3://{bucket}/raw/nope.tar"
    counters = IOCounters()
    try:
        with pytest.raises(S3NotFoundError) as info:
            storage.read_bytes(url, proxy.url)
        _assert_not_found(info.value, url)
        with pytest.raises(S3NotFoundError) as info:
            S3Reader(url, endpoint_url=proxy.url, counters=counters)
        _assert_not_found(info.value, url)
        assert storage.stat_size(url, proxy.url) is None and not storage.exists(url, proxy.url)
        storage.check_bucket(url, proxy.url)  # the bucket itself is there
    finally:
        proxy.close()
    assert len(proxy.requests) == 5 and counters.retries == 0 and warnings_logged == []


@pytest.mark.parametrize("form", ["tars", "prefix"])
def test_tokenize_with_a_missing_input_bucket_stops_before_any_work(
    form, s3_endpoint, tokenize_inputs, tmp_path
):
    inputs = {
        "tars": [f"s3://{NO_BUCKET}/raw/{{00000..00001}}.tar"],
        "prefix": [f"s3://{NO_BUCKET}/raw/"],
    }[form]
    out = tmp_path / "tok"
    proc = _ts_data(_tokenize_args(inputs, str(out), tokenize_inputs["vq"], s3_endpoint))
    line = _one_error_line(proc.stderr)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert line.startswith(
        f"ts-data: S3 bucket '{NO_BUCKET}' does not exist (s3://{NO_BUCKET}/raw/"
    )
    assert "create the bucket" in line
    assert not out.exists()  # not a failed input per shard: nothing was written at all


def test_tokenize_with_a_missing_output_bucket_stops_before_any_work(
    s3_bucket, tokenize_inputs, tmp_path
):
    endpoint, bucket = s3_bucket
    for path in sorted(tokenize_inputs["raw"].glob("*.tar")):
        storage.upload_file(path, f"s3://{bucket}/raw/{path.name}", endpoint)
    proxy = _proxy(endpoint)
    output = f"s3://{NO_BUCKET}/tok/"
    stage = tmp_path / "stage"
    stage.mkdir()
    args = _tokenize_args([f"s3://{bucket}/raw/"], output, tokenize_inputs["vq"], proxy.url)
    try:
        proc = _ts_data(args + ["--tmp-dir", str(stage)])
    finally:
        proxy.close()
    line = _one_error_line(proc.stderr)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert line.startswith(f"ts-data: S3 bucket '{NO_BUCKET}' does not exist ({output})")
    # one HEAD of the output bucket, then nothing: no input listed or read, nothing staged
    assert proxy.requests == [f"HEAD /{NO_BUCKET}"]
    assert list(stage.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Transient failures are still retried
# ----------------------------------------------------------------------------------------------


def test_dropped_connections_mid_body_are_retried_and_succeed(s3_bucket, warnings_logged):
    endpoint, bucket = s3_bucket
    data = os.urandom(200_000)
    make_client(endpoint).put_object(Bucket=bucket, Key="raw/obj.tar", Body=data)
    url = f"s3://{bucket}/raw/obj.tar"
    proxy: FaultProxy = _proxy(endpoint, cuts={"obj.tar": [5000, 60000]})
    try:
        assert storage.read_bytes(url, proxy.url) == data  # 2 GETs cut mid-body, resumed
        assert sum("; retry 1/9 in" in m for m in warnings_logged) == 2
        gets = [r for r in proxy.requests if r.startswith("GET ")]
        assert len(gets) == 3 and proxy.faults == 2

        proxy.cuts = {"obj.tar": [5000, 60000]}
        counters = IOCounters()
        reader = S3Reader(
            url, endpoint_url=proxy.url, counters=counters, policy=RetryPolicy(5, 0.01)
        )
        got = b""
        while chunk := reader.read(65536):
            got += chunk
        assert got == data and counters.retries == 2 and proxy.faults == 4
    finally:
        proxy.close()
