"""slurm/ on a real single-node Slurm that the suite starts: training, requeue, chains, arrays.

`slurm/testing/start_cluster.sh` installs slurm-wlm and munge when missing and starts munged,
slurmctld and slurmd on this machine; every test then submits the repository's scripts with
sbatch, in CPU mode (gloo, 2 tasks), and checks what a user would look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ts_train import with_hooks

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "pretrain/configs/debug.toml"
TRAIN = ROOT / "slurm/train.sbatch"
STEPS = 8
# the overrides every training job and the torchrun reference share
OVERRIDES = ["--train.steps", str(STEPS), "--checkpoint.interval_steps", "4"]
OVERRIDES += ["--data.num_workers", "0"]
# pending reasons of a job the cluster cannot run (e.g. more CPUs than the node has)
NEVER = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints"}
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
}


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Starts (or checks) the single-node cluster; returns the node name."""
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root to install and start slurmctld/slurmd")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm installed and no apt-get to install slurm-wlm and munge")
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/testing/start_cluster.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode == 3:
        pytest.skip(f"the Slurm daemons cannot start here: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return with_hooks({**env, "TS_DEVICE": "cpu", "OMP_NUM_THREADS": "1", **extra})


def _sbatch(cwd: Path, *args: str, env: dict[str, str] | None = None) -> int:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=env or _env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def _job(job: int) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job: int, timeout: float = 300) -> dict[str, str]:
    """Polls until the job (after any requeues) is in a terminal state; returns its record."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job)
        if info["JobState"] in TERMINAL:
            return info
        if info["JobState"] == "PENDING" and info["Reason"] in NEVER:
            subprocess.run(["scancel", str(job)])
            raise AssertionError(f"job {job} can never start on this cluster: {info}")
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)])
    raise AssertionError(f"job {job} not finished after {timeout}s: {_job(job)}")


def _batch_log(cwd: Path, name: str, job: int) -> str:
    return _read(cwd / f"{name}-{job}.out")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows}


def _signal_after_two_steps(job: int, run_dir: Path, log: Path) -> None:
    """Sends USR1 to the job's batch shell once two steps are logged, as `--signal=B:USR1@300`
    does before the time limit."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        state = _job(job)["JobState"]
        assert time.time() < deadline and state not in TERMINAL, (state, _read(log))
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"(no {path})"


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory) -> dict:
    """The debug config trained twice on 2 CPU ranks: by sbatch and by a direct torchrun."""
    root = tmp_path_factory.mktemp("train")
    job = _sbatch(
        root, "--ntasks=2", str(TRAIN), str(DEBUG), "--job.run_dir", str(root / "slurm_run"),
        *OVERRIDES, env=_env(TS_LOG_DIR=str(root / "logs")),
    )  # fmt: skip
    # the reference runs meanwhile, outside Slurm
    torchrun = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "pretrain.train", "--config", str(DEBUG), "--job.run_dir",
            str(root / "torchrun_run"), "--parallel.backend", "gloo", *OVERRIDES,
        ],
        cwd=ROOT, env={**_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    info = _wait(job)
    return {"root": root, "job": job, "info": info, "run": root / "slurm_run"}


def test_train_sbatch_trains_like_torchrun(uninterrupted):
    root, job, info = uninterrupted["root"], uninterrupted["job"], uninterrupted["info"]
    log = _batch_log(root, "ts-train", job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert "2 tasks on 1 node(s) (cpu)" in log and "training finished" in log
    rank_logs = sorted((root / "logs" / f"ts-train-{job}" / "restart-0").glob("rank-*.log"))
    assert [p.name for p in rank_logs] == ["rank-0000.log", "rank-0001.log"]
    rank0 = rank_logs[0].read_text()
    # one world of two ranks (data parallel), not two worlds of one
    assert "world=2" in rank0 and "DP=2" in rank0, rank0[-3000:]
    ckpts = uninterrupted["run"] / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (ckpts / "step_00000004").is_dir() and (ckpts / f"step_{STEPS:08d}").is_dir()

    slurm, direct = _losses(uninterrupted["run"]), _losses(root / "torchrun_run")
    assert sorted(slurm) == sorted(direct) == list(range(1, STEPS + 1))
    diffs = [abs(slurm[s] - direct[s]) for s in slurm]
    assert max(diffs) <= 1e-5, f"loss curves differ by up to {max(diffs)}: {slurm} vs {direct}"


def test_signal_checkpoints_requeues_and_resumes(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    env = _env(MEGATRON_TS_STEP_DELAY="0.5", TS_LOG_DIR=str(tmp_path / "logs"))
    job = _sbatch(
        tmp_path, "--ntasks=2", "--job-name=preempt", str(TRAIN), str(DEBUG),
        "--job.run_dir", str(run_dir), *OVERRIDES, env=env,
    )  # fmt: skip
    _signal_after_two_steps(job, run_dir, tmp_path / f"preempt-{job}.out")
    info = _wait(job)
    log = _batch_log(tmp_path, "preempt", job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "received SIGUSR1" in log and "requeueing (restart 1" in log, log
    assert "restart 1] training finished" in log, log

    logs = tmp_path / "logs" / f"preempt-{job}"
    first = (logs / "restart-0/rank-0000.log").read_text()
    again = (logs / "restart-1/rank-0000.log").read_text()
    stopped = re.search(r"checkpointed at step (\d+), exiting 75", first)
    assert stopped, first[-3000:]
    stopped_at = int(stopped.group(1))
    assert 2 <= stopped_at < STEPS
    assert f"resuming from {run_dir}/checkpoints/step_{stopped_at:08d}" in again, again[-3000:]

    ref, got = _losses(uninterrupted["run"]), _losses(run_dir)
    assert got[STEPS] == pytest.approx(ref[STEPS], abs=1e-6)
    for step in range(stopped_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], abs=1e-6), f"step {step} after the resume"


def test_chain_of_segments_runs_the_curriculum_to_the_end(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    env = _env(MEGATRON_TS_STEP_DELAY="0.5", TS_JOB_NAME="chain", TS_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/submit_curriculum.sh"), "--segments", "3", str(DEBUG),
         "--job.run_dir", str(run_dir), *OVERRIDES],
        cwd=tmp_path, env={**env, "TS_SBATCH_ARGS": "--ntasks=2"}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "stage main: 8 steps at 64 px, s = 2" in proc.stderr
    jobs = [int(line.split("=")[1]) for line in proc.stdout.split()]
    assert len(jobs) == 3
    assert _job(jobs[1])["Dependency"].startswith(f"afterok:{jobs[0]}")
    _signal_after_two_steps(jobs[0], run_dir, tmp_path / f"chain-{jobs[0]}.out")

    # segment 1 checkpointed for its "time limit" and ended successfully, without a requeue;
    # segment 2 resumed and finished; segment 3 was cancelled as not needed
    infos = [_wait(job) for job in jobs]
    logs = [_read(tmp_path / f"chain-{job}.out") for job in jobs]
    assert (infos[0]["JobState"], infos[0]["ExitCode"], infos[0]["Restarts"]) == (
        "COMPLETED", "0:0", "0"), logs[0]  # fmt: skip
    assert "the next job of the chain resumes from it" in logs[0], logs[0]
    assert (infos[1]["JobState"], infos[1]["ExitCode"]) == ("COMPLETED", "0:0"), logs[1]
    assert "training finished" in logs[1], logs[1]
    assert infos[2]["JobState"] == "CANCELLED", logs
    rank0 = _read(tmp_path / "logs" / f"chain-{jobs[1]}/restart-0/rank-0000.log")
    assert "resuming from" in rank0, rank0[-3000:]
    ref, got = _losses(uninterrupted["run"]), _losses(run_dir)
    assert got[STEPS] == pytest.approx(ref[STEPS], abs=1e-6)


def _captured_env(path: Path) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in path.read_text().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("SLURM_")}


def test_srun_tasks_form_one_world_without_exported_rendezvous(
    slurm_cluster, tmp_path, monkeypatch
):
    """A plain `srun -n 2 ts-train` (no MASTER_ADDR exported) must not become two worlds of one;
    ts-train started in the batch shell itself (no srun) is one process, whatever SLURM_NTASKS."""
    from megatron_ts.distributed import init

    dump = f"env -0 > {tmp_path}/env-$SLURM_PROCID"
    subprocess.run(["srun", "-n", "2", "bash", "-c", dump], env=_env(), check=True, timeout=120)
    batch = f"env -0 > {tmp_path}/env-batch"
    subprocess.run(
        ["sbatch", "--wait", "-n", "2", "-o", "/dev/null", f"--wrap={batch}"],
        env=_env(), check=True, timeout=120,
    )  # fmt: skip
    mapped = []
    for name in ("env-0", "env-1"):
        environ = _captured_env(tmp_path / name)
        monkeypatch.setattr(os, "environ", environ)
        init._map_slurm_env()
        mapped.append(environ)
    for rank, env in enumerate(mapped):
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == (str(rank), "2", str(rank))
        assert env["LOCAL_WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == slurm_cluster
    assert mapped[0]["MASTER_PORT"] == mapped[1]["MASTER_PORT"]

    environ = _captured_env(tmp_path / "env-batch")
    assert environ["SLURM_NTASKS"] == "2" and "SLURM_STEP_ID" not in environ
    monkeypatch.setattr(os, "environ", environ)
    init._map_slurm_env()
    assert "RANK" not in environ and "WORLD_SIZE" not in environ


def test_real_errors_fail_without_requeue(slurm_cluster, tmp_path):
    # a bad override: ts-train exits 2 in the pre-flight, nothing starts, nothing requeues
    bad = _sbatch(tmp_path, "--ntasks=2", str(TRAIN), str(DEBUG), "--train.stepz", "3")
    # GPU mode (the default) on a node without GPUs: the allocation check refuses it
    gpu = _sbatch(tmp_path, "--ntasks=2", str(TRAIN), str(DEBUG), env=_env(TS_DEVICE="gpu"))
    for job, message in (
        (bad, "ts-train --dry-run rejected the config"),
        (gpu, "one task per GPU is needed, but"),
    ):
        info = _wait(job)
        log = _batch_log(tmp_path, "ts-train", job)
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
        assert message in log, log
    assert "train.stepz" in _batch_log(tmp_path, "ts-train", bad)
    assert "TS_DEVICE=cpu" in _batch_log(tmp_path, "ts-train", gpu)


@pytest.fixture(scope="module")
def demo_data(slurm_cluster, tmp_path_factory) -> dict[str, Path]:
    """16 demo images in 4 input shards and a tiny VQ trained on them."""
    from data_tools.cli import main as ts_data

    root = tmp_path_factory.mktemp("demo")
    assert ts_data(["make-demo", str(root / "raw"), "--num", "16", "--resolution", "32",
                    "--per-shard", "4", "--seed", "3"]) == 0  # fmt: skip
    vq = root / "vq.safetensors"
    args = ["train-vq", str(root / "raw"), "--out", str(vq), "--steps", "2", "--resolution", "32"]
    args += ["--codebook-size", "32", "--channels", "8,8,8", "--batch-size", "4"]
    assert ts_data(args) == 0
    return {"root": root, "raw": root / "raw", "vq": vq}


def test_preprocess_array_writes_the_shards_of_a_direct_run(demo_data, tmp_path):
    from data_tools.cli import main as ts_data
    from megatron_ts.data.manifest import load_manifest

    tokenize = ["--input", str(demo_data["raw"]), "--resolution", "32"]
    tokenize += ["--vq-checkpoint", str(demo_data["vq"]), "--batch-size", "3", "--workers", "1"]
    direct = tmp_path / "direct"
    assert ts_data(["tokenize", *tokenize, "--output", str(direct)]) == 0

    out = tmp_path / "array"
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/preprocess.sh"), "2", *tokenize, "--output", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    jobs = dict(line.split("=") for line in proc.stdout.split())
    array, merge = int(jobs["ARRAY_JOB"]), int(jobs["MERGE_JOB"])
    assert _job(merge)["Dependency"] in (f"afterok:{array}_*(unfulfilled)", "(null)")
    info = _wait(merge)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    for task in (0, 1):
        log = logs[f"ts-preprocess-{array}_{task}.out"]
        assert f"rank {task} of 2" in log and "ts-data tokenize exited 0" in log, log
    assert sorted(p.name for p in (out / "_ranks").iterdir()) == [
        "rank-000-of-002.json",
        "rank-001-of-002.json",
    ]

    def shards(path: Path) -> list[tuple]:
        return [(s.name, s.samples, s.bytes, s.sha256) for s in load_manifest(str(path)).shards]

    assert len(shards(direct)) == 4
    assert shards(out) == shards(direct)
    assert load_manifest(str(out)).total_samples == 16
