"""Training throughput and MFU of one device at a curriculum stage's shape.

    python benchmarks/bench_train.py --flavor 2.7B --resolution 1024 --shuffle 1 2 --micro-batch 4
    python benchmarks/bench_train.py --flavor debug --resolution 256 --downsample 8 --shuffle 1 2  # CPU

Builds the real StageEngine (megatron-core layers in DeepSpeed, ZeRO-1, bf16 on GPU / fp32 on
CPU), trains on random batches of the stage's fixed shape, and reports images/s, tokens/s,
TFLOP/s and MFU (model FLOPs from megatron_ts.models.flops; peak from training.metrics) after
warm-up steps. For each shuffle window it prints one row, and the s=1 -> s=2 speed-up beside the
FLOPs ratio, all measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# DeepSpeed picks its accelerator at import time.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def build_engine(args, window: int, micro_batch: int | None = None):
    """The real StageEngine for `args`' shape at shuffle window `window` (bf16 on GPU).

    Returns (engine, spec, stage, cfg). `args` holds flavor, layers, codebook, downsample,
    resolution, caption_len, micro_batch, checkpointing and text_size.
    """
    from megatron_ts.config import Config, validate
    from megatron_ts.distributed.init import init_distributed, init_model_parallel
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.training.engine import StageEngine
    from megatron_ts.vocab import VocabLayout

    init_distributed("auto")
    cfg = Config()
    cfg.model.flavor = args.flavor
    if args.layers:
        cfg.model.num_layers = args.layers
    cfg.model.shuffle_window = window
    cfg.tokenizer.codebook_size = args.codebook
    cfg.tokenizer.downsample = args.downsample
    cfg.data.resolution = args.resolution
    cfg.data.caption_len = args.caption_len
    cfg.train.micro_batch = cfg.train.global_batch = micro_batch or args.micro_batch
    cfg.parallel.activation_checkpointing = args.checkpointing
    stage = validate(cfg, 1)[0]
    init_model_parallel(1, 1)
    vocab = VocabLayout(args.text_size, args.codebook)
    spec = ModelSpec.from_config(cfg.model, vocab, window, 1, args.checkpointing)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    engine = StageEngine(spec, stage, cfg.parallel, cfg.optim, 1.0, 1, device, bf16=cuda)
    engine.set_lr(1e-4)
    return engine, spec, stage, cfg


def random_batches(batch: int, caption_len: int, text_size: int, codebook: int, grid: int):
    """Endless micro-batches of random captions and codes of one shape (seeded)."""
    g = torch.Generator().manual_seed(0)
    while True:
        yield {
            "text": torch.randint(0, text_size, (batch, caption_len + 2), generator=g),
            "text_mask": torch.ones(batch, caption_len + 2),
            "codes": torch.randint(0, codebook, (batch, grid, grid), generator=g),
        }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(engine, batches, warmup: int, steps: int) -> float:
    """Seconds per optimizer step over `steps` steps after `warmup` (peak memory reset between)."""
    for _ in range(warmup):
        engine.train_step(batches)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(batches)
    sync()
    return (time.perf_counter() - start) / steps


def train_flops_per_image(spec, cfg, grid: int, window: int) -> float:
    from megatron_ts.models.flops import sample_flops

    return sample_flops(
        spec.shape, spec.padded_vocab, cfg.data.caption_len, grid, window,
        cfg.model.shuffle_mlp_blocks,
    ).training  # fmt: skip


def measure(args, window: int) -> dict:
    from megatron_ts.training.metrics import device_peak_tflops, peak_memory_gb

    engine, spec, stage, cfg = build_engine(args, window)
    grid = stage.grid(args.downsample)
    b = args.micro_batch
    batches = random_batches(b, args.caption_len, args.text_size, args.codebook, grid)
    elapsed = timed_steps(engine, batches, args.warmup, args.steps)
    flops = train_flops_per_image(spec, cfg, grid, window)
    tflops = flops * b / elapsed / 1e12
    peak = device_peak_tflops(cfg.logging)
    cuda = torch.cuda.is_available()
    return {
        "shuffle_window": window,
        "positions": stage.seq_len(args.downsample),
        "step_s": elapsed,
        "images_per_s": b / elapsed,
        "tokens_per_s": b * stage.seq_len(args.downsample) / elapsed,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gb": peak_memory_gb(),
        "train_flops_per_image": flops,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--layers", type=int, default=None, help="override the flavor's layers")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--downsample", type=int, default=8)
    parser.add_argument("--codebook", type=int, default=16384)
    parser.add_argument("--text-size", type=int, default=32000)
    parser.add_argument("--caption-len", type=int, default=128)
    parser.add_argument("--shuffle", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [measure(args, s) for s in args.shuffle]
    print("| s | positions | step s | images/s | tokens/s | TFLOP/s | MFU | peak mem GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(
            f"| {r['shuffle_window']} | {r['positions']} | {r['step_s']:.3f} | {r['images_per_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['tflops']:.3f} | {mfu} | {r['peak_memory_gb']:.2f} |"
        )
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(
                f"s={r['shuffle_window']} vs s={base['shuffle_window']}: images/s x"
                f"{r['images_per_s'] / base['images_per_s']:.2f}, training FLOPs per image x"
                f"{base['train_flops_per_image'] / r['train_flops_per_image']:.2f} fewer"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
