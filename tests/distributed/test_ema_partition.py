"""The weight average partitioned over DP = 2 gloo ranks (megatron_ts/training/ema.py).

One 2-rank world checks, against the unpartitioned average kept in tests/ema_reference.py:
- each rank holds half the bytes (plus at most one padding element);
- the gathered average equals the unpartitioned one to the bit, after the same updates, with
  chunks that cut across parameters and ranks;
- a training run with train.ema_decay gives the same loss curve and the same `model/` and
  `model_ema/` files (every tensor to the bit) at every step;
- an average saved at DP = 2 resumes at DP = 1 (TP = 2 on the same two ranks) and one saved
  there resumes at DP = 2, exactly.
"""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_distributed

STEPS = 3
DECAY = [
    "--train.ema_decay",
    "0.5",
    "--checkpoint.interval_steps",
    "1",
    "--checkpoint.keep_last",
    "9",
]


def _toy_checks(rank: int) -> dict:
    import torch
    from torch import nn

    from megatron_ts.training import ema as ema_module
    from megatron_ts.training.ema import WeightAverage
    from tests.ema_reference import ReferenceAverage

    out = {}
    ema_module.CHUNK = 5  # gathered 2 elements per rank at a time: across parameters and ranks

    def modules(dtype):
        torch.manual_seed(0)  # 8 + 4 + 3 = 15 elements: rank 1's slice is padded by one
        mods = {0: nn.Linear(3, 2), 1: nn.Linear(2, 2, bias=False), 2: nn.Linear(2, 1)}
        return {k: m.to(dtype) for k, m in mods.items()}

    for dtype in (torch.float32, torch.bfloat16):
        mods, ref_mods = modules(dtype), modules(dtype)
        ema, ref = WeightAverage(mods, 0.9), ReferenceAverage(ref_mods, 0.9)
        params = [p for _, m in sorted(mods.items()) for p in m.parameters()]
        ref_params = [p for _, m in sorted(ref_mods.items()) for p in m.parameters()]
        g = torch.Generator().manual_seed(5)  # the same updates on both ranks, as DP keeps them
        for _ in range(4):
            with torch.no_grad():
                for p, q in zip(params, ref_params):
                    step = torch.randn(p.shape, generator=g).to(dtype)
                    p.add_(step)
                    q.add_(step)
            ema.update()
            ref.update()
        trained = [p.detach().clone() for p in params]
        with ema.swapped(), ref.swapped():
            same = all(torch.equal(p, q) for p, q in zip(params, ref_params))
        restored = all(torch.equal(p, t) for p, t in zip(params, trained))
        with ema.swapped(to_rank=0), ref.swapped():  # only DP rank 0 receives the average
            same_to_0 = all(
                torch.equal(p, q if rank == 0 else t)
                for p, q, t in zip(params, ref_params, trained)
            )
        restored = restored and all(torch.equal(p, t) for p, t in zip(params, trained))
        out[str(dtype)] = (ema.world, ema.nbytes, ref.nbytes, same and same_to_0, restored)
    ema_module.CHUNK = 1 << 24
    return out


def _engine(run_dir: Path, tp: int):
    import torch
    from megatron.core import parallel_state

    from megatron_ts.config import validate
    from megatron_ts.distributed.init import init_model_parallel
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.training.engine import StageEngine
    from megatron_ts.training.plan import vocab_from_config
    from tests.distributed.test_engine import _debug_config

    cfg = _debug_config(run_dir, STEPS, ["--parallel.tensor", str(tp), *DECAY])
    stage = validate(cfg, 2)[0]
    init_model_parallel(tp, 1)
    assert parallel_state.get_data_parallel_world_size() == 2 // tp
    spec = ModelSpec.from_config(
        cfg.model, vocab_from_config(cfg.tokenizer), stage.shuffle_window, tp
    )
    return StageEngine(
        spec, stage, cfg.parallel, cfg.optim, 1.0, 99, torch.device("cpu"), False, 0.5
    )


