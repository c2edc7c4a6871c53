"""The loader with aspect-ratio buckets: one bucket per step, weighted by the data, the same
samples at any layout, exact resume, and clear errors when the stage and the shards disagree."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_ts.buckets import make_buckets
from megatron_ts.data.loader import build_loader
from megatron_ts.data.order import Mixture, source_draws
from megatron_ts.data.sources import DataSourceError
from tests.unit.test_loader_helpers import (
    DOWNSAMPLE,
    VOCAB,
    make_data_cfg,
    make_stage,
    sample_members,
    shard_entry,
    write_source,
    write_tar,
)

RESOLUTION = 64  # 4 x 4 codes at 16 px per code
RATIOS = ("1:1", "2:1", "1:2")  # with grid_multiple 1: 64x64, 96x48 and 48x96 pixels
GRIDS = {b.name: b.grid(DOWNSAMPLE) for b in make_buckets(RATIOS, RESOLUTION, DOWNSAMPLE)}


def write_bucketed(root: Path, name: str, per_bucket: dict[str, tuple[int, int]]) -> Path:
    """A format /2 source: for each bucket, (shards, samples per shard) of its grid."""
    out = root / name
    out.mkdir(parents=True)
    buckets = make_buckets(list(per_bucket), RESOLUTION, DOWNSAMPLE)
    entries, index = [], 0
    for b in buckets:
        shards, per_shard = per_bucket[b.name]
        rows, cols = b.grid(DOWNSAMPLE)
        for s in range(shards):
            samples = []
            for _ in range(per_shard):
                key = f"{name}-{b.width}x{b.height}-{index:05d}"
                members = sample_members(key, index)
                rng = np.random.default_rng(index)
                codes = rng.integers(0, VOCAB.codebook_size, (rows, cols)).astype(np.uint16)
                members["codes.npy"] = _npy(codes)
                samples.append((key, members))
                index += 1
            shard = f"tokens-{b.width}x{b.height}-{s:03d}.tar"
            raw = write_tar(out / shard, samples)
            entries.append(shard_entry(shard, raw, per_shard, bucket=b.name))
    manifest = {
        "format": "megatron_ts.tokens/2",
        "resolution": RESOLUTION,
        "grid": RESOLUTION // DOWNSAMPLE,
        "downsample": DOWNSAMPLE,
        "buckets": [b.to_dict() for b in buckets],
        "grid_multiple": 1,
        "vocab": VOCAB.to_dict(),
        "vq": {"format": "native"},
        "text_tokenizer": {"name": "byte"},
        "shards": entries,
        "total_samples": index,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bucketed")
    return {
        # 32 square, 16 wide, 16 tall samples: buckets drawn 1/2, 1/4, 1/4 of the steps
        "mixed": write_bucketed(root, "mixed", {"1:1": (4, 8), "2:1": (4, 4), "1:2": (4, 4)}),
        "square": write_source(root, shards=4, per_shard=6, name="square"),
    }


def _stage(urls, ratios=RATIOS, micro_batch=2, global_batch=4, grid_multiple=1):
    stage = make_stage([(u, 1.0) for u in urls], micro_batch=micro_batch)
    return dataclasses.replace(
        stage, buckets=tuple(ratios), grid_multiple=grid_multiple, global_batch=global_batch
    )


def _loader(stage, dp_rank=0, dp_size=2, **cfg):
    return build_loader(
        make_data_cfg(**{"streams": 4, **cfg}),
        stage,
        VOCAB,
        seed=3,
        dp_rank=dp_rank,
        dp_size=dp_size,
        downsample=DOWNSAMPLE,
        processes=False,
    )


def _steps(stage, dp_size: int, steps: int, **cfg) -> list[tuple[tuple[int, int], Counter]]:
    """Per optimizer step: (code grid, multiset of sample keys) over all DP ranks."""
    micro = stage.global_batch // (dp_size * stage.micro_batch)
    per_rank = []
    for rank in range(dp_size):
        loader = _loader(stage, rank, dp_size, **cfg)
        per_rank.append([next(loader) for _ in range(steps * micro)])
    out = []
    for t in range(steps):
        batches = [b for r in per_rank for b in r[t * micro : (t + 1) * micro]]
        shapes = {tuple(b["codes"].shape[1:]) for b in batches}
        assert len(shapes) == 1, f"step {t} mixes grids {shapes}"
        out.append((shapes.pop(), Counter(k for b in batches for k in b["keys"])))
    return out


def test_every_micro_batch_holds_one_bucket_and_steps_follow_the_data(sources):
    steps = _steps(_stage([str(sources["mixed"])]), dp_size=2, steps=120)
    grids = Counter(g for g, _ in steps)
    assert set(grids) == set(GRIDS.values())
    assert GRIDS["2:1"] == (3, 6) and GRIDS["1:2"] == (6, 3)
    share = grids[GRIDS["1:1"]] / len(steps)
    assert 0.38 < share < 0.62, grids  # 1/2 of the samples are square; 120 draws: sd 0.046
    for grid, keys in steps:  # a key names its bucket's pixel size
        size = {(3, 6): "96x48", (6, 3): "48x96", (4, 4): "64x64"}[grid]
        assert all(f"-{size}-" in k for k in keys)


@pytest.mark.parametrize("dp_size,micro_batch", [(1, 4), (2, 1), (4, 1)])
def test_every_step_takes_the_same_samples_at_any_layout(sources, dp_size, micro_batch):
    reference = _steps(_stage([str(sources["mixed"])]), dp_size=2, steps=12)
    other = _steps(_stage([str(sources["mixed"])], micro_batch=micro_batch), dp_size, 12)
    assert other == reference


def test_resume_is_exact_and_elastic(sources):
    stage = _stage([str(sources["mixed"])])
    whole = [_loader(stage, r) for r in range(2)]
    ref = [[next(ld) for _ in range(10)] for ld in whole]
    first = [_loader(stage, r) for r in range(2)]
    for ld in first:
        for _ in range(4):
            next(ld)
    states = [ld.state_dict() for ld in first]
    for r in range(2):  # the same layout, from this rank's state
        again = _loader(stage, r)
        again.load_state_dict(states[r])
        assert [next(again)["keys"] for _ in range(6)] == [b["keys"] for b in ref[r][4:]]
    one = _loader(dataclasses.replace(stage, micro_batch=4), 0, 1)  # DP 2 -> 1
    one.load_state_dict(states)
    for t in range(4, 10):  # step t: both old ranks' micro-batch t, now one micro-batch of 4
        batch = next(one)
        want = Counter(k for r in range(2) for k in ref[r][t]["keys"])
        assert Counter(batch["keys"]) == want, t
        assert batch["codes"].shape[1:] == ref[0][t]["codes"].shape[1:]


def test_synthetic_data_draws_a_bucket_per_step(sources):
    stage = _stage([])
    steps = _steps(stage, dp_size=2, steps=30, synthetic=True)
    assert {g for g, _ in steps} == set(GRIDS.values())


def test_the_mixture_draws_one_bucket_per_step():
    mix = Mixture((2.0, 1.0, 1.0, 4.0), groups=(0, 1, 1, 2), step=8)
    draws = mix.draws(np.arange(8 * 500), seed=1, stage=0)
    buckets = np.asarray(mix.groups)[draws].reshape(500, 8)
    assert (buckets == buckets[:, :1]).all()  # one bucket in every step of 8 positions
    share = np.bincount(buckets[:, 0], minlength=3) / 500
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5], atol=0.07)
    in_1 = draws[np.asarray(mix.groups)[draws] == 1]
    assert 0.4 < (in_1 == 1).mean() < 0.6  # sub-sources 1 and 2 share bucket 1 by weight
    unbucketed = Mixture((2.0, 1.0))

    plain = source_draws(np.arange(100), (2.0, 1.0), 1, 0)
    assert np.array_equal(unbucketed.draws(np.arange(100), 1, 0), plain)


def test_square_shards_count_as_the_square_bucket(sources):
    stage = _stage([str(sources["square"])], ratios=("1:1", "2:1"))
    assert {g for g, _ in _steps(stage, dp_size=2, steps=4)} == {(4, 4)}


def test_disagreements_are_named(sources, caplog):
    mixed = str(sources["mixed"])
    with pytest.raises(DataSourceError, match=r"holds aspect-ratio buckets \(1:1, 2:1, 1:2\)"):
        _loader(dataclasses.replace(_stage([mixed]), buckets=()))
    with pytest.raises(DataSourceError, match=r"bucket 2:1 has 3x6 codes but the stage's 2:1"):
        _loader(_stage([mixed], grid_multiple=2))
    with pytest.raises(DataSourceError, match="which no bucket of"):
        _loader(_stage([str(sources["square"])], ratios=("2:1", "1:2")))
    with caplog.at_level(logging.WARNING):
        _loader(_stage([mixed], ratios=("1:1", "2:1")))
    assert "bucket 1:2 (16 samples) not in" in caplog.text
