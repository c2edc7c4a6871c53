"""The loader on local shards: split, determinism, exact resume, guards, worker processes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ts.data.loader import build_loader
from megatron_ts.data.pipeline import CorruptDataError
from megatron_ts.data.sources import DataSourceError
from megatron_ts.data.state import LoaderStateError
from megatron_ts.vocab import VocabLayout, VocabMismatchError
from tests.unit.test_loader_helpers import (
    DOWNSAMPLE,
    GRID,
    VOCAB,
    make_data_cfg,
    make_stage,
    sample_members,
    write_source,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {
        "a": write_source(root, shards=8, per_shard=10, name="a"),
        "b": write_source(root, shards=6, per_shard=7, name="b"),
    }


def _loader(sources, *, seed=1, dp_rank=0, dp_size=2, mix=(("a", 1.0),), stage_kw=None, **cfg):
    stage = make_stage([(str(sources[n]), w) for n, w in mix], **(stage_kw or {}))
    processes = cfg.pop("processes", False)
    spw = cfg.pop("shards_per_group", 4)
    return build_loader(
        make_data_cfg(**cfg),
        stage,
        VOCAB,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        downsample=DOWNSAMPLE,
        processes=processes,
        shards_per_group=spw,
    )


def _take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for name in ("text", "text_mask", "codes", "dropped"):
            assert torch.equal(x[name], y[name]), name


def test_batch_shapes_and_content(sources):
    loader = _loader(sources, stage_kw={"micro_batch": 3, "caption_len": 5})
    batch = next(loader)
    assert batch["text"].shape == (3, 7) and batch["text"].dtype == torch.int64
    assert batch["text_mask"].shape == (3, 7) and batch["text_mask"].dtype == torch.float32
    assert batch["codes"].shape == (3, GRID, GRID) and batch["codes"].dtype == torch.int64
    assert batch["dropped"].shape == (3,) and batch["dropped"].dtype == torch.bool
    assert (batch["text"][:, 0] == VOCAB.bos_id).all() and (
        batch["text"][:, 6] == VOCAB.boi_id
    ).all()
    # The codes are exactly those written for that key.
    key = batch["keys"][0]
    _, s, j = key.split("-")
    members = sample_members(key, int(s) * 10 + int(j))
    assert batch["codes"][0].tolist() == np.load(io.BytesIO(members["codes.npy"])).tolist()


def test_two_ranks_two_workers_one_epoch_is_disjoint_and_complete(sources):
    # 8 shards x 10 samples in 8 streams (one shard each per epoch): the first 80 positions
    # are one epoch; 2 ranks x 10 micro-batches of 4 consume them.
    per_rank = []
    for rank in range(2):
        loader = _loader(sources, dp_rank=rank, num_workers=2)
        per_rank.append(_keys(_take(loader, 10)))
        state = loader.state_dict()
        assert state["streams"] == 8 and state["consumed"] == 80
        assert all(r[3] == 0 for w in state["workers"] for r in w["readers"])  # still epoch 0
    assert len(set(per_rank[0])) == 40 and len(set(per_rank[1])) == 40
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {
        f"a-{s:03d}-{j:04d}" for s in range(8) for j in range(10)
    }


def test_same_seed_same_order_other_seed_other_order(sources):
    a = _keys(_take(_loader(sources, seed=5), 6))
    b = _keys(_take(_loader(sources, seed=5), 6))
    c = _keys(_take(_loader(sources, seed=6), 6))
    assert a == b
    assert a != c


def test_worker_processes_give_the_same_batches_as_in_process(sources):
    inproc = _take(_loader(sources, mix=(("a", 2.0), ("b", 1.0)), caption_dropout=0.3), 9)
    loader = _loader(sources, mix=(("a", 2.0), ("b", 1.0)), caption_dropout=0.3, processes=True)
    try:
        _same_batches(inproc, _take(loader, 9))
    finally:
        loader.close()


@pytest.mark.parametrize("processes", [False, True])
def test_resume_twice_equals_uninterrupted(sources, processes):
    kw = dict(
        mix=(("a", 2.0), ("b", 1.0)),
        caption_dropout=0.3,
        shuffle_buffer=5,
        shards_per_group=1,  # several shard groups per epoch: resume lands mid-group and mid-epoch
        num_workers=2,
        processes=processes,
    )
    n = 24  # 96 samples per rank: more than one epoch of either source for each worker
    full = _take(_loader(sources, **kw), n)
    got = []
    state = None
    for part in range(3):
        loader = _loader(sources, **kw)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
        got += _take(loader, 7 if part < 2 else n - 14)
        state = loader.state_dict()
        loader.close()
    _same_batches(full, got)
    assert max(r[3] for w in state["workers"] for r in w["readers"]) >= 1  # crossed an epoch


def test_load_state_before_or_after_iterating(sources):
    ref = _loader(sources)
    _take(ref, 3)
    saved = ref.state_dict()
    expect = _take(ref, 3)
    other = _loader(sources)
    _take(other, 5)  # already iterating: load_state_dict restarts the stream
    other.load_state_dict(saved)
    _same_batches(expect, _take(other, 3))


def test_sources_mix_by_weight(sources):
    keys = _keys(_take(_loader(sources, mix=(("a", 3.0), ("b", 1.0))), 100))
    frac_a = sum(k.startswith("a-") for k in keys) / len(keys)
    assert 0.69 < frac_a < 0.81


def test_too_few_shards_is_an_error_unless_resampling(sources):
    with pytest.raises(DataSourceError, match=r"b: 6 shards for 8 streams \(data.streams\)"):
        _loader(sources, mix=(("b", 1.0),), dp_size=4, num_workers=2, streams=8)
    loader = _loader(
        sources,
        mix=(("b", 1.0),),
        dp_size=4,
        dp_rank=3,
        num_workers=2,
        resample_shards=True,
        streams=8,
    )
    assert len(_keys(_take(loader, 4))) == 16


def test_vocab_or_grid_mismatch_fails_before_the_first_batch(sources):
    stage = make_stage([(str(sources["a"]), 1.0)])
    other = VocabLayout(text_size=256, codebook_size=1024)
    with pytest.raises(
        VocabMismatchError, match=r"codebook_size: model has 1024, token shards .* has 512"
    ):
        build_loader(
            make_data_cfg(), stage, other, seed=0, dp_rank=0, dp_size=1, downsample=DOWNSAMPLE
        )
    big = make_stage([(str(sources["a"]), 1.0)], grid=8)
    with pytest.raises(DataSourceError, match=r"grid 4x4 .* stage needs grid 8x8"):
        build_loader(
            make_data_cfg(), big, VOCAB, seed=0, dp_rank=0, dp_size=1, downsample=DOWNSAMPLE
        )
    missing = make_stage([(str(sources["a"]) + "-nope", 1.0)])
    with pytest.raises(DataSourceError, match=r"manifest .*a-nope/manifest.json not found"):
        build_loader(
            make_data_cfg(), missing, VOCAB, seed=0, dp_rank=0, dp_size=1, downsample=DOWNSAMPLE
        )


def _corrupt_source(tmp_path: Path) -> Path:
    bad = sample_members("c-000-0003", 3)
    buf = io.BytesIO()
    np.save(buf, np.full((GRID, GRID), 600, np.uint16))  # codebook has 512 codes
    bad["codes.npy"] = buf.getvalue()
    return write_source(tmp_path, shards=2, per_shard=60, name="c", corrupt={"c-000-0003": bad})


def _single_rank_loader(stage, max_error_rate: float):
    return build_loader(
        make_data_cfg(num_workers=1, max_error_rate=max_error_rate),
        stage,
        VOCAB,
        seed=0,
        dp_rank=0,
        dp_size=1,
        downsample=DOWNSAMPLE,
    )


def test_corrupt_sample_is_skipped_and_counted_then_stops_past_the_rate(tmp_path):
    src = _corrupt_source(tmp_path)
    stage = make_stage([(str(src), 1.0)])
    loader = _single_rank_loader(stage, max_error_rate=0.05)
    # 120 positions over 2 streams of one shard each: the stream with the corrupt sample
    # reaches its next epoch one position early, the other gives its 60 samples.
    keys = _keys(_take(loader, 30))
    good = {f"c-{s:03d}-{j:04d}" for s in range(2) for j in range(60)} - {"c-000-0003"}
    assert set(keys) == good and "c-000-0003" not in keys
    assert loader.metrics()["skipped_samples"] >= 1
    strict = _single_rank_loader(stage, max_error_rate=0.0)
    with pytest.raises(CorruptDataError, match=r"shard .*shard-00000.tar key c-000-0003.*codebook"):
        _take(strict, 30)


def test_resume_is_exact_with_corrupt_samples_in_the_replayed_shard_group(tmp_path):
    src = _corrupt_source(tmp_path)
    stage = make_stage([(str(src), 1.0)], micro_batch=3)
    cfg = make_data_cfg(num_workers=1, max_error_rate=0.05, shuffle_buffer=16)

    def build():
        return build_loader(cfg, stage, VOCAB, seed=2, dp_rank=0, dp_size=1, downsample=DOWNSAMPLE)

    full = _take(build(), 50)  # 150 samples: past the corrupt one and into epoch 1
    for cut in (1, 17, 40):
        first = build()
        head = _take(first, cut)
        second = build()
        second.load_state_dict(first.state_dict())
        _same_batches(full, head + _take(second, 50 - cut))
        assert "c-000-0003" not in _keys(full)
    with pytest.raises(LoaderStateError, match=r"dp_rank 0 needed, got states of dp ranks \[1\]"):
        build().load_state_dict(dict(first.state_dict(), dp_rank=1))


def test_worker_process_error_reaches_the_trainer_naming_shard_and_key(tmp_path):
    src = _corrupt_source(tmp_path)
    stage = make_stage([(str(src), 1.0)])
    loader = _single_rank_loader(stage, max_error_rate=0.0)
    with pytest.raises(Exception, match=r"key c-000-0003"):
        _take(loader, 30)
    loader.close()


def test_truncated_shard_counts_lost_samples(tmp_path):
    src = write_source(tmp_path, shards=2, per_shard=20, name="t")
    raw = (src / "shard-00001.tar").read_bytes()
    (src / "shard-00001.tar").write_bytes(raw[: len(raw) // 2 + 100])
    # Without `bytes` and `sha256` in the manifest the size check cannot skip the shard at open
    # (tests/unit/test_shard_verify.py), so the tar reader meets the truncation.
    manifest = json.loads((src / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["bytes"], entry["sha256"]
    (src / "manifest.json").write_text(json.dumps(manifest))
    stage = make_stage([(str(src), 1.0)])
    loader = build_loader(
        make_data_cfg(num_workers=1, max_error_rate=0.6, streams=1),  # one stream: no repeats
        stage,
        VOCAB,
        seed=0,
        dp_rank=0,
        dp_size=1,
        downsample=DOWNSAMPLE,
    )
    keys = _keys(_take(loader, 7))
    assert len(keys) == len(set(keys)) == 28
    m = loader.metrics()
    assert 9 <= m["skipped_samples"] <= 11 and m["samples_read"] >= 40


def test_synthetic_source_is_deterministic_and_resumable():
    stage = make_stage([], micro_batch=2, caption_len=6)
    cfg = make_data_cfg(synthetic=True, caption_dropout=0.2)

    def build():
        return build_loader(
            cfg, stage, VOCAB, seed=3, dp_rank=1, dp_size=2, downsample=DOWNSAMPLE, processes=False
        )

    full = _take(build(), 6)
    first = build()
    part = _take(first, 3)
    second = build()
    second.load_state_dict(first.state_dict())
    _same_batches(full, part + _take(second, 3))
    b = full[0]
    assert b["text"].shape == (2, 8) and b["codes"].shape == (2, GRID, GRID)
    assert int(b["codes"].max()) < VOCAB.codebook_size


def test_metrics_report_throughput_wait_and_bytes(sources):
    loader = _loader(sources)
    _take(loader, 5)
    m = loader.metrics()
    assert set(m) >= {
        "samples_per_s",
        "data_wait_fraction",
        "bytes_read",
        "retries",
        "skipped_samples",
    }
    assert m["samples_per_s"] > 0 and 0.0 < m["data_wait_fraction"] <= 1.0
    assert m["bytes_read"] > 0 and m["retries"] == 0 and m["skipped_samples"] == 0
    # A trainer that computes for a while between batches mostly does not wait for data.
    import time

    for _ in range(4):
        time.sleep(0.05)
        next(loader)
    m = loader.metrics()
    assert m["data_wait_fraction"] < 0.5 and 0 < m["samples_per_s"] < 4 / 0.05 * 1.1


def test_interpreter_exits_with_live_worker_processes(sources):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.unit.test_loader_helpers import *
        from megatron_ts.data.loader import build_loader
        stage = make_stage([({str(sources["a"])!r}, 1.0)])
        loader = build_loader(make_data_cfg(num_workers=2), stage, VOCAB, seed=0, dp_rank=0,
                              dp_size=1, downsample=DOWNSAMPLE)
        next(loader)
        print("took one batch", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "took one batch" in proc.stdout