def _reload(source: Path, run_dir: Path, tp: int) -> tuple[Path, tuple[int, int]]:
    """Resumes `source`'s average on TP = tp (DP = 2 / tp) and saves it again under run_dir."""
    from megatron_ts.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from tests.ema_reference import ReferenceAverage

    engine = _engine(run_dir, tp)
    load_checkpoint(source, engine, load_optimizer=False, load_average=True)
    held = (engine.ema.nbytes, ReferenceAverage(engine.local_layers, 0.5).nbytes)
    saved = save_checkpoint(run_dir, engine, TrainState(global_step=STEPS), None, {}, 1)
    return saved, held


def _world(rank: int, world: int, root: str) -> dict:
    import megatron_ts.training.engine as engine_module
    from megatron_ts.distributed.init import init_distributed
    from megatron_ts.training.trainer import run
    from tests.distributed.test_engine import _debug_config
    from tests.ema_reference import ReferenceAverage

    init_distributed("gloo")  # kept up across the runs below (run() leaves it to its owner)
    from megatron_ts.distributed.init import init_model_parallel

    init_model_parallel(1, 1)
    out = {"toy": _toy_checks(rank)}
    root = Path(root)
    assert run(_debug_config(root / "new", STEPS, DECAY)) == 0
    engine_module.WeightAverage = ReferenceAverage  # the average before the partition
    try:
        assert run(_debug_config(root / "old", STEPS, DECAY)) == 0
    finally:
        from megatron_ts.training.ema import WeightAverage

        engine_module.WeightAverage = WeightAverage
    source = root / "new/checkpoints" / f"step_{STEPS:08d}"
    dp1, out["held_dp1"] = _reload(source, root / "dp1", tp=2)
    _, out["held_dp2"] = _reload(dp1, root / "dp2", tp=1)
    return out


def _read(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors as raw bytes (its header's key order is not
    stable between writes, so the files are compared by content)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
        return f.metadata(), tensors


def test_partitioned_average_matches_the_unpartitioned_one(tmp_path):
    import torch

    from megatron_ts.checkpoint.model_files import load_full_state_dict
    from tests.distributed.test_engine import _losses

    results = run_distributed(_world, 2, str(tmp_path))
    for rank, result in enumerate(results):
        for dtype, (world, nbytes, ref_bytes, same, restored) in result["toy"].items():
            assert world == 2, "the average was not partitioned"
            assert nbytes == 4 * 8 and ref_bytes == 4 * 15, (rank, dtype)  # ceil(15 / 2) of 15
            assert same, f"rank {rank} {dtype}: gathered average differs from the unpartitioned"
            assert restored, f"rank {rank} {dtype}: swapped() did not restore the weights"
        held, full = result["held_dp2"]  # the debug model at DP = 2: half, padding aside
        assert full % 4 == 0 and held == 4 * -(-full // 8)
        held, full = result["held_dp1"]  # TP = 2, DP = 1: the whole TP shard
        assert held == full

    new, old = tmp_path / "new", tmp_path / "old"
    assert _losses(new) == _losses(old) and len(_losses(new)) == STEPS
    compared = 0
    for step in range(1, STEPS + 1):
        name = f"checkpoints/step_{step:08d}"
        for sub in ("model", "model_ema"):
            files = sorted(p.name for p in (new / name / sub).iterdir())
            assert files == sorted(p.name for p in (old / name / sub).iterdir())
            for f in files:
                assert _read(new / name / sub / f) == _read(old / name / sub / f), f"{name} {f}"
                compared += 1
    assert compared >= 2 * STEPS * 3

    saved = load_full_state_dict(new / f"checkpoints/step_{STEPS:08d}", "ema")
    raw = load_full_state_dict(new / f"checkpoints/step_{STEPS:08d}", "raw")
    assert any(not torch.equal(saved[k], raw[k]) for k in saved), "nothing was averaged"
    for layout in ("dp1", "dp2"):  # DP = 2 -> DP = 1 (TP = 2) -> DP = 2
        again = load_full_state_dict(tmp_path / layout / f"checkpoints/step_{STEPS:08d}", "ema")
        assert set(again) == set(saved)
        for key, tensor in saved.items():
            assert torch.equal(again[key], tensor), f"{layout} {key}"
