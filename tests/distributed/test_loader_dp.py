"""Four gloo ranks as TP=2 x DP=2: TP peers get identical batches, DP ranks disjoint ones.

The rank layout is megatron-core's (tensor-parallel rank fastest): global rank g has
dp_rank = g // tp. Each rank runs two logical workers in-process (the batches equal those of worker processes,
which tests/unit/test_loader.py checks).
"""

from __future__ import annotations

import hashlib

from tests.distributed.launcher import run_distributed
from tests.unit.test_loader_helpers import (
    DOWNSAMPLE,
    VOCAB,
    make_data_cfg,
    make_stage,
    write_source,
)

TP = 2


def _rank_fn(rank: int, world: int, src: str, steps: int) -> dict:
    import torch.distributed as dist

    from megatron_ts.data.loader import build_loader

    dist.init_process_group("gloo")
    dp_size, dp_rank = world // TP, rank // TP
    stage = make_stage([(src, 1.0)], micro_batch=4)
    loader = build_loader(
        make_data_cfg(num_workers=2, caption_dropout=0.3),
        stage,
        VOCAB,
        seed=11,
        dp_rank=dp_rank,
        dp_size=dp_size,
        downsample=DOWNSAMPLE,
        processes=False,  # same batches as worker processes (tests/unit); keeps 2 cores free
    )
    keys, digest = [], hashlib.sha256()
    for _ in range(steps):
        batch = next(loader)
        keys += batch["keys"]
        for name in ("text", "text_mask", "codes", "dropped"):
            digest.update(batch[name].numpy().tobytes())
    state = loader.state_dict()
    loader.close()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (dp_rank, keys, digest.hexdigest()))
    return {"gathered": gathered, "state": state}


def test_tp_peers_share_batches_and_dp_ranks_split_the_epoch(tmp_path):
    src = write_source(tmp_path, shards=8, per_shard=10, name="d")
    # 80 samples / 2 DP ranks = 40 per rank = 10 micro-batches of 4: exactly one epoch.
    results = run_distributed(_rank_fn, 4, str(src), 10, timeout=120)
    gathered = results[0]["gathered"]
    assert all(r["gathered"] == gathered for r in results)  # every rank saw the same exchange
    by_dp: dict[int, list] = {}
    for dp_rank, keys, digest in gathered:
        by_dp.setdefault(dp_rank, []).append((keys, digest))
    assert sorted(by_dp) == [0, 1]
    for peers in by_dp.values():
        assert len(peers) == TP and peers[0] == peers[1]  # identical keys and tensors
    k0, k1 = by_dp[0][0][0], by_dp[1][0][0]
    assert len(set(k0)) == len(set(k1)) == 40 and not set(k0) & set(k1)
    assert set(k0) | set(k1) == {f"d-{s:03d}-{j:04d}" for s in range(8) for j in range(10)}
    assert results[0]["state"] == results[1]["state"]  # TP peers save the same loader state
