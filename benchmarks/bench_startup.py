"""Time from `ts-train` start to its first step, on a machine that ran it before.

    python benchmarks/bench_startup.py                       # debug config, 3 timed starts
    python benchmarks/bench_startup.py --config pretrain/configs/demo.toml --runs 2

Runs `ts-train --config CONFIG --train.steps 1` once to warm the caches (DeepSpeed's CPU comm op
build, Python bytecode, the page cache), then RUNS more times into fresh run directories, and
prints for each start the seconds from spawning the process to the log lines that mark its
phases: torch.distributed up (imports + process group + DeepSpeed comm), the stage's engine
built, the first step logged (the issue-22 target: within 10 s for the debug config), and exit.
The medians go on the last line as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = {
    "distributed": "torch.distributed up",
    "stage": "megatron_ts.training.trainer: stage 1/",
    "first_step": "megatron_ts.training.metrics: step 1 ",
}


def one_start(config: str, run_dir: Path, extra: list[str]) -> dict[str, float]:
    """Seconds from spawn to each phase's first log line, and to the process's exit."""
    cmd = [sys.executable, "-m", "pretrain.train", "--config", config]
    cmd += ["--job.run_dir", str(run_dir), "--train.steps", "1", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seen: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stderr:
        now = time.perf_counter() - start
        tail = (tail + [line])[-20:]
        for name, marker in PHASES.items():
            if name not in seen and marker in line:
                seen[name] = now
    if proc.wait() != 0:
        sys.exit(f"ts-train failed ({proc.returncode}):\n{''.join(tail)}")
    seen["exit"] = time.perf_counter() - start
    missing = [name for name in PHASES if name not in seen]
    if missing:
        sys.exit(f"log lines of {missing} not found; the markers in {__file__} are out of date")
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pretrain/configs/debug.toml")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="more ts-train overrides, after --")
    args = ap.parse_args()
    print(
        f"python {sys.executable}; TORCH_EXTENSIONS_DIR="
        f"{os.environ.get('TORCH_EXTENSIONS_DIR', '(unset: ts-train picks it)')}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        warm = one_start(args.config, Path(tmp) / "warm", args.extra)
        print(f"warm-up start: first step at {warm['first_step']:.1f} s, exit {warm['exit']:.1f} s")
        print("| start | distributed up s | stage built s | first step s | exit s |")
        print("|---|---|---|---|---|")
        for i in range(args.runs):
            t = one_start(args.config, Path(tmp) / f"run{i}", args.extra)
            rows.append(t)
            print(
                f"| {i + 1} | {t['distributed']:.2f} | {t['stage']:.2f} | "
                f"{t['first_step']:.2f} | {t['exit']:.2f} |"
            )
    medians = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    print(json.dumps({"config": args.config, "runs": args.runs, "median_s": medians}))


if __name__ == "__main__":
    main()
