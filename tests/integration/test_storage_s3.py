"""storage against a real S3 endpoint on loopback: multipart, checksums, abort, ranged reads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from megatron_ts import storage
from megatron_ts.storage import S3AccessError

MIB = 1 << 20


class _Proxy:
    """A boto3 client whose chosen methods are replaced; the rest go to the real client."""

    def __init__(self, real, **overrides):
        self._real, self._overrides = real, overrides

    def __getattr__(self, name):
        return self._overrides.get(name) or getattr(self._real, name)


@pytest.fixture()
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.tar"
    path.write_bytes(os.urandom(11 * MIB))  # 3 parts of 5 MiB (S3's minimum but for the last)
    return path


def test_multipart_upload_verifies_and_reads_back(s3_bucket, big_file, monkeypatch):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/out/big.tar"
    sha = storage.upload_file(big_file, url, endpoint, part_size=5 * MIB, threshold=5 * MIB)
    data = big_file.read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    head = storage.client(endpoint).head_object(Bucket=bucket, Key="out/big.tar")
    assert head["ETag"].strip('"').endswith("-3")  # really went up in 3 parts
    assert head["Metadata"]["sha256"] == sha
    real = storage.client(endpoint)
    gets = []

    def get_object(**kw):
        gets.append((kw.get("Range"), kw.get("IfMatch")))
        return real.get_object(**kw)

    monkeypatch.setattr(storage, "client", lambda e=None: _Proxy(real, get_object=get_object))
    assert storage.read_bytes(url, endpoint) == data
    assert gets == [(None, None)]  # one streamed GET for the whole object
    gets.clear()
    with storage.open_url(url, endpoint) as f:  # tarfile-sized reads come from the buffer
        assert b"".join(iter(lambda: f.read(10240), b"")) == data
    assert gets == [(None, None)]
    assert storage.stat_size(url, endpoint) == 11 * MIB
    assert storage.list_prefix(f"s3://{bucket}/out", endpoint) == [url]


def test_small_put_carries_sha256_and_checksum_mismatch_is_an_error(
    s3_bucket, monkeypatch, tmp_path
):
    endpoint, bucket = s3_bucket
    storage.write_bytes(f"s3://{bucket}/small.json", b"{}", endpoint)
    head = storage.client(endpoint).head_object(Bucket=bucket, Key="small.json")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"{}").hexdigest()

    real = storage.client(endpoint)

    def put_object(**kw):  # a store that answers with another MD5 than what was sent
        return dict(real.put_object(**kw), ETag='"00000000000000000000000000000000"')

    monkeypatch.setattr(storage, "client", lambda e=None: _Proxy(real, put_object=put_object))
    with pytest.raises(storage.StorageError, match=r"small2.json: upload checksum mismatch"):
        storage.write_bytes(f"s3://{bucket}/small2.json", b"{}", endpoint)
    src = tmp_path / "s.bin"
    src.write_bytes(b"abc")
    with pytest.raises(storage.StorageError, match="upload checksum mismatch"):
        storage.upload_file(src, f"s3://{bucket}/s.bin", endpoint)


def test_failed_multipart_upload_is_aborted(s3_bucket, big_file, monkeypatch):
    endpoint, bucket = s3_bucket
    real = storage.client(endpoint)
    parts = []

    def upload_part(**kw):
        parts.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "UploadPart")
        return real.upload_part(**kw)

    monkeypatch.setattr(storage, "client", lambda e=None: _Proxy(real, upload_part=upload_part))
    url = f"s3://{bucket}/out/big.tar"
    with pytest.raises(S3AccessError, match=rf"UploadPart {url} \(AccessDenied\)"):
        storage.upload_file(big_file, url, endpoint, part_size=5 * MIB, threshold=5 * MIB)
    assert parts == [1, 2]
    assert not real.list_multipart_uploads(Bucket=bucket).get("Uploads")  # nothing left behind
    assert storage.stat_size(url, endpoint) is None


def test_ranged_reads_retry_a_throttled_get(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    storage.write_bytes(f"s3://{bucket}/obj", b"0123456789" * 1000, endpoint)
    real = storage.client(endpoint)
    calls = []

    def get_object(**kw):
        calls.append(kw.get("Range"))
        if len(calls) == 1:
            raise ClientError(
                {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                "GetObject",
            )
        return real.get_object(**kw)

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setattr(storage, "client", lambda e=None: _Proxy(real, get_object=get_object))
    assert storage.read_bytes(f"s3://{bucket}/obj", endpoint) == b"0123456789" * 1000
    assert calls == [None, None]  # the same whole-object GET again, then done


class _CutBody:
    """A GetObject body that drops the connection after `cut` bytes."""

    def __init__(self, body, cut: int):
        self.body, self.left = body, cut

    def read(self, n: int) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        data = self.body.read(min(n, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.body.close()


def test_a_dropped_read_resumes_at_its_offset_only_on_the_same_object(s3_bucket, monkeypatch):
    """Data tools and the loader read through one reader: Range from the offset and If-Match."""
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/obj"
    data = os.urandom(3 * MIB)
    storage.write_bytes(url, data, endpoint)
    real = storage.client(endpoint)
    gets = []

    def get_object(**kw):
        gets.append((kw.get("Range"), kw.get("IfMatch")))
        resp = real.get_object(**kw)
        if len(gets) == 1:
            resp["Body"] = _CutBody(resp["Body"], MIB + 123)
        return resp

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setattr(storage, "client", lambda e=None: _Proxy(real, get_object=get_object))
    counters = storage.IOCounters()
    with storage.open_url(url, endpoint, counters) as f:
        assert f.read() == data
    etag = real.head_object(Bucket=bucket, Key="obj")["ETag"]
    assert gets == [(None, None), (f"bytes={MIB + 123}-", etag)]
    assert counters.retries == 1 and counters.bytes_read == len(data)

    # the object replaced between the two GETs: an error naming it, not mixed bytes
    gets.clear()

    def replaced(**kw):
        gets.append(kw.get("Range"))
        if len(gets) == 2:
            real.put_object(Bucket=bucket, Key="obj", Body=b"new contents")
        resp = real.get_object(**kw)
        if len(gets) == 1:
            resp["Body"] = _CutBody(resp["Body"], MIB)
        return resp

    monkeypatch.setattr(storage, "client", lambda e=None: _Proxy(real, get_object=replaced))
    with pytest.raises(storage.StorageError, match=r"S3 object .*obj changed while it was being"):
        storage.read_bytes(url, endpoint)
