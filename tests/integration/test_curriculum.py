"""A three-stage tiny curriculum end to end on token shards (one CPU rank).

Stage a: 64 px (4x4 codes) without shuffle; stage b: 128 px (8x8 codes) with s = 2; stage c:
128 px, s = 2, z-loss. Each stage reads its own source, whose grid differs from the others'
where the resolution does, so reading another stage's source would fail the grid check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.unit.test_loader_helpers import write_source

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[job]
run_dir = "{run_dir}"
seed = 5

[model]
flavor = "debug"

[tokenizer]
text = "byte"
codebook_size = 512
downsample = 16

[data]
num_workers = 0
shuffle_buffer = 8
caption_dropout = 0.1

[optim]
lr = 2e-3
min_lr = 2e-4
warmup_steps = 1

[checkpoint]
interval_steps = 2
keep_last = 10

[logging]
interval = 1

[[curriculum.stages]]
name = "a"
resolution = 64
shuffle_window = 1
steps = 3
global_batch = 4
micro_batch = 2
caption_len = 8
sources = [{{url = "{src}/a", weight = 1.0}}]

[[curriculum.stages]]
name = "b"
resolution = 128
shuffle_window = 2
steps = 4
global_batch = 4
micro_batch = 2
caption_len = 8
carry_over = "weights"
sources = [{{url = "{src}/b", weight = 1.0}}]

[[curriculum.stages]]
name = "c"
resolution = 128
shuffle_window = 2
steps = 2
global_batch = 4
micro_batch = 4
caption_len = 8
z_loss = 1e-3
sources = [{{url = "{src}/c", weight = 1.0}}]
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    write_source(root, name="a", shards=2, per_shard=8, grid=4)
    write_source(root, name="b", shards=2, per_shard=8, grid=8)
    write_source(root, name="c", shards=2, per_shard=8, grid=8)
    return root


def _train(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", str(config), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )


def _write_config(tmp_path: Path, run_dir: Path, sources: Path) -> Path:
    path = tmp_path / f"{run_dir.name}.toml"
    path.write_text(CONFIG.format(run_dir=run_dir, src=sources))
    return path


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {
        r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, sources) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    run_dir = tmp / "run"
    proc = _train(_write_config(tmp, run_dir, sources))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_stages_run_in_order_with_boundaries_at_the_configured_steps(full_run):
    metrics = _metrics(full_run)
    assert sorted(metrics) == list(range(1, 10))
    stages = [int(metrics[s]["train/stage"]) for s in sorted(metrics)]
    assert stages == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    for record in metrics.values():
        assert record["loss"] == record["loss"] and record["loss"] < 20  # finite, sane
    # z-loss only in stage c changes the total: total = image + text + coef * z
    for step in (8, 9):
        r = metrics[step]
        expected = r["train/loss_image"] + r["train/loss_text"] + 1e-3 * r["train/z_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    for step in (4, 5):
        r = metrics[step]
        assert r["loss"] == pytest.approx(r["train/loss_image"] + r["train/loss_text"], rel=1e-5)
    # every stage ends with a checkpoint whose meta names the next stage
    meta = json.loads((full_run / "checkpoints/step_00000003/meta.json").read_text())
    assert meta["train_state"]["stage_index"] == 1
    assert meta["stage"]["name"] == "a" and meta["stage"]["shuffle_window"] == 1
    final = json.loads((full_run / "checkpoints/step_00000009/meta.json").read_text())
    assert final["train_state"]["stage_index"] == 3
    assert final["model_spec"]["shuffle_window"] == 2


def _tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_transition_s1_to_s2_carries_weights_and_adds_shuffle_layers(full_run):
    """Layers present in both stages carry over; the first stage-b losses are finite."""
    ckpt = full_run / "checkpoints"
    end_a = _tensors(ckpt / "step_00000003/model/layer_001-tp00.safetensors")  # block 0
    # stage b trains from the stage-a weights: after one step of b they moved only a little
    first_b = _tensors(ckpt / "step_00000004/model/layer_001-tp00.safetensors")
    assert set(end_a) == set(first_b)
    for name, tensor in end_a.items():
        delta = (first_b[name] - tensor).abs().max().item()
        assert delta < 5e-2, f"{name} moved {delta}: stage b did not start from stage a"
    input_a = _tensors(ckpt / "step_00000003/model/layer_000-tp00.safetensors")
    input_b = _tensors(ckpt / "step_00000004/model/layer_000-tp00.safetensors")
    assert not any("shuffle" in k for k in input_a)
    assert {k for k in input_b if k.startswith("shuffle.")}, "stage b has no token-shuffle layers"
    assert (input_b["embedding.weight"] - input_a["embedding.weight"]).abs().max() < 5e-2
    metrics = _metrics(full_run)
    assert all(metrics[s]["loss"] < 20 for s in (4, 5))


def test_interrupted_inside_stage_b_resumes_to_the_same_losses(full_run, tmp_path, sources):
    """Kill after the step-6 checkpoint (inside stage b): the resumed run matches exactly."""
    run_dir = tmp_path / "part"
    shutil.copytree(full_run, run_dir)
    for step in (7, 8, 9):
        shutil.rmtree(run_dir / f"checkpoints/step_{step:08d}", ignore_errors=True)
    (run_dir / "checkpoints/latest").write_text("step_00000006\n")
    (run_dir / "metrics.jsonl").unlink()
    config = tmp_path / "part.toml"
    config.write_text(CONFIG.format(run_dir=run_dir, src=sources))
    proc = _train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, part = _metrics(full_run), _metrics(run_dir)
    assert sorted(part) == [7, 8, 9]
    for step in part:
        assert part[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-6), f"step {step}"


def test_a_finished_run_takes_an_added_stage(full_run, sources, tmp_path):
    """Stages a and b trained and finished; the config then gains stage c: only c runs, from
    b's last checkpoint, and ends where the three-stage run ends."""
    run_dir = tmp_path / "run"
    two = CONFIG.format(run_dir=run_dir, src=sources)
    two = two[: two.index('[[curriculum.stages]]\nname = "c"')]
    (tmp_path / "two.toml").write_text(two)
    proc = _train(tmp_path / "two.toml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_metrics(run_dir)) == list(range(1, 8))
    proc = _train(_write_config(tmp_path, run_dir, sources))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = _metrics(run_dir), _metrics(full_run)
    assert sorted(ours) == list(range(1, 10))
    for step in (8, 9):
        assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6), step
