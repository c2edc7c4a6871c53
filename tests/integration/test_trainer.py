"""ts-train as a user runs it: metrics, kills during saves, signals, bad configs and checkpoints."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.ts_train import ENV, ROOT, losses, run_train, train_cmd


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 12-step debug run every other test compares with."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = run_train(run_dir, "--train.steps", "12", "--checkpoint.interval_steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_tensorboard_has_the_documented_metrics(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_image",
        "train/loss_text",
        "train/z_loss",
        "train/grad_norm",
        "train/lr",
        "train/skipped_steps",
        "perf/tokens_per_s",
        "perf/images_per_s",
        "perf/tflops_per_device",
        "perf/peak_memory_gb",
        "data/wait_fraction",
    ):
        assert tag in tags, f"{tag} missing from TensorBoard (has {sorted(tags)})"
    logged = [e.value for e in acc.Scalars("train/loss")]
    assert len(logged) == 12
    assert logged == pytest.approx(list(losses(reference).values()), rel=1e-6)
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] < lrs[1]  # warmup
    assert lrs[-1] < max(lrs)  # decay
    # the resolved config is in the run directory
    assert json.loads((reference / "config.json").read_text())["train"]["steps"] == 12


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MEGATRON_TS_KILL_IN_SAVE": "8"}
    proc = run_train(run_dir, "--train.steps", "12", "--checkpoint.interval_steps", "4", env=env)
    assert proc.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / ".tmp-step_00000008").is_dir()  # the half-written save
    assert not (ckpts / "step_00000008").exists()
    proc = run_train(run_dir, "--train.steps", "12", "--checkpoint.interval_steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step_00000004" in proc.stderr
    assert not (ckpts / ".tmp-step_00000008").exists()
    ref, got = losses(reference), losses(run_dir)
    for step in range(5, 13):
        assert got[step] == pytest.approx(ref[step], abs=1e-6), f"step {step}"


def test_sigusr1_checkpoints_and_exits_for_requeue(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(
            run_dir,
            "--train.steps",
            "12",
            "--checkpoint.interval_steps",
            "4",
            "--train.global_batch",
            "4",
        ),
        cwd=ROOT,
        env={**ENV, "MEGATRON_TS_STEP_DELAY": "0.5"},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 2 <= stopped_at < 12
    proc = run_train(run_dir, "--train.steps", "12", "--checkpoint.interval_steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run_dir)[12] == pytest.approx(losses(reference)[12], abs=1e-6)


def test_truncated_checkpoint_fails_with_a_clear_message(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoints/latest").write_text("step_00000008\n")
    shutil.rmtree(run_dir / "checkpoints/step_00000012")
    states = run_dir / "checkpoints/step_00000008/optimizer/exp_avg_sq/layer_001-tp00.safetensors"
    states.write_bytes(states.read_bytes()[:1000])
    proc = run_train(run_dir, "--train.steps", "12", "--checkpoint.interval_steps", "4")
    assert proc.returncode == 5  # megatron_ts.errors.EXIT_CHECKPOINT
    assert "step_00000008" in proc.stderr and "damaged" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_init_checkpoint_and_bad_config_fail_clearly(tmp_path):
    proc = run_train(tmp_path / "run", "--checkpoint.load", str(tmp_path / "nowhere"))
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr
    proc = run_train(tmp_path / "run2", "--parallel.zero_stage", "3", "--parallel.pipeline", "2")
    assert proc.returncode == 2
    assert "parallel.zero_stage" in proc.stderr
    proc = run_train(tmp_path / "run3", "--optim.lrr", "1")
    assert proc.returncode == 2 and "lrr" in proc.stderr


@pytest.mark.parametrize(
    "zero,precision", [(0, "fp32"), (0, "bf16"), (3, "fp32")], ids=["zero0", "zero0-bf16", "zero3"]
)
def test_exact_resume_restores_the_optimizer_of_every_zero_path(tmp_path, zero, precision):
    """The optimizer files hold the whole AdamW state whatever keeps it in memory: torch's AdamW
    on the parameters (ZeRO 0 fp32), DeepSpeed's bf16 optimizer (ZeRO 0 bf16), ZeRO-3's flat
    partitions. 4 steps uninterrupted == 2 steps + resume + 2, loss for loss."""
    extra = ("--parallel.zero_stage", str(zero), "--train.precision", precision)
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_train(full, "--train.steps", "4", "--checkpoint.interval_steps", "2", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints/step_00000004")
    (part / "checkpoints/latest").write_text("step_00000002\n")
    (part / "metrics.jsonl").unlink()
    proc = run_train(part, "--train.steps", "4", "--checkpoint.interval_steps", "2", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exact)" in proc.stderr
    ref, got = losses(full), losses(part)
    assert sorted(got) == [3, 4]
    assert [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]  # bit for bit
    step = {
        name: json.loads((d / "checkpoints/step_00000004/meta.json").read_text())["optimizer"]
        for name, d in (("full", full), ("part", part))
    }
    # DeepSpeed's unfused bf16 optimizer (ZeRO 0 bf16) takes one extra step at start-up
    assert step["part"] == step["full"] and step["full"]["step"] in (4, 5)
