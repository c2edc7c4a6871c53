"""Faults injected on purpose into ts-train: each case checks the exit code, the one-line message,
and that nothing already written was lost or silently wrong.

Run alone with `pytest -m faults` (CPU, a few minutes). The full-disk and read-only cases mount a
small tmpfs / a read-only bind mount and skip, saying why, where mounting is not permitted.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.ts_train import ENV, ROOT, losses, run_train, train_cmd
from tests.unit.test_loader_helpers import write_source

pytestmark = pytest.mark.faults

# megatron_ts.errors
EXIT_DATA, EXIT_STORAGE, EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_REQUEUE = 3, 4, 5, 6, 75


def _one_line(stderr: str, prefix: str) -> str:
    """The failure line: exactly one stderr line starts with `prefix`, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*"))


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints/latest").read_text().strip()


def _all_finite(ckpt: Path) -> bool:
    files = list((ckpt / "model").glob("*.safetensors"))
    assert files, ckpt
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(f).values())


# ---------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "zero,precision",
    [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")],
    ids=["zero0", "zero1", "zero2", "zero3", "zero0-bf16"],
)
def test_nonfinite_steps_are_never_applied_nor_saved(tmp_path, zero, precision):
    # lr 1e4: step 1 is finite and applied; its weights give infinite gradients from step 2 on.
    run_dir = tmp_path / "run"
    proc = run_train(
        run_dir,
        *("--parallel.zero_stage", str(zero), "--train.precision", precision),
        *("--optim.lr", "1e4", "--optim.warmup_steps", "0", "--train.steps", "8"),
        *("--checkpoint.interval_steps", "1", "--train.max_nonfinite_in_row", "3"),
    )
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert "3 non-finite steps in a row" in line and "nothing was saved" in line
    rows = _metrics(run_dir)
    first_bad = min(r["step"] for r in rows if r["train/skipped_steps"] > 0)
    # the skipped steps were not applied: the weights that come out are finite
    assert [r["train/skipped_steps"] for r in rows][-3:] == [1, 2, 3]
    assert first_bad == 2
    ckpts = _checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step_00000001"], "a checkpoint was written in the streak"
    assert _latest(run_dir) == "step_00000001" and str(ckpts[0]) in line
    assert all(_all_finite(c) for c in ckpts)


def test_a_streak_at_the_end_of_the_run_is_not_saved_as_final(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        run_dir,
        *("--parallel.zero_stage", "0", "--optim.lr", "1e4", "--optim.warmup_steps", "0"),
        *("--train.steps", "3", "--checkpoint.interval_steps", "100"),
    )
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert "the end of the stage" in line and "no checkpoint was written" in line
    assert _checkpoints(run_dir) == []


