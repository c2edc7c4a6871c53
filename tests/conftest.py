"""Shared fixtures: a real S3 endpoint on loopback (moto's threaded server) and helpers."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of an S3 HTTP endpoint served by moto on 127.0.0.1, with dummy credentials set.

    boto3 talks to it over real HTTP, so retries, ranged GETs and multipart uploads are exercised
    as against AWS.
    """
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback endpoint; returns (endpoint_url, bucket_name)."""
    from megatron_ts.storage import make_client

    name = f"ts-test-{uuid.uuid4().hex[:12]}"
    make_client(s3_endpoint).create_bucket(Bucket=name)
    return s3_endpoint, name


@contextlib.contextmanager
def _package_messages(level: int):
    """Messages of the package logger at `level` or above (it does not reach pytest's caplog)."""
    from megatron_ts.logging import get_logger

    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = _Collect(level)
    get_logger("megatron_ts").addHandler(handler)
    try:
        yield messages
    finally:
        get_logger("megatron_ts").removeHandler(handler)


@pytest.fixture()
def logged():
    """Every message of the package logger during the test."""
    with _package_messages(logging.DEBUG) as messages:
        yield messages


@pytest.fixture()
def warnings_logged():
    """Warnings of the package logger during the test (retries log one each)."""
    with _package_messages(logging.WARNING) as messages:
        yield messages


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip with a visible reason on machines without CUDA.

    TS_GPU_TESTS_ON_CPU=1 runs them on CPU instead (tests/gpu/conftest.py; the GPU check's
    `--smoke` mode uses it so their code cannot rot between GPU visits).
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("TS_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (run on a GPU node)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
