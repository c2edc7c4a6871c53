"""Checkpoint size, save time and resume time, this checkout against another one.

Trains `--steps` steps of the debug config with `--flavor` on one CPU rank (ZeRO `--zero`),
saving a checkpoint at the last step, then resumes it for one more step; for each checkout
(this one and `--baseline`, alternating, `--repeats` times) it reports the step directory's
bytes by top-level entry, the save time the trainer logs, and the resume run's wall time (one
step; the same work in both checkouts except loading the checkpoint).

    python benchmarks/bench_checkpoint.py --baseline /tmp/base [--flavor demo] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAVED = re.compile(r"saved checkpoint (\S+) in ([0-9.]+)s")


def _train(tree: Path, run_dir: Path, steps: int, args) -> tuple[float, str]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(tree),  # the checkout's package, whatever is installed
    }
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        "--config",
        str(tree / "pretrain/configs/debug.toml"),
        "--job.run_dir",
        str(run_dir),
        "--model.flavor",
        args.flavor,
        "--train.steps",
        str(steps),
        "--checkpoint.interval_steps",
        str(args.steps),
        "--parallel.zero_stage",
        str(args.zero),
        "--data.num_workers",
        "0",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: ts-train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def _sizes(step_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for path in step_dir.rglob("*"):
        if path.is_file():
            top = path.relative_to(step_dir).parts[0]
            out[top] = out.get(top, 0) + path.stat().st_size
    return out


def measure(tree: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _, log = _train(tree, run_dir, args.steps, args)
        saves = [float(sec) for _, sec in SAVED.findall(log)]
        sizes = _sizes(run_dir / "checkpoints" / f"step_{args.steps:08d}")
        resume_wall, _ = _train(tree, run_dir, args.steps + 1, args)
    return {"save_s": saves[-1], "sizes": sizes, "resume_wall_s": resume_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout")
    parser.add_argument("--flavor", default="demo")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            results[name].append(measure(tree, args))
    print(f"flavor {args.flavor}, ZeRO {args.zero}, 1 CPU rank, {args.repeats} runs each (median)")
    print(f"{'':10} {'MiB':>8} {'save s':>8} {'resume s':>9}  files (MiB)")
    medians = {}
    for name, runs in results.items():
        mib = statistics.median(sum(r["sizes"].values()) for r in runs) / 2**20
        save = statistics.median(r["save_s"] for r in runs)
        resume = statistics.median(r["resume_wall_s"] for r in runs)
        parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(runs[0]["sizes"].items()))
        medians[name] = (mib, save, resume)
        print(f"{name:10} {mib:8.1f} {save:8.2f} {resume:9.2f}  {parts}")
    (b_mib, b_save, b_res), (t_mib, t_save, t_res) = medians["baseline"], medians["this"]
    print(
        f"this / baseline: size {t_mib / b_mib:.2f}x, save {t_save / b_save:.2f}x, "
        f"resume run {t_res / b_res:.2f}x"
    )


if __name__ == "__main__":
    main()
