"""Training on aspect-ratio buckets end to end (ts-train on CPU, gloo).

A square model (no window-position tables) trains 2 steps; a bucketed run loads it through
`checkpoint.load` (the tables start at zero) and trains on 1:1, 2:1 and 1:2 shards, one bucket
per step; cut after its step-2 checkpoint, it resumes to the same losses; with a pipeline of 2
stages (the stages exchange shapes per micro-batch) its first steps match the one-rank run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.unit.test_loader_buckets import write_bucketed
from tests.unit.test_loader_helpers import write_source

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[job]
run_dir = "{run_dir}"
seed = 5

[model]
flavor = "debug"
max_windows_per_side = {max_windows}

[tokenizer]
text = "byte"
codebook_size = 512
downsample = 16

[data]
num_workers = 0
shuffle_buffer = 8
caption_dropout = 0.0
streams = 2
grid_multiple = 1
resolution = 64
buckets = {buckets}
sources = [{{url = "{src}", weight = 1.0}}]

[train]
steps = {steps}
global_batch = 4
micro_batch = 2

[optim]
lr = 2e-3
min_lr = 2e-4
warmup_steps = 1

[checkpoint]
interval_steps = 2
keep_last = 10
{load}

[logging]
interval = 1
sample_keys = true
"""


def _config(tmp: Path, run_dir: Path, src: Path, *, buckets=(), max_windows=0, steps=4, load=None):
    path = tmp / f"{run_dir.name}.toml"
    path.write_text(
        CONFIG.format(
            run_dir=run_dir,
            src=src,
            buckets=json.dumps(list(buckets)),
            max_windows=max_windows,
            steps=steps,
            load=f'load = "{load}"' if load else "",
        )
    )
    return path


