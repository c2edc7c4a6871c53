"""Samples/s of one loader worker from local disk and from an S3 endpoint on loopback.

Writes synthetic token shards shaped like stage 2 of the 2.7B recipe (1024 px, 16x VQ -> a 64x64
code grid, captions up to 128 ids), serves them from a moto S3 server in a separate process on
127.0.0.1, and times `next(loader)` for one worker: in-process (the worker's own speed) and as
one worker process (adds the transfer of batches to the trainer process).

    python benchmarks/bench_loader.py [--samples 4000] [--repeats 3] [--grid 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TS_LOG_LEVEL", "WARNING")  # before the package logger is configured

from megatron_ts.config import DataConfig, ResolvedStage, SourceConfig  # noqa: E402
from megatron_ts.data.loader import build_loader  # noqa: E402
from megatron_ts.vocab import VocabLayout  # noqa: E402

VOCAB = VocabLayout(text_size=32000, codebook_size=16384)
DOWNSAMPLE = 16


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_shards(out: Path, shards: int, per_shard: int, grid: int) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for s in range(shards):
        path = out / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(per_shard):
                key = f"{s:05d}-{j:06d}"
                members = {
                    "codes.npy": _npy(
                        rng.integers(0, VOCAB.codebook_size, (grid, grid)).astype(np.uint16)
                    ),
                    "ids.npy": _npy(
                        rng.integers(0, VOCAB.text_size, int(rng.integers(8, 128))).astype(np.int32)
                    ),
                    "txt": b"a photo of something " * 4,
                    "json": json.dumps({"key": key, "width": 1024, "height": 1024}).encode(),
                }
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append(
            {"name": path.name, "samples": per_shard, "bytes": path.stat().st_size, "sha256": ""}
        )
    manifest = {
        "format": "megatron_ts.tokens/1",
        "resolution": grid * DOWNSAMPLE,
        "grid": grid,
        "downsample": DOWNSAMPLE,
        "vocab": VOCAB.to_dict(),
        "vq": {},
        "text_tokenizer": {},
        "shards": entries,
        "total_samples": shards * per_shard,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def measure(
    url: str, endpoint: str | None, grid: int, samples: int, processes: bool
) -> tuple[float, float]:
    """Returns (samples per wall second, samples per CPU second of this process)."""
    stage = ResolvedStage(
        index=1, name="1024px", resolution=grid * DOWNSAMPLE, shuffle_window=2,
        sources=(SourceConfig(url, 1.0),), global_batch=8, micro_batch=8, caption_len=128, steps=1,
        lr=1e-4, min_lr=1e-5, warmup_steps=0, schedule="constant", z_loss=0.0,
        carry_over="weights", tensor=1, pipeline=1,
    )  # fmt: skip
    cfg = DataConfig(num_workers=1, shuffle_buffer=1000, caption_dropout=0.1, s3_endpoint=endpoint)
    loader = build_loader(
        cfg, stage, VOCAB, seed=0, dp_rank=0, dp_size=1, downsample=DOWNSAMPLE, processes=processes
    )
    for _ in range(5):  # warm-up: worker start, first GETs, shuffle buffer fill
        next(loader)
    n = samples // 8
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    loader.close()
    # Per CPU-second of this process: with the worker in-process that is the worker's own cost,
    # independent of other load on the machine (the moto server runs in another process).
    return n * 8 / wall, n * 8 / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="timed samples per run")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=64, help="codes per side (64 = 1024 px)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (median)")
    parser.add_argument("--out", default=None, help="shard directory (default: a temp dir)")
    args = parser.parse_args()
    # One thread, as in a worker process: idle OpenMP threads spinning after torch ops would
    # otherwise count as CPU time of the in-process worker.
    torch.set_num_threads(1)
    os.environ.setdefault("TS_LOG_LEVEL", "WARNING")
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_loader_"))
    src = write_shards(root, args.shards, args.per_shard, args.grid)
    size = sum(p.stat().st_size for p in src.glob("*.tar"))
    moto, endpoint = start_moto()
    try:
        from megatron_ts.storage import make_client

        client = make_client(endpoint)
        client.create_bucket(Bucket="bench")
        for path in sorted(src.iterdir()):
            client.upload_file(str(path), "bench", f"tokens/{path.name}")
        rows = []
        for processes in (False, True):
            # Alternate local and S3 runs and keep the medians: on a shared 2-core machine one
            # run can be slowed by other processes.
            local, s3 = [], []
            for _ in range(args.repeats):
                local.append(measure(str(src), None, args.grid, args.samples, processes))
                s3.append(
                    measure("s3://bench/tokens/", endpoint, args.grid, args.samples, processes)
                )
            rows.append((processes, np.median(local, axis=0), np.median(s3, axis=0)))
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    print(
        f"shards: {args.shards} x {args.per_shard} samples, grid {args.grid}x{args.grid}, "
        f"{size / args.shards / 2**20:.1f} MiB per shard; {args.samples} timed samples, "
        f"median of {args.repeats} runs"
    )
    print("| worker | local disk (samples/s) | S3 loopback (samples/s) | S3 / local |")
    print("|---|---|---|---|")
    for processes, local, s3 in rows:
        kind = "1 worker process" if processes else "1 worker, in-process"
        print(f"| {kind} | {local[0]:.0f} | {s3[0]:.0f} | {s3[0] / local[0]:.0%} |")
    local, s3 = rows[0][1], rows[0][2]
    print(
        f"| 1 worker, in-process, per CPU-second | {local[1]:.0f} | {s3[1]:.0f} | "
        f"{s3[1] / local[1]:.0%} |"
    )


if __name__ == "__main__":
    main()