# ---------------------------------------------------------------------------------------------
# Kills and signals
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = run_train(run_dir, "--train.steps", "10", "--checkpoint.interval_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_kill_9_loop_resumes_exactly(reference, tmp_path):
    """SIGKILL at seeded random moments (in steps, in saves), then one clean run to the end."""
    run_dir = tmp_path / "run"
    env = {**ENV, "MEGATRON_TS_STEP_DELAY": "0.15"}
    rng = random.Random(7)
    for _ in range(3):
        proc = subprocess.Popen(
            train_cmd(run_dir, "--train.steps", "10", "--checkpoint.interval_steps", "2"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if done >= 1:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    proc = run_train(run_dir, "--train.steps", "10", "--checkpoint.interval_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir)[10] == pytest.approx(losses(reference)[10], abs=1e-6)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert (run_dir / "checkpoints" / _latest(run_dir) / "COMPLETE").exists()


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MEGATRON_TS_STEP_DELAY": "0.2"}
    proc = subprocess.Popen(
        train_cmd(run_dir, "--train.steps", "10", "--checkpoint.interval_steps", "2"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err
    proc = run_train(run_dir, "--train.steps", "10", "--checkpoint.interval_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir)[10] == pytest.approx(losses(reference)[10], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Disks
# ---------------------------------------------------------------------------------------------


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode}); needs root")


@pytest.fixture()
def small_disk(tmp_path):
    """A 10 MiB tmpfs: room for config, metrics and two debug checkpoints (4 MiB each), not three."""
    path = tmp_path / "disk"
    path.mkdir()
    _mount("-t", "tmpfs", "-o", "size=10m", "tmpfs", str(path))
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_keeps_the_last_good_checkpoint_and_recovers(small_disk, reference):
    run_dir = small_disk / "run"
    args = (
        "--train.steps",
        "10",
        "--checkpoint.interval_steps",
        "2",
        "--checkpoint.keep_last",
        "2",
    )
    proc = run_train(run_dir, *args)
    assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert "disk full" in line and str(run_dir) in line
    good = _latest(run_dir)
    assert (run_dir / "checkpoints" / good / "COMPLETE").exists()
    assert _all_finite(run_dir / "checkpoints" / good)
    # more room: the next start removes the half-written save first and finishes the run
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = run_train(run_dir, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir)[10] == pytest.approx(losses(reference)[10], abs=1e-6)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_read_only_run_directory_is_one_line(tmp_path):
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    _mount("--bind", "-o", "ro", str(src), str(ro))
    try:
        proc = run_train(ro / "run", "--train.steps", "2")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert "read-only file system" in line and str(ro / "run") in line


# ---------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "part,damage,extra",
    [
        ("meta.json", _truncate, ()),
        ("meta.json", _flip, ()),
        ("rng/rank_00000.safetensors", _flip, ()),
        ("loader/dp_00000.json", _flip, ()),
        ("optimizer/exp_avg/layer_001-tp00.safetensors", _flip, ()),
        ("model/layer_001-tp00.safetensors", _flip, ()),
        ("checksums.json", _truncate, ()),
        # a layout change reads (and reshards) the same files
        ("model/layer_001-tp00.safetensors", _truncate, ("--parallel.zero_stage", "0")),
    ],
    ids=[
        "meta-truncated",
        "meta-flipped",
        "rng-flipped",
        "loader-flipped",
        "optimizer-flipped",
        "layer-file-flipped",
        "checksums-truncated",
        "layer-file-truncated-layout-change",
    ],
)
def test_damaged_checkpoint_file_is_named_and_kept(reference, tmp_path, part, damage, extra):
    """Every kind of file, flipped (truncated optimizer state: tests/integration/test_trainer.py)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = run_dir / "checkpoints/step_00000008"
    (run_dir / "checkpoints/latest").write_text("step_00000008\n")
    shutil.rmtree(run_dir / "checkpoints/step_00000010")
    target = ckpt / part
    assert target.is_file(), sorted(p.name for p in target.parent.iterdir())
    damage(target)
    damaged = target.read_bytes()
    proc = run_train(run_dir, "--train.steps", "10", "--checkpoint.interval_steps", "2", *extra)
    assert proc.returncode == EXIT_CHECKPOINT, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert "step_00000008" in line
    assert target.read_bytes() == damaged and _latest(run_dir) == "step_00000008"


# ---------------------------------------------------------------------------------------------
# Damaged data
# ---------------------------------------------------------------------------------------------

SHARD_CONFIG = """
[job]
run_dir = "{run_dir}"
[model]
flavor = "debug"
[tokenizer]
text = "byte"
codebook_size = 512
downsample = 16
[data]
num_workers = 0
max_error_rate = 0.0
[train]
steps = 3
micro_batch = 2
global_batch = 2
[[curriculum.stages]]
name = "a"
resolution = 64
shuffle_window = 1
steps = 3
global_batch = 2
micro_batch = 2
caption_len = 8
sources = [{{url = "{src}", weight = 1.0}}]
"""


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["bit-flip", "truncated"])
def test_changed_shard_stops_training_naming_it(tmp_path, damage):
    src = write_source(tmp_path, shards=2, per_shard=8, name="a", grid=4)
    shard = sorted(src.glob("*.tar"))[0]
    damage(shard)
    run_dir = tmp_path / "run"
    config = tmp_path / "shards.toml"
    config.write_text(SHARD_CONFIG.format(run_dir=run_dir, src=src))
    proc = run_train(run_dir, config=config)
    assert proc.returncode == EXIT_DATA, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert shard.name in line and "max_error_rate" in line


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["bit-flip", "truncated"])
def test_damaged_manifest_is_one_line(tmp_path, damage):
    src = write_source(tmp_path, shards=2, per_shard=8, name="a", grid=4)
    damage(src / "manifest.json")
    run_dir = tmp_path / "run"
    config = tmp_path / "shards.toml"
    config.write_text(SHARD_CONFIG.format(run_dir=run_dir, src=src))
    proc = run_train(run_dir, config=config)
    assert proc.returncode == EXIT_DATA, proc.stderr[-3000:]
    assert "manifest.json" in _one_line(proc.stderr, "ts-train:")


def test_loader_state_of_another_configuration_is_one_line(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoints/latest").write_text("step_00000008\n")
    shutil.rmtree(run_dir / "checkpoints/step_00000010")
    proc = run_train(run_dir, "--train.steps", "10", "--job.seed", "7")
    assert proc.returncode == EXIT_DATA, proc.stderr[-3000:]
    assert "seed" in _one_line(proc.stderr, "ts-train:")


def test_export_of_a_changed_layer_file_is_refused_before_writing(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    layer = run_dir / "checkpoints/step_00000010/model/layer_002-tp00.safetensors"
    _flip(layer)
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ts.convert.cli", "to-hf", str(run_dir), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # ts-convert: every unusable input is 2
    line = _one_line(proc.stderr, "ts-convert:")
    assert str(layer) in line and "sha256" in line
    assert not out.exists()


@pytest.mark.parametrize("pipeline", [1, 2], ids=["dp2", "pp2"])
def test_nonfinite_guard_agrees_across_ranks(tmp_path, pipeline):
    """ZeRO-0 fp32 on two ranks (data- or pipeline-parallel): every rank skips the same steps."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29700 + pipeline),
            *train_cmd(run_dir, "--parallel.pipeline", str(pipeline), "--parallel.zero_stage", "0")[
                1:
            ],
            *("--optim.lr", "1e4", "--optim.warmup_steps", "0", "--train.steps", "8"),
            *("--checkpoint.interval_steps", "1", "--train.max_nonfinite_in_row", "3"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    # torchrun reports a failed worker with exit 1 and a traceback of its own; each rank's line
    # is the contract (srun, used by slurm/train.sbatch, passes the rank's code through)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ts-train: 3 non-finite steps")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert [c.name for c in _checkpoints(run_dir)] == ["step_00000001"]
    assert _all_finite(run_dir / "checkpoints/step_00000001")
    assert [r["train/skipped_steps"] for r in _metrics(run_dir)] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Two trainers, finished runs
# ---------------------------------------------------------------------------------------------


def test_second_trainer_on_the_same_run_directory_stops(tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MEGATRON_TS_STEP_DELAY": "0.5"}
    first = subprocess.Popen(
        train_cmd(run_dir, "--train.steps", "100000", "--checkpoint.interval_steps", "2"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.1)
        proc = run_train(run_dir, "--train.steps", "40")
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_line(proc.stderr, "ts-train:")
        assert f"pid {first.pid}" in line and str(run_dir) in line
        assert first.poll() is None  # the first one trains on, its saves untouched
    finally:
        first.kill()
        first.wait(timeout=60)
    # the kernel dropped the lock with the killed process: the next start proceeds
    proc = run_train(run_dir, "--train.steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_finished_run_extends_exactly(tmp_path):
    """3 steps, then the same run with 6: equal to a 6-step run (constant LR after warmup)."""
    flags = ("--optim.schedule", "constant", "--checkpoint.interval_steps", "100")
    whole = tmp_path / "whole"
    assert run_train(whole, "--train.steps", "6", *flags).returncode == 0
    run_dir = tmp_path / "run"
    assert run_train(run_dir, "--train.steps", "3", *flags).returncode == 0
    proc = run_train(run_dir, "--train.steps", "6", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extending stage" in proc.stderr
    ours, ref = losses(run_dir), losses(whole)
    assert sorted(ours) == list(range(1, 7))
    for step in range(4, 7):  # same optimizer state and the next samples, not the first ones
        assert ours[step] == pytest.approx(ref[step], abs=1e-6), step
    meta = json.loads((run_dir / "checkpoints" / _latest(run_dir) / "meta.json").read_text())
    assert meta["train_state"]["global_step"] == 6
    # nothing left to do: says so, trains nothing
    proc = run_train(run_dir, "--train.steps", "6", *flags)
    assert proc.returncode == 0 and "nothing to train" in proc.stderr
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_a_resume_that_changes_the_global_batch_is_refused(tmp_path):
    """The layout may change inside a stage, the global batch may not: one line, exit 2, the
    checkpoint untouched; resuming with the saved global batch then works."""
    run_dir = tmp_path / "run"
    assert run_train(run_dir, "--train.steps", "2").returncode == 0
    latest = _latest(run_dir)
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    batch = meta["stage"]["global_batch"]
    proc = run_train(run_dir, "--train.steps", "4", "--train.global_batch", str(2 * batch))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ts-train:")
    assert f"train.global_batch = {2 * batch}" in line and f"global_batch = {batch}" in line
    assert _latest(run_dir) == latest and sorted(losses(run_dir)) == [1, 2]
    proc = run_train(run_dir, "--train.steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
