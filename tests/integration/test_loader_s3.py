"""The loader against a real S3 endpoint (moto on loopback) behind a fault-injecting TCP proxy.

The proxy sits between boto3 and moto and breaks things at the HTTP layer as a flaky network or
an overloaded S3 would: it cuts the connection (TCP reset) after N bytes of an object's response,
or answers `503 SlowDown` to the first K object GETs.
"""

from __future__ import annotations

import io
import socket
import struct
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from megatron_ts.data.loader import build_loader
from megatron_ts.data.pipeline import CorruptDataError
from megatron_ts.data.sources import DataSourceError
from megatron_ts.storage import (
    IOCounters,
    RetryPolicy,
    S3Reader,
    StorageError,
    make_client,
    register_s3_scheme,
)
from tests.unit.test_loader_helpers import (
    DOWNSAMPLE,
    VOCAB,
    make_data_cfg,
    make_stage,
    write_source,
)

SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """A loopback HTTP proxy with scripted faults; one request per connection, bounded loops.

    Args:
        upstream: (host, port) of the real endpoint.
        cuts: path substring -> list of byte counts; the n-th GET whose path contains the
            substring is reset after cuts[n] response bytes (later GETs pass).
        slowdowns: the first `slowdowns` GETs of .tar objects get 503 SlowDown.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        cuts: dict[str, list[int]] | None = None,
        slowdowns: int = 0,
    ):
        self.upstream = upstream
        self.cuts = {k: list(v) for k, v in (cuts or {}).items()}
        self.slowdowns = slowdowns
        self.requests: list[str] = []
        self.faults = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            header, _, body = head.partition(b"\r\n\r\n")
            lines = header.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            path_s = path.decode()
            length = 0
            kept = [lines[0]]
            for line in lines[1:]:
                name = line.split(b":", 1)[0].strip().lower()
                if name == b"content-length":
                    length = int(line.split(b":", 1)[1])
                if name != b"connection":
                    kept.append(line)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            cut = None
            with self.lock:
                self.requests.append(f"{method.decode()} {path_s}")
                if (
                    method == b"GET"
                    and path_s.split("?")[0].endswith(".tar")
                    and self.slowdowns > 0
                ):
                    self.slowdowns -= 1
                    self.faults += 1
                    conn.sendall(SLOWDOWN % (len(SLOWDOWN_BODY), SLOWDOWN_BODY))
                    return
                for pattern, budget in self.cuts.items():
                    if method == b"GET" and pattern in path_s and budget:
                        cut = budget.pop(0)
                        self.faults += 1
                        break
            up = socket.create_connection(self.upstream, timeout=10)
            try:
                up.sendall(b"\r\n".join(kept + [b"Connection: close"]) + b"\r\n\r\n" + body)
                sent = 0
                while True:
                    data = up.recv(65536)
                    if not data:
                        break
                    if cut is not None and sent + len(data) >= cut:
                        conn.sendall(data[: cut - sent])
                        # Reset instead of a clean close: what a dropped connection looks like.
                        conn.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        return
                    conn.sendall(data)
                    sent += len(data)
            finally:
                up.close()
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture(scope="module")
def local_source(tmp_path_factory) -> Path:
    # 6 shards of 12 samples; each shard is ~50 KB so a cut lands in the middle of an object.
    return write_source(tmp_path_factory.mktemp("s3src"), shards=6, per_shard=12, name="s")


def _upload(endpoint: str, bucket: str, src: Path, prefix: str = "tokens/") -> str:
    client = make_client(endpoint)
    for path in sorted(src.iterdir()):
        client.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def _proxy(endpoint: str, **kw) -> FaultProxy:
    host, port = endpoint.removeprefix("http://").split(":")
    return FaultProxy((host, int(port)), **kw)


def _stream(url: str, endpoint: str | None, n: int, **cfg) -> list[dict]:
    stage = make_stage([(url, 1.0)])
    defaults = dict(num_workers=2, caption_dropout=0.2, s3_endpoint=endpoint)
    defaults.update(cfg)
    loader = build_loader(
        make_data_cfg(**defaults),
        stage,
        VOCAB,
        seed=7,
        dp_rank=0,
        dp_size=1,
        downsample=DOWNSAMPLE,
        processes=False,
    )
    out = [next(loader) for _ in range(n)]
    out.append(loader.metrics())
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        for name in ("text", "text_mask", "codes", "dropped"):
            assert torch.equal(x[name], y[name]), name


def test_reader_resumes_a_cut_stream_and_retries_slowdown(s3_bucket, local_source):
    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    raw = (local_source / "shard-00002.tar").read_bytes()
    proxy = _proxy(endpoint, cuts={"shard-00002.tar": [3000, 20000, 5000]}, slowdowns=2)
    try:
        counters = IOCounters()
        policy = RetryPolicy(max_attempts=5, base_delay=0.01)
        reader = S3Reader(
            base + "shard-00002.tar", endpoint_url=proxy.url, counters=counters, policy=policy
        )
        got = b""
        while chunk := reader.read(7777):
            got += chunk
        assert got == raw
        assert counters.bytes_read == len(raw)
        assert counters.retries == 5 and proxy.faults == 5
        ranged = [r for r in proxy.requests if "shard-00002" in r]
        assert len(ranged) == 6  # 2 x 503, 3 cut GETs, the last (ranged) GET whole
    finally:
        proxy.close()


def test_reader_names_a_missing_object_and_gives_up_after_bounded_attempts(s3_bucket):
    endpoint, bucket = s3_bucket
    with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/nope.tar does not exist"):
        S3Reader(f"s3://{bucket}/nope.tar", endpoint_url=endpoint)
    proxy = _proxy(endpoint, slowdowns=100)
    make_client(endpoint).put_object(Bucket=bucket, Key="x.tar", Body=b"abc")
    try:
        with pytest.raises(
            StorageError, match=r"S3 GET at byte 0 of s3://.*/x.tar failed after 2 "
        ):
            S3Reader(f"s3://{bucket}/x.tar", endpoint_url=proxy.url, policy=RetryPolicy(2, 0.01))
    finally:
        proxy.close()


def test_webdataset_reads_s3_urls_through_the_registered_scheme(s3_bucket, local_source):
    import webdataset as wds

    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    register_s3_scheme(endpoint)
    ds = wds.WebDataset(base + "shard-{00000..00001}.tar", shardshuffle=False, empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert keys == [f"s-{s:03d}-{j:04d}" for s in range(2) for j in range(12)]


def test_loader_stream_with_faults_equals_the_stream_without(s3_bucket, local_source):
    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    n = 24  # 96 samples: more than the 72 of one epoch
    reference = _stream(str(local_source), None, n)
    clean = _stream(base, endpoint, n)
    _assert_same(reference[:-1], clean[:-1])
    assert clean[-1]["retries"] == 0
    proxy = _proxy(
        endpoint,
        cuts={"shard-00001.tar": [5000], "shard-00004.tar": [30000, 9000]},
        slowdowns=1,
    )
    try:
        faulty = _stream(base, proxy.url, n)
    finally:
        proxy.close()
    _assert_same(clean[:-1], faulty[:-1])
    assert faulty[-1]["retries"] == proxy.faults == 4
    assert faulty[-1]["bytes_read"] == clean[-1]["bytes_read"]  # resumed, not re-read


def test_missing_shard_is_skipped_and_the_rest_of_the_stream_is_unchanged(s3_bucket, local_source):
    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    # One stream: its order is the shards' order minus the missing one (with several streams,
    # the stream that lost the shard moves on to its next epoch instead).
    cfg = dict(num_workers=1, shuffle_buffer=1, max_error_rate=0.5, streams=1)
    clean = _stream(base, endpoint, 20, **cfg)
    make_client(endpoint).delete_object(Bucket=bucket, Key="tokens/shard-00003.tar")
    faulty = _stream(base, endpoint, 15, **cfg)  # the 60 samples of the 5 shards left
    metrics = faulty.pop()
    clean_keys = [k for b in clean[:-1] for k in b["keys"] if not k.startswith("s-003-")]
    faulty_keys = [k for b in faulty for k in b["keys"]]
    assert faulty_keys == clean_keys[: len(faulty_keys)]
    assert len(set(faulty_keys)) == 60
    assert metrics["missing_shards"] >= 1 and metrics["skipped_samples"] >= 12


def test_changed_shard_objects_are_detected_without_extra_requests(s3_bucket, local_source):
    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    proxy = _proxy(endpoint)
    try:
        _stream(base, proxy.url, 24, num_workers=1)  # the 72 samples of an epoch, and more
    finally:
        proxy.close()
    # The size comes from the one GET per shard (Content-Length): no HEAD requests.
    shard_requests = [r.split("?")[0] for r in proxy.requests if ".tar" in r]
    assert shard_requests and all(r.startswith("GET ") for r in shard_requests)

    client = make_client(endpoint)
    raw = (local_source / "shard-00002.tar").read_bytes()
    changed = bytearray(raw)
    changed[raw.index(b"caption 30") + len("caption ")] = ord("7")  # same size, tar still parses
    client.put_object(Bucket=bucket, Key="tokens/shard-00002.tar", Body=bytes(changed))
    url = rf"s3://{bucket}/tokens/shard-00002\.tar"
    with pytest.raises(CorruptDataError, match=rf"shard {url} key <shard>: sha256 [0-9a-f]{{64}}"):
        _stream(base, endpoint, 24, num_workers=1)

    client.put_object(Bucket=bucket, Key="tokens/shard-00002.tar", Body=raw + bytes(512))
    with pytest.raises(
        CorruptDataError, match=rf"shard {url} key <shard>: size {len(raw) + 512} bytes, manifest"
    ):
        _stream(base, endpoint, 24, num_workers=1)


def test_missing_manifest_names_the_url(s3_bucket):
    endpoint, bucket = s3_bucket
    with pytest.raises(DataSourceError, match=rf"s3://{bucket}/empty/manifest.json not found"):
        _stream(f"s3://{bucket}/empty/", endpoint, 1)


def test_worker_processes_read_s3(s3_bucket, local_source):
    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    stage = make_stage([(base, 1.0)])
    cfg = make_data_cfg(num_workers=2, s3_endpoint=endpoint)
    loader = build_loader(cfg, stage, VOCAB, seed=7, dp_rank=0, dp_size=1, downsample=DOWNSAMPLE)
    try:
        batches = [next(loader) for _ in range(6)]
    finally:
        loader.close()
    inproc = _stream(base, endpoint, 6, caption_dropout=0.0)
    _assert_same(batches, inproc[:-1])


def test_reader_is_a_file_object_for_tarfile(s3_bucket, local_source):
    endpoint, bucket = s3_bucket
    base = _upload(endpoint, bucket, local_source)
    proxy = _proxy(endpoint, cuts={"shard-00000.tar": [10000]})
    try:
        reader = io.BufferedReader(
            S3Reader(base + "shard-00000.tar", endpoint_url=proxy.url, policy=RetryPolicy(3, 0.01))
        )
        names = [m.name for m in tarfile.open(fileobj=reader, mode="r|*")]
    finally:
        proxy.close()
    assert len(names) == 48 and names[0] == "s-000-0000.codes.npy"
