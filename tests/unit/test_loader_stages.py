"""Pipeline stages and batching on in-memory data (no files, no processes)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from megatron_ts.data.batching import Collator, dropout_draw
from megatron_ts.data.order import LaneCounter, source_draws
from megatron_ts.data.pipeline import (
    CorruptDataError,
    ErrorTracker,
    Sample,
    decode_records,
    interleave,
    shuffle_buffer,
)
from megatron_ts.data.sources import DataSourceError, epoch_order, stream_shards
from megatron_ts.sequence import SequenceLayout
from megatron_ts.vocab import VocabLayout


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_interleave_is_seeded_and_keeps_every_item_in_shard_order():
    its = lambda: [iter([(0, i) for i in range(5)]), iter([(1, i) for i in range(3)])]  # noqa: E731
    a = list(interleave(its(), [5, 3], _rng(0)))
    assert a == list(interleave(its(), [5, 3], _rng(0)))
    assert sorted(a) == sorted([(0, i) for i in range(5)] + [(1, i) for i in range(3)])
    # Within one shard the tar order is kept.
    assert [x for s, x in a if s == 0] == list(range(5))
    orders = {tuple(interleave(its(), [5, 3], _rng(s))) for s in range(10)}
    assert len(orders) > 1


def test_interleave_tolerates_counts_that_disagree_with_the_data():
    short = [iter([1, 2]), iter([10, 11, 12, 13])]
    # manifest claims 4 and 2: the first runs out early, the second's extra items come at the end
    out = list(interleave(short, [4, 2], _rng(1)))
    assert sorted(out) == [1, 2, 10, 11, 12, 13]
    assert out[-2:] == [12, 13]


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(shuffle_buffer(range(100), 10, _rng(3)))
    assert sorted(a) == list(range(100))
    assert a != list(range(100))
    assert a == list(shuffle_buffer(range(100), 10, _rng(3)))
    assert a != list(shuffle_buffer(range(100), 10, _rng(4)))
    assert list(shuffle_buffer(range(7), 1, _rng(3))) == list(range(7))
    # More buffer than items: a full shuffle at the end of the input.
    assert sorted(shuffle_buffer(range(5), 50, _rng(0))) == list(range(5))


def test_source_draws_are_a_function_of_the_position_and_follow_weights():
    full = source_draws(np.arange(20000), (3.0, 1.0), 1, 2)
    assert np.array_equal(source_draws(np.arange(5000, 5100), (3.0, 1.0), 1, 2), full[5000:5100])
    assert 0.73 < (full == 0).mean() < 0.77
    assert not np.array_equal(full, source_draws(np.arange(20000), (3.0, 1.0), 2, 2))
    assert not np.array_equal(full, source_draws(np.arange(20000), (3.0, 1.0), 1, 3))
    assert (source_draws(np.arange(100), (1.0,), 1, 2) == 0).all()


def test_lane_counter_gives_each_position_its_index_in_its_source_stream():
    weights, lane, lanes = (2.0, 1.0, 1.0), 3, 8
    draws = source_draws(lane + lanes * np.arange(1000), weights, 5, 0)
    counter = LaneCounter(lane, lanes, weights, 5, 0)
    for n in range(0, 1000, 7):  # a reader that needs every 7th position of the lane
        src, index = counter.take(lane + lanes * n)
        assert src == draws[n] and index == int((draws[:n] == src).sum())
    # Restarted from a saved (n, counts), it continues the same count.
    saved = LaneCounter(lane, lanes, weights, 5, 0, 500, np.bincount(draws[:500]).tolist())
    saved.advance(900)
    assert saved.counts == np.bincount(draws[:900], minlength=3).tolist()
    with pytest.raises(ValueError, match="cannot go back"):
        saved.advance(10)


def test_epoch_order_split_is_disjoint_complete_and_guarded():
    order = epoch_order(10, 4, seed=1, stage=0, source=0, epoch=0, resample=False)
    parts = [stream_shards(order, c, 4) for c in range(4)]
    assert sorted(sum(parts, [])) == list(range(10))
    assert not np.array_equal(
        order, epoch_order(10, 4, seed=1, stage=0, source=0, epoch=1, resample=False)
    )
    with pytest.raises(DataSourceError, match="3 shards for 4 streams.*resample_shards"):
        epoch_order(3, 4, seed=1, stage=0, source=0, epoch=0, resample=False)
    order = epoch_order(3, 4, seed=1, stage=0, source=0, epoch=0, resample=True)
    assert all(stream_shards(order, c, 4) for c in range(4))


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


def _rec(key: str, codes, ids) -> dict:
    return {
        "__key__": key,
        "__url__": "shard-7.tar",
        "codes.npy": _npy(codes),
        "ids.npy": _npy(ids),
    }


def test_decode_skips_and_counts_corrupt_samples():
    good = np.zeros((2, 2), np.uint16)
    records = [
        _rec("ok", good, np.array([1, 2], np.int32)),
        _rec("big-code", np.full((2, 2), 16, np.uint16), np.array([1], np.int32)),
        _rec("shape", np.zeros((3, 3), np.uint16), np.array([1], np.int32)),
        _rec("text", good, np.array([300], np.int32)),
        {"__key__": "nocodes", "__url__": "shard-7.tar", "ids.npy": _npy([1])},
        {"__key__": "garbage", "__url__": "shard-7.tar", "codes.npy": b"xx", "ids.npy": b"yy"},
    ]
    tracker = ErrorTracker(max_error_rate=0.1)
    out = list(
        decode_records(
            records,
            grid=(2, 2),
            text_size=256,
            codebook_size=16,
            source=0,
            epoch=0,
            tracker=tracker,
        )
    )
    assert [s.key for s in out] == ["ok"]
    assert (tracker.seen, tracker.skipped) == (6, 5)
    strict = ErrorTracker(max_error_rate=0.0)
    with pytest.raises(
        CorruptDataError, match=r"shard shard-7\.tar key big-code.*outside the codebook"
    ):
        list(
            decode_records(
                records,
                grid=(2, 2),
                text_size=256,
                codebook_size=16,
                source=0,
                epoch=0,
                tracker=strict,
            )
        )


def _sample(key: str, ids: list[int], code: int = 5) -> Sample:
    return Sample(key, "u", np.full((2, 2), code, np.uint16), np.array(ids, np.int32), 0, 0)


def test_collator_builds_the_fixed_text_layout():
    col = Collator(
        layout=SequenceLayout(caption_len=4, grid=2),
        vocab=VocabLayout(text_size=100, codebook_size=8),  # <pad> 100, <bos> 101, <boi> 103
        caption_dropout=0.0,
        seed=0,
        stage=0,
    )
    batch = col([_sample("a", [1, 2]), _sample("b", [1, 2, 3, 4, 5, 6], code=7)])
    assert batch["text"].tolist() == [[101, 1, 2, 100, 100, 103], [101, 1, 2, 3, 4, 103]]
    assert batch["text_mask"].tolist() == [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
    assert batch["codes"].dtype.is_floating_point is False and batch["codes"].shape == (2, 2, 2)
    assert batch["codes"][1].unique().tolist() == [7]
    assert batch["keys"] == ["a", "b"] and batch["dropped"].tolist() == [False, False]


def test_caption_dropout_is_deterministic_and_near_its_rate():
    col = Collator(
        layout=SequenceLayout(caption_len=4, grid=2),
        vocab=VocabLayout(text_size=100, codebook_size=8),  # <pad> 100, <bos> 101, <boi> 103
        caption_dropout=0.3,
        seed=9,
        stage=1,
    )
    samples = [_sample(f"k{i}", [1, 2, 3]) for i in range(2000)]
    a, b = col(samples), col(samples)
    assert a["dropped"].tolist() == b["dropped"].tolist()
    assert 0.26 < a["dropped"].float().mean().item() < 0.34
    d = a["dropped"]
    assert (a["text"][d, 1:5] == 100).all() and (a["text_mask"][d] == 0).all()
    assert (a["text"][d, 0] == 101).all() and (a["text"][d, 5] == 103).all()
    assert dropout_draw(9, 1, 0, 0, "k1") != dropout_draw(9, 1, 0, 1, "k1")


def test_load_npy_matches_numpy_and_rejects_bad_bytes():
    from megatron_ts.data.pipeline import load_npy

    arrays = [
        np.arange(12, dtype=np.uint16).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.array([], dtype=np.int32),
        np.arange(5, dtype=">i4"),
    ]
    for arr in arrays * 2:  # the second pass hits the header cache
        got = load_npy(_npy(arr))
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
    with pytest.raises(ValueError, match="bad magic"):
        load_npy(b"not numpy at all")
    with pytest.raises(ValueError):
        load_npy(_npy(np.arange(100, dtype=np.int32))[:-8])
    with pytest.raises(ValueError, match="object arrays"):
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        load_npy(buf.getvalue())
