"""ZeRO stage 0 where ZeRO would partition nothing, and resumes across that switch.

With one data-parallel rank an fp32 engine runs stage 0 whatever `parallel.zero_stage` says
(`effective_zero_stage`). Checkpoints do not depend on the stage, so a run trained on 1 rank
(stage 0 in effect) continues on DP = 2 with ZeRO-1 and back on 1 rank with its AdamW state:
its loss curve must equal the uninterrupted 1-rank run's within 1e-5 relative (only the order
of floating-point reductions differs; a fresh optimizer moves the loss by percents).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.test_engine import _losses, _train_world

STEPS = 6
EXTRA = [
    "--checkpoint.interval_steps",
    "2",
    "--checkpoint.keep_last",
    "5",
    "--parallel.zero_stage",
    "1",
]


@pytest.mark.parametrize(
    ("configured", "dp", "pp", "bf16", "effective"),
    [
        (1, 1, 1, False, 0),  # nothing to partition: the same fp32 step without ZeRO's copies
        (2, 1, 1, False, 0),
        (3, 1, 1, False, 0),
        (0, 1, 1, False, 0),
        (1, 1, 1, True, 1),  # bf16: DeepSpeed's stage-0 bf16 optimizer changes the numerics
        (1, 1, 2, False, 0),  # the pipeline engine too: its stage-0 clipping counts every stage
        (0, 1, 2, False, 0),
        (0, 1, 1, True, 0),
        (1, 2, 1, False, 1),
        (3, 4, 1, True, 3),
    ],
)
def test_effective_zero_stage(configured, dp, pp, bf16, effective):
    from megatron_ts.training.engine import effective_zero_stage

    stage, why = effective_zero_stage(configured, dp, pp, bf16)
    assert stage == effective
    assert f"parallel.zero_stage = {configured}" in why


def _layout(step_dir: Path) -> dict:
    return json.loads((step_dir / "meta.json").read_text())["layout"]


def _keep_up_to(run_dir: Path, step: int) -> None:
    """Makes `run_dir` look like a run stopped after its step-`step` checkpoint."""
    ckpt = run_dir / "checkpoints"
    for later in ckpt.glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (ckpt / "latest").write_text(f"step_{step:08d}\n")
    metrics = run_dir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
    metrics.write_text("".join(line + "\n" for line in kept))


def test_resume_between_stage0_on_one_rank_and_zero1_on_two(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_distributed(_train_world, 1, str(ref), STEPS, EXTRA) == [0]
    assert _layout(ref / "checkpoints/step_00000002") == {
        "tensor": 1,
        "pipeline": 1,
        "data": 1,
        "zero_stage": 0,  # configured 1, in effect 0: meta.json records what ran
    }
    shutil.copytree(ref, run)
    _keep_up_to(run, 2)
    assert run_distributed(_train_world, 2, str(run), STEPS, EXTRA) == [0, 0]  # steps 3-6, ZeRO-1
    assert _layout(run / "checkpoints/step_00000004")["zero_stage"] == 1
    _keep_up_to(run, 4)
    assert run_distributed(_train_world, 1, str(run), STEPS, EXTRA) == [0]  # steps 5-6, stage 0

    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    last = json.loads((run / f"checkpoints/step_{STEPS:08d}/meta.json").read_text())
    assert last["layout"]["zero_stage"] == 0
    assert last["optimizer"]["step"] == STEPS  # Adam's step count carried across both switches


def _with_and_without_allreduce_world(rank: int, world: int, layouts: list) -> dict:
    """Per layout: (loss curve, weights) trained with DeepSpeed's DP all-reduce skipped, as the
    engine runs at DP = 1, and with it turned back on (the behaviour before issue 22)."""
    import torch
    from megatron.core import parallel_state

    from tests.distributed.test_engine import _engine, _micro_batches

    out = {}
    for tp, pp in layouts:
        for allreduce in (False, True):
            engine, vocab = _engine(tp, pp, 1)  # configured ZeRO-1: stage 0 in effect at DP = 1
            ds = engine.engine
            assert ds.enable_backward_allreduce is False
            assert getattr(ds, "pipeline_enable_backward_allreduce", False) is False
            ds.enable_backward_allreduce = allreduce
            if pp > 1:
                ds.pipeline_enable_backward_allreduce = allreduce
            batches = _micro_batches(vocab, 0, parallel_state.get_data_parallel_world_size())
            curve = []
            for _ in range(3):
                engine.set_lr(1e-3)
                result = engine.train_step(batches)
                curve.append((result.loss, result.grad_norm))
            weights = [
                p.detach().clone()
                for _, layer in sorted(engine.local_layers.items())
                for p in layer.parameters()
            ]
            out[(tp, pp, allreduce)] = (curve, weights)
            del engine, ds
            torch.distributed.barrier()
    return out


def test_one_dp_rank_skips_the_gradient_allreduce_bit_for_bit():
    """At DP = 1 DeepSpeed's all-reduce only concatenates, reduces over one rank and copies back;
    skipping it (TP = 2 and PP = 2 on 2 ranks) leaves losses, norms and weights bit-identical."""
    results = run_distributed(_with_and_without_allreduce_world, 2, [(2, 1), (1, 2)])
    for rank, per_rank in enumerate(results):
        for tp, pp in [(2, 1), (1, 2)]:
            (curve, weights), (ref_curve, ref_weights) = (
                per_rank[(tp, pp, False)],
                per_rank[(tp, pp, True)],
            )
            assert curve == ref_curve, f"rank {rank} TP={tp} PP={pp}: {curve} vs {ref_curve}"
            assert len(weights) == len(ref_weights) > 0
            assert all(bool((w == r).all()) for w, r in zip(weights, ref_weights)), (
                f"rank {rank} TP={tp} PP={pp}: weights differ"
            )
