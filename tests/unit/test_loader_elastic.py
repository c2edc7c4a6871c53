"""Elastic data: every optimizer step takes the same samples whatever the DP size, micro-batch and
worker count, also across a resume at another layout (docs/loader.md, "Resume semantics")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ts.data.loader import build_loader
from megatron_ts.data.state import LoaderStateError
from tests.unit.test_loader_helpers import (
    DOWNSAMPLE,
    VOCAB,
    make_data_cfg,
    make_stage,
    sample_members,
    write_source,
)

GLOBAL_BATCH = 8
STEPS = 10
# (dp, micro_batch, workers); global batch 8 = micro_batch x accumulation x dp
LAYOUTS = [(1, 8, 1), (2, 4, 2), (4, 2, 1), (4, 1, 3)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("elastic")
    bad = sample_members("c-002-0001", 0)
    bad["codes.npy"] = b"not a npy file"
    return {
        "a": write_source(root, shards=8, per_shard=6, name="a"),
        "b": write_source(root, shards=12, per_shard=5, name="b"),
        "c": write_source(root, shards=8, per_shard=6, name="c", corrupt={"c-002-0001": bad}),
    }


MIXES = {
    "one": (("a", 1.0),),
    "two": (("a", 2.0), ("b", 1.0)),
    "corrupt": (("c", 1.0), ("b", 1.0)),
    "synthetic": (),
}


def _rank_loaders(sources, mix: str, dp: int, mb: int, workers: int, **cfg) -> list:
    stage = make_stage([(str(sources[n]), w) for n, w in MIXES[mix]], micro_batch=mb)
    data = make_data_cfg(
        num_workers=workers,
        caption_dropout=0.3,
        shuffle_buffer=4,
        max_error_rate=0.2,
        synthetic=mix == "synthetic",
        **cfg,
    )
    return [
        build_loader(
            data,
            stage,
            VOCAB,
            seed=3,
            dp_rank=r,
            dp_size=dp,
            downsample=DOWNSAMPLE,
            processes=False,
            shards_per_group=2,
        )
        for r in range(dp)
    ]


def _steps(loaders, steps: int) -> list[list[tuple]]:
    """Per optimizer step: the sorted (key, dropped) pairs of all ranks' micro-batches."""
    dp, mb = len(loaders), loaders[0].plan.micro_batch
    out = []
    for _ in range(steps):
        step = []
        for loader in loaders:
            for _ in range(GLOBAL_BATCH // (dp * mb)):
                batch = next(loader)
                step += zip(batch["keys"], batch["dropped"].tolist())
        out.append(sorted(step))
    return out


@pytest.fixture(scope="module")
def reference(sources) -> dict[str, list]:
    return {mix: _steps(_rank_loaders(sources, mix, 1, 8, 1), STEPS) for mix in MIXES}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda x: "dp{}-mb{}-w{}".format(*x))
def test_every_step_takes_the_same_samples_at_any_layout(sources, reference, mix, layout):
    got = _steps(_rank_loaders(sources, mix, *layout), STEPS)
    assert got == reference[mix]
    if mix == "corrupt":
        assert all(k != "c-002-0001" for step in got for k, _ in step)
    # more than an epoch of some stream: samples of a stream come back in its next epoch
    keys = [k for step in got for k, _ in step]
    assert len(keys) == STEPS * GLOBAL_BATCH


@pytest.mark.parametrize(
    ("mix", "old", "new"),
    [
        ("two", (2, 4, 2), (4, 1, 3)),  # more ranks, smaller micro-batch, other workers
        ("two", (4, 2, 1), (1, 8, 2)),  # fewer ranks
        ("one", (2, 2, 2), (2, 2, 1)),  # only the worker count changes
        ("corrupt", (4, 1, 3), (2, 4, 2)),
        ("synthetic", (2, 4, 1), (4, 2, 2)),
    ],
)
def test_resume_at_another_layout_continues_after_the_last_sample(
    sources, reference, mix, old, new
):
    before = _rank_loaders(sources, mix, *old)
    head = _steps(before, 5)
    states = json.loads(json.dumps([loader.state_dict() for loader in before]))
    assert {s["consumed"] for s in states} == {5 * GLOBAL_BATCH}
    after = _rank_loaders(sources, mix, *new)
    for loader in after:
        loader.load_state_dict(states)
    counters = ("seen", "skipped", "missing_shards", "bytes_read", "retries")

    def totals(rank_states):
        return {k: sum(w[k] for st in rank_states for w in st["workers"]) for k in counters}

    # the run's statistics carry over the layout change, dealt out over the new workers
    assert totals([loader.state_dict() for loader in after]) == totals(states)
    if mix == "corrupt":
        assert totals(states)["skipped"] > 0
    assert head + _steps(after, STEPS - 5) == reference[mix]


def test_same_layout_resume_from_the_list_is_batch_exact(sources):
    full = [_steps([loader], 7) for loader in _rank_loaders(sources, "two", 2, 2, 2)]
    before = _rank_loaders(sources, "two", 2, 2, 2)
    head = [_steps([loader], 3) for loader in before]
    states = [loader.state_dict() for loader in before]
    for r, loader in enumerate(_rank_loaders(sources, "two", 2, 2, 2)):
        loader.load_state_dict(states)  # picks its own rank's state
        assert head[r] + _steps([loader], 4) == full[r]


def test_bad_state_lists_are_refused_naming_the_fix(sources):
    before = _rank_loaders(sources, "two", 2, 4, 1)
    for loader in before:
        next(loader)
    states = [loader.state_dict() for loader in before]
    new = _rank_loaders(sources, "two", 4, 2, 1)[0]
    with pytest.raises(LoaderStateError, match=r"pass the list of all 2 old DP ranks"):
        new.load_state_dict(states[0])
    next(before[0])
    with pytest.raises(LoaderStateError, match=r"different positions \[8, 16\]"):
        new.load_state_dict([before[0].state_dict(), states[1]])
    v1 = dict(states[0], format="megatron_ts.loader/1")
    with pytest.raises(LoaderStateError, match=r"loader/1.*checkpoint.load_optimizer = true"):
        new.load_state_dict([v1, states[1]])
    other = _rank_loaders(sources, "two", 4, 2, 1, streams=2)[0]
    with pytest.raises(LoaderStateError, match=r"data.streams = 8 but this loader has 2"):
        other.load_state_dict(states)


def test_read_amplification_when_the_dp_size_does_not_divide_the_streams(sources):
    # 8 streams over 3 ranks: every stream holds positions of every rank, so each rank reads
    # all of them and uses a third. Over 4 ranks a stream belongs to one rank.
    def read(dp: int, workers: int) -> int:
        loaders = _rank_loaders(sources, "one", dp, 1, workers)
        for _ in range(72 // dp):  # 72 positions: 1.5 epochs of the 48 samples
            for loader in loaders:
                next(loader)
        return sum(loader.metrics()["samples_read"] for loader in loaders)

    assert _rank_loaders(sources, "one", 3, 1, 1)[0].layout.read_amplification == 3
    single = read(1, 1)  # 72 used + the shuffle buffers' read-ahead
    assert read(4, 2) == single
    assert 2.8 * single <= read(3, 1) <= 3 * single


def test_worker_processes_give_the_same_steps(sources, reference):
    loaders = _rank_loaders(sources, "two", 1, 2, 3)
    for loader in loaders:
        loader.processes = True
    try:
        assert _steps(loaders, STEPS) == reference["two"]
    finally:
        for loader in loaders:
            loader.close()
