"""data_tools pieces without a pipeline run: ranks, shard sizes, reading input tars."""

from __future__ import annotations

import io
import tarfile
from types import SimpleNamespace

import pytest

from data_tools import shards
from data_tools.cli import _size
from data_tools.tokenize import TokenizeOptions, rank_from_env, tokenize
from megatron_ts import storage

SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


def test_rank_from_flags_then_slurm_array_then_single(monkeypatch):
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    assert rank_from_env(None, None) == (0, 1)
    assert rank_from_env(2, 4) == (2, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")  # --array=1-8
    assert rank_from_env(None, None) == (6, 8)
    # each value falls back on its own: a fixed --world-size keeps the task's rank
    assert rank_from_env(None, 8) == (6, 8)
    assert rank_from_env(0, None) == (0, 8)
    assert rank_from_env(3, 4) == (3, 4)
    with pytest.raises(ValueError, match="--rank 6 must be in"):
        TokenizeOptions(resolution=32, rank=6, world_size=4)


def test_shard_size_parser():
    assert _size("256MB") == 256 << 20
    assert _size("64KiB") == 64 << 10
    assert _size("1.5GB") == 3 << 29
    assert _size("1000") == 1000


def test_codebook_beyond_uint16_is_refused_before_reading():
    vq = SimpleNamespace(codebook_size=70_000, downsample=16)
    with pytest.raises(ValueError, match="70000 codes does not fit the uint16 codes.npy"):
        tokenize(["/nonexistent/{0..9}.tar"], "/nonexistent/out", vq, None, TokenizeOptions(256))


def _tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("txt", b"caption %d" % i), ("png", bytes(3000))):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Failing(io.RawIOBase):
    """A stream over `data` that raises `exc` once `limit` bytes were read."""

    def __init__(self, data: bytes, limit: int, exc: Exception | None):
        self.data, self.limit, self.exc, self.pos = data, limit, exc, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.pos >= self.limit:
            if self.exc is not None:
                raise self.exc
            return 0
        n = min(len(buf), self.limit - self.pos, 512)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_a_store_failure_is_raised_but_a_short_tar_is_a_truncation(monkeypatch):
    data = _tar_bytes(4)
    cut = len(data) // 2  # right before the header of k2.png

    def opener(exc):
        return lambda url, endpoint_url=None: io.BufferedReader(_Failing(data, cut, exc))

    # the file simply ends: samples before the cut, then a ShardReadError naming the key
    monkeypatch.setattr(shards.storage, "open_url", opener(None))
    items = list(shards.iter_samples("s3://b/x.tar"))
    assert [type(i).__name__ for i in items] == ["RawSample", "RawSample", "ShardReadError"]
    assert items[-1].key == "k2" and "truncated" in items[-1].error
    # the store gave up after its retries: not a truncation, the caller fails (and retries) it
    failure = storage.StorageError("s3://b/x.tar: failed after 6 attempts")
    data = _tar_bytes(12)
    cut = len(data) // 2
    monkeypatch.setattr(shards.storage, "open_url", opener(failure))
    got = []
    with pytest.raises(storage.StorageError, match="failed after 6 attempts"):
        for item in shards.iter_samples("s3://b/x.tar"):
            got.append(item)
    assert got and all(isinstance(i, shards.RawSample) for i in got)
