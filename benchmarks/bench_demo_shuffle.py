"""Token-shuffle's claim at demo scale: s = 2 against s = 1 at matched training compute.

    bash scripts/demo.sh                                  # makes demo_out/ (data, VQ, tokens)
    python benchmarks/bench_demo_shuffle.py [--s2-steps 600] [--eval-limit 42]

Trains pretrain/configs/demo_ablation.toml (one 128 px stage from scratch) twice: with s = 2 for
--s2-steps steps, and with s = 1 for as many steps as cost the same training FLOPs (from
`ts-train --dry-run`, the model FLOPs of megatron_ts.models.flops). Each run is exported and scored
with `ts-eval shapes`. Prints one Markdown table: steps, FLOPs, wall-clock, final image loss per
code (mean of the last logged fifth of the run) and eval accuracy by attribute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = "pretrain/configs/demo_ablation.toml"


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def stage_flops(overrides: list[str]) -> float:
    plan = json.loads(run(["ts-train", "--config", CONFIG, "--dry-run", *overrides]))
    return plan["stages"][0]["training_flops_per_step"]


def train_and_score(name: str, window: int, steps: int, args) -> dict:
    run_dir = Path(args.work) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "--job.run_dir",
        str(run_dir),
        "--curriculum.stages.0.shuffle_window",
        str(window),
        "--curriculum.stages.0.steps",
        str(steps),
        "--optim.warmup_steps",
        str(max(1, steps // 10)),
    ]
    t0 = time.perf_counter()
    run(["ts-train", "--config", CONFIG, *overrides])
    train_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-max(1, len(rows) // 5) :]
    loss = sum(r["train/loss_image"] for r in tail) / len(tail)
    export = run_dir / "export"
    run(["ts-convert", "to-hf", str(run_dir), str(export)])
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    run(["ts-eval", "shapes", "--model", str(export), "--out", str(run_dir / "eval"), *limit])
    summary = json.loads((run_dir / "eval" / "report.json").read_text())["summary"]
    return {
        "s": window,
        "steps": steps,
        "flops": steps * stage_flops(overrides),
        "train_s": train_s,
        "loss_image": loss,
        "seen": summary.get("seen", {}),
        "held_out": summary.get("held_out", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--s2-steps", type=int, default=600)
    parser.add_argument("--eval-limit", type=int, default=None, help="prompts (default: all)")
    parser.add_argument("--work", default="runs/bench_demo_shuffle")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")

    f2 = stage_flops(["--curriculum.stages.0.shuffle_window", "2"])
    f1 = stage_flops(["--curriculum.stages.0.shuffle_window", "1"])
    s1_steps = max(1, round(args.s2_steps * f2 / f1))
    results = [
        train_and_score("s2", 2, args.s2_steps, args),
        train_and_score("s1", 1, s1_steps, args),
    ]
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; FLOPs per step s=1 / s=2 = "
        f"{f1 / f2:.2f}"
    )
    print(
        "| s | steps | training PFLOP | wall-clock s | image loss / code | seen colour | "
        "seen shape | seen position | seen all | held-out colour | held-out shape | "
        "held-out all |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        seen, held = r["seen"], r["held_out"]
        print(
            f"| {r['s']} | {r['steps']} | {r['flops'] / 1e15:.3f} | {r['train_s']:.0f} | "
            f"{r['loss_image']:.3f} | {seen.get('color', 0):.0%} | {seen.get('shape', 0):.0%} | "
            f"{seen.get('position', 0):.0%} | {seen.get('all', 0):.0%} | "
            f"{held.get('color', 0):.0%} | {held.get('shape', 0):.0%} | {held.get('all', 0):.0%} |"
        )


if __name__ == "__main__":
    main()
