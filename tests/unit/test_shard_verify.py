"""The loader verifies every token shard against its manifest: size at open, sha256 while reading."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path

import pytest

from megatron_ts.data.loader import build_loader
from megatron_ts.data.pipeline import CorruptDataError, ErrorTracker, shard_records, tar_records
from megatron_ts.data.sources import read_source
from tests.unit.test_loader_helpers import (
    DOWNSAMPLE,
    VOCAB,
    make_data_cfg,
    make_stage,
    sample_members,
    write_source,
    write_tar,
)

PER_SHARD = 20
HEX = r"[0-9a-f]{64}"


def _source(tmp_path: Path) -> Path:
    return write_source(tmp_path, shards=2, per_shard=PER_SHARD, name="v")


def _change_one_byte(path: Path) -> None:
    """Rewrites one caption byte of the shard: same size, the tar still parses, sha256 differs."""
    data = bytearray(path.read_bytes())
    at = data.index(b"caption 25") + len("caption ")
    data[at] = ord("7")
    path.write_bytes(bytes(data))


def _loader(src: Path, max_error_rate: float, **kw):
    # one stream: the shards are read one after the other, so the samples of a skipped shard
    # are missing from an epoch that holds every other sample once (with several streams the
    # skipped shard's stream moves on to its next epoch instead)
    return build_loader(
        make_data_cfg(num_workers=1, max_error_rate=max_error_rate, streams=1),
        make_stage([(str(src), 1.0)]),
        VOCAB,
        seed=0,
        dp_rank=0,
        dp_size=1,
        downsample=DOWNSAMPLE,
        processes=False,
        **kw,
    )


def _keys(loader, batches: int) -> list[str]:
    return [k for _ in range(batches) for k in next(loader)["keys"]]


def _entry(src: Path, name: str) -> dict:
    manifest = json.loads((src / "manifest.json").read_text())
    return next(s for s in manifest["shards"] if s["name"] == name)


def test_manifest_bytes_and_sha256_reach_the_loader_and_are_optional(tmp_path):
    src = _source(tmp_path)
    raw = (src / "shard-00001.tar").read_bytes()
    shard = read_source(str(src), 1.0)[0].shards[1]
    assert (shard.bytes, shard.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())

    # A minimal manifest (no bytes, no sha256) still loads; its shards are read unverified.
    manifest = json.loads((src / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["bytes"], entry["sha256"]
    (src / "manifest.json").write_text(json.dumps(manifest))
    shards = read_source(str(src), 1.0)[0].shards
    assert [(s.bytes, s.sha256) for s in shards] == [(None, None), (None, None)]
    loader = _loader(src, max_error_rate=0.0)
    assert len(set(_keys(loader, 10))) == 2 * PER_SHARD
    assert loader.metrics()["skipped_samples"] == 0


def test_good_shard_is_hashed_to_its_end_and_not_reported(tmp_path):
    src = _source(tmp_path)
    entry = _entry(src, "shard-00000.tar")
    tracker = ErrorTracker(max_error_rate=0.0)
    records = list(
        shard_records(
            str(src / entry["name"]),
            PER_SHARD,
            tracker,
            None,
            size=entry["bytes"],
            sha256=entry["sha256"],
        )
    )
    assert len(records) == PER_SHARD and tracker.skipped == 0
    # The digest covers every byte after the end-of-archive marker (padding of other tar writers).
    padded = (src / entry["name"]).read_bytes() + bytes(3 * 10240)
    sha = hashlib.sha256(padded).hexdigest()
    assert len(list(tar_records("p.tar", io.BytesIO(padded), tracker, PER_SHARD, sha))) == PER_SHARD
    assert tracker.skipped == 0


def test_changed_byte_is_counted_corrupt_naming_the_shard(tmp_path, caplog):
    src = _source(tmp_path)
    shard = src / "shard-00001.tar"
    size = shard.stat().st_size
    _change_one_byte(shard)
    assert shard.stat().st_size == size

    loader = _loader(src, max_error_rate=0.6)
    with caplog.at_level(logging.WARNING, logger="megatron_ts.data.pipeline"):
        keys = _keys(loader, 10)  # the whole first epoch
    # Streaming: the changed shard's samples were used before its end was reached.
    assert len(set(keys)) == 2 * PER_SHARD
    m = loader.metrics()
    assert (m["skipped_samples"], m["samples_read"]) == (PER_SHARD, 2 * PER_SHARD)
    assert re.search(
        rf"shard {re.escape(str(shard))} key <shard>: sha256 {HEX}, manifest", caplog.text
    )

    with pytest.raises(
        CorruptDataError,
        match=rf"shard-00001\.tar key <shard>: sha256 {HEX}, manifest says {HEX}: the shard "
        r"changed after tokenization.*re-run ts-data tokenize",
    ):
        _keys(_loader(src, max_error_rate=0.0), 12)


@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_size_mismatch_skips_the_shard_before_any_sample(tmp_path, caplog, change):
    src = _source(tmp_path)
    entry = _entry(src, "shard-00001.tar")
    shard = src / entry["name"]
    raw = shard.read_bytes()
    changed = raw[: len(raw) // 2] if change == "truncated" else raw + bytes(1024)
    shard.write_bytes(changed)

    tracker = ErrorTracker(max_error_rate=0.5)
    with caplog.at_level(logging.WARNING, logger="megatron_ts.data.pipeline"):
        records = shard_records(
            str(shard), PER_SHARD, tracker, None, size=entry["bytes"], sha256=entry["sha256"]
        )
        assert next(records, None) is None
    assert (tracker.seen, tracker.skipped) == (PER_SHARD, PER_SHARD)
    assert f"size {len(changed)} bytes, manifest says {len(raw)}" in caplog.text

    # Through the loader: none of its samples, and a strict rate names the shard and sizes.
    keys = _keys(_loader(src, max_error_rate=0.6), 5)
    assert sorted(keys) == [f"v-000-{j:04d}" for j in range(PER_SHARD)]
    with pytest.raises(CorruptDataError, match=r"shard-00001\.tar key <shard>: size \d+ bytes"):
        _keys(_loader(src, max_error_rate=0.0), 12)


def _tar_bytes(tmp_path: Path, n: int) -> bytes:
    return write_tar(tmp_path / "t.tar", [(f"k{i}", sample_members(f"k{i}", i)) for i in range(n)])


def test_no_digest_report_when_closed_early_or_when_the_tar_broke(tmp_path, caplog):
    raw = _tar_bytes(tmp_path, 5)
    wrong = "0" * 64
    caplog.set_level(logging.WARNING, logger="megatron_ts.data.pipeline")

    tracker = ErrorTracker(max_error_rate=0.0)
    gen = tar_records("t.tar", io.BytesIO(raw), tracker, 5, wrong)
    next(gen)
    gen.close()  # e.g. the loader closed mid-shard: not a mismatch
    assert tracker.skipped == 0

    tracker = ErrorTracker(max_error_rate=1.0)
    n = len(list(tar_records("t.tar", io.BytesIO(raw[: len(raw) // 2]), tracker, 5, wrong)))
    assert 0 < n < 5 and tracker.skipped == 5 - n  # the lost samples, counted once
    assert "sha256" not in caplog.text

    tracker = ErrorTracker(max_error_rate=1.0)
    assert len(list(tar_records("t.tar", io.BytesIO(raw), tracker, 5, wrong))) == 5
    assert (tracker.seen, tracker.skipped) == (0, 5)  # counted, the samples already read
    assert len(list(tar_records("t.tar", io.BytesIO(raw), tracker, 5, None))) == 5
    good = hashlib.sha256(raw).hexdigest()
    assert len(list(tar_records("t.tar", io.BytesIO(raw), tracker, 5, good))) == 5
    assert tracker.skipped == 5


def test_resume_in_a_changed_shards_window_still_hashes_every_byte(tmp_path):
    src = _source(tmp_path)
    _change_one_byte(src / "shard-00001.tar")
    first = _loader(src, max_error_rate=0.6)
    _keys(first, 3)  # mid-window: the changed shard is not finished yet
    assert first.metrics()["skipped_samples"] == 0
    second = _loader(src, max_error_rate=0.6)
    second.load_state_dict(first.state_dict())
    _keys(second, 7)  # the rest of the epoch: the window is replayed from the shards' first bytes
    assert second.metrics()["skipped_samples"] == PER_SHARD