def _train(config: Path, ranks: int = 1, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain.train", "--config", str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "pretrain.train", "--config", str(config),
               *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("buckets")
    square_src = write_source(tmp, shards=2, per_shard=8, name="square")
    mixed = write_bucketed(tmp, "mixed", {"1:1": (2, 6), "2:1": (2, 6), "1:2": (2, 6)})
    square = tmp / "square_run"
    proc = _train(_config(tmp, square, square_src, steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    bucketed = tmp / "bucketed_run"
    config = _config(
        tmp, bucketed, mixed, buckets=("1:1", "2:1", "1:2"), max_windows=8, steps=6, load=square
    )
    proc = _train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "square": square, "bucketed": bucketed, "config": config, "src": mixed}


def _layer0(step_dir: Path) -> dict:
    with safe_open(str(step_dir / "model/layer_000-tp00.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_square_checkpoint_starts_a_bucketed_run(runs):
    square = _layer0(runs["square"] / "checkpoints/step_00000002")
    assert not any(k.startswith("window_positions.") for k in square)
    metrics = _metrics(runs["bucketed"])
    assert sorted(metrics) == list(range(1, 7))
    assert all(0 < m["loss"] < 20 for m in metrics.values())
    after = _layer0(runs["bucketed"] / "checkpoints/step_00000006")
    tables = {k: v for k, v in after.items() if k.startswith("window_positions.")}
    assert sorted(tables) == [f"window_positions.{n}" for n in ("col", "cols", "row", "rows")]
    assert all(v.shape == (8, 64) for v in tables.values())
    assert tables["window_positions.row"].abs().sum() > 0  # trained from zero
    steps = [json.loads(line) for line in (runs["bucketed"] / "samples/dp_00000.jsonl").open()]
    sizes = [{k.split("-")[1] for k in step["keys"]} for step in steps]
    assert all(len(s) == 1 for s in sizes), sizes  # one bucket per step
    assert len(set.union(*sizes)) >= 2, sizes  # and more than one bucket over the run
    meta = json.loads((runs["bucketed"] / "checkpoints/step_00000006/meta.json").read_text())
    assert meta["model_spec"]["max_windows_per_side"] == 8
    assert meta["stage"]["buckets"] == ["1:1", "2:1", "1:2"]


def test_resume_inside_a_bucketed_stage_gives_the_same_losses(runs, tmp_path):
    run_dir = tmp_path / "part"
    shutil.copytree(runs["bucketed"], run_dir)
    for step in (3, 4, 5, 6):
        shutil.rmtree(run_dir / f"checkpoints/step_{step:08d}", ignore_errors=True)
    (run_dir / "checkpoints/latest").write_text("step_00000002\n")
    (run_dir / "metrics.jsonl").unlink()
    config = _config(
        tmp_path, run_dir, runs["src"], buckets=("1:1", "2:1", "1:2"), max_windows=8, steps=6,
        load=runs["square"],
    )  # fmt: skip
    proc = _train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, part = _metrics(runs["bucketed"]), _metrics(run_dir)
    assert sorted(part) == [3, 4, 5, 6]
    for step in part:
        assert part[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-6), step


def test_a_resume_that_changes_the_buckets_is_refused(runs, tmp_path):
    run_dir = tmp_path / "changed"
    shutil.copytree(runs["bucketed"], run_dir)
    (run_dir / "checkpoints/latest").write_text("step_00000002\n")
    config = _config(
        tmp_path, run_dir, runs["src"], buckets=("1:1", "2:1"), max_windows=8, steps=6,
        load=runs["square"],
    )  # fmt: skip
    proc = _train(config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.buckets = ['1:1', '2:1'], but stage 'main' was checkpointed" in proc.stderr


@pytest.mark.parametrize("axis", ["pipeline", "tensor"])
def test_two_ranks_train_the_same_bucketed_steps(runs, tmp_path, axis):
    """PP = 2 exchanges activation shapes per micro-batch (the grid changes between steps);
    TP = 2 keeps the replicated window tables in step on both ranks."""
    run_dir = tmp_path / axis
    config = _config(
        tmp_path, run_dir, runs["src"], buckets=("1:1", "2:1", "1:2"), max_windows=8, steps=3,
        load=runs["square"],
    )  # fmt: skip
    proc = _train(config, 2, f"--parallel.{axis}", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _metrics(runs["bucketed"]), _metrics(run_dir)
    for step in (1, 2, 3):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step


def test_the_export_of_a_bucketed_run_lists_its_sizes_and_matches_its_logits(runs, tmp_path):
    """ts-convert to-hf of the trained bucketed run: the config lists the trained sizes, and the
    HF model gives the training model's logits on a 2:1 sample, trained window tables included."""
    import torch

    from megatron_ts.checkpoint.model_files import load_into_model
    from megatron_ts.convert.cli import main as convert
    from megatron_ts.distributed.init import init_distributed, init_model_parallel
    from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM, grid_to_windows
    from megatron_ts.models.model import ModelSpec, TokenShuffleLM

    out = tmp_path / "hf"
    assert convert(["to-hf", str(runs["bucketed"]), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["max_windows_per_side"] == 8
    sizes = [(b["name"], b["width"], b["height"]) for b in config["buckets"]]
    assert sizes == [("1:1", 64, 64), ("2:1", 96, 48), ("1:2", 48, 96)]

    init_distributed("gloo")
    init_model_parallel(1, 1)
    meta = json.loads((runs["bucketed"] / "checkpoints/step_00000006/meta.json").read_text())
    spec = ModelSpec.from_dict(meta["model_spec"])
    model = TokenShuffleLM(spec).eval()
    load_into_model(model, runs["bucketed"], 0, 1)
    assert model.input_stage.window_positions.row.abs().sum() > 0
    hf = TokenShuffleForCausalLM.from_pretrained(str(out)).eval()
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, spec.vocab.text_size, (1, config["caption_len"] + 2), generator=gen)
    text[:, 0], text[:, -1] = spec.vocab.bos_id, spec.vocab.boi_id
    codes = torch.randint(0, spec.vocab.codebook_size, (1, 3, 6), generator=gen)  # 96 x 48 px
    with torch.no_grad():
        _, ours = model(text, codes)  # (18, 1, 1, V)
        theirs = hf(input_ids=text, image_windows=grid_to_windows(codes, 1), window_grid=(3, 6))
    diff = (theirs.image_logits[:, :18] - ours.transpose(0, 1)).abs().max().item()
    assert diff < 1e-4, diff
    with torch.no_grad():  # not vacuous: without its trained tables the export differs
        for table in (hf.model.window_positions.row, hf.model.window_positions.cols):
            table.zero_()
        blind = hf(input_ids=text, image_windows=grid_to_windows(codes, 1), window_grid=(3, 6))
    assert (blind.image_logits[:, :18] - ours.transpose(0, 1)).abs().max().item() > 1e-3
