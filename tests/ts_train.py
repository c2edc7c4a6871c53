"""`ts-train` run as a user runs it (a subprocess on CPU), for the integration and fault tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "pretrain/configs/debug.toml"
HOOKS = ROOT / "tests/hooks"
"""On PYTHONPATH, its sitecustomize.py gives a subprocess the fault-injection variables
(MEGATRON_TS_STEP_DELAY, MEGATRON_TS_KILL_IN_SAVE); the package itself has no test hooks."""


def with_hooks(env: dict) -> dict:
    """`env` with tests/hooks first on PYTHONPATH."""
    path = [str(HOOKS), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}


ENV = with_hooks({**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def train_cmd(run_dir: Path, *overrides: str, config: Path = DEBUG) -> list[str]:
    """The command line: `config` (the debug config), `run_dir`, no loader worker processes."""
    return [
        sys.executable,
        "-m",
        "pretrain.train",
        "--config",
        str(config),
        "--job.run_dir",
        str(run_dir),
        "--data.num_workers",
        "0",
        *overrides,
    ]


def run_train(
    run_dir: Path, *overrides: str, env: dict | None = None, config: Path = DEBUG
) -> subprocess.CompletedProcess:
    """Runs `train_cmd` to its end (10 min at most), capturing stdout and stderr as text."""
    return subprocess.run(
        train_cmd(run_dir, *overrides, config=config),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env or ENV,
    )


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from the run's metrics.jsonl."""
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }
