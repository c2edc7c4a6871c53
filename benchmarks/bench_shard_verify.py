"""Cost of the loader's shard verification (size at open, sha256 while streaming).

Writes the token shards of `bench_loader.py` (stage 2 of the 2.7B recipe: 64x64 code grid) with
two manifests over the same files: one with each shard's `bytes` and `sha256` (verified, the
default for shards from `ts-data tokenize`) and one without (read unverified). Times one
in-process loader worker on each, alternating runs, and hashlib's sha256 alone on the bytes.

    python benchmarks/bench_shard_verify.py [--samples 4000] [--repeats 5] [--grid 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TS_LOG_LEVEL", "WARNING")  # before the package logger is configured

from bench_loader import measure, write_shards  # noqa: E402


def write_manifests(src: Path) -> tuple[str, str]:
    """Returns (verified, unverified) manifest URLs of the shards in `src`."""
    manifest = json.loads((src / "manifest.json").read_text())
    for entry in manifest["shards"]:
        raw = (src / entry["name"]).read_bytes()
        entry["bytes"], entry["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    (src / "manifest.json").write_text(json.dumps(manifest))
    for entry in manifest["shards"]:
        del entry["bytes"], entry["sha256"]
    (src / "unverified.json").write_text(json.dumps(manifest))
    return str(src / "manifest.json"), str(src / "unverified.json")


def sha256_rate(src: Path) -> float:
    """MiB/s of hashlib.sha256 over the shards, fed in tarfile's 10 KiB reads."""
    data = b"".join(p.read_bytes() for p in sorted(src.glob("*.tar")))
    t0 = time.perf_counter()
    sha = hashlib.sha256()
    for i in range(0, len(data), 10240):
        sha.update(data[i : i + 10240])
    return len(data) / 2**20 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="timed samples per run")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=64, help="codes per side (64 = 1024 px)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per setting (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a worker process
    src = write_shards(Path(tempfile.mkdtemp(prefix="bench_verify_")), args.shards, args.per_shard,
                       args.grid)  # fmt: skip
    verified, unverified = write_manifests(src)
    size = sum(p.stat().st_size for p in src.glob("*.tar"))
    runs: dict[str, list] = {"unverified": [], "verified": []}
    for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
        runs["unverified"].append(measure(unverified, None, args.grid, args.samples, False))
        runs["verified"].append(measure(verified, None, args.grid, args.samples, False))
    med = {k: np.median(v, axis=0) for k, v in runs.items()}
    per_sample = size / (args.shards * args.per_shard)
    print(
        f"shards: {args.shards} x {args.per_shard} samples, grid {args.grid}x{args.grid}, "
        f"{per_sample / 1024:.1f} KiB per sample; {args.samples} timed samples, one in-process "
        f"worker, local disk, median of {args.repeats} runs"
    )
    print("| manifest | samples/s (wall) | samples per CPU-second |")
    print("|---|---|---|")
    for name in ("unverified", "verified"):
        print(f"| {name} | {med[name][0]:.0f} | {med[name][1]:.0f} |")
    cost = 1 - med["verified"][1] / med["unverified"][1]
    rate = sha256_rate(src)
    print(
        f"verification cost: {cost:.1%} of CPU throughput; sha256 alone: {rate:.0f} MiB/s, i.e. "
        f"{per_sample / 2**20 / rate * 1e6:.1f} us per sample"
    )


if __name__ == "__main__":
    main()
