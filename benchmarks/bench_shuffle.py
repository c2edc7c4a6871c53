"""Token-shuffle speed-up on CPU: measured forward+backward time beside the FLOPs ratio.

    python benchmarks/bench_shuffle.py [--layers 8] [--grid 32] [--batch 4] [--iters 10]

Builds the `debug` flavor's width (hidden 64, 4 heads, SwiGLU 176) with more layers, feeds a
grid x grid code image per sample (32 x 32 = 1024 codes by default, a 512 px image at 16x) and
times forward + loss + backward for s = 1, 2, 4 in one run. The FLOPs column comes from
`megatron_ts.models.flops.sample_flops` (model FLOPs, causal attention counted as such), so the
table shows how much of the predicted saving a small model on CPU realises.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from megatron_ts.config import ModelConfig
from megatron_ts.distributed.init import init_distributed, init_model_parallel
from megatron_ts.models.flops import sample_flops
from megatron_ts.models.loss import TokenShuffleLoss
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.sequence import SequenceLayout
from megatron_ts.vocab import VocabLayout


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks")
    parser.add_argument("--grid", type=int, default=32, help="codes per image side")
    parser.add_argument("--caption", type=int, default=30, help="caption tokens per sample")
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per window")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per window")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def step_seconds(model: TokenShuffleLM, loss_fn: TokenShuffleLoss, labels: tuple) -> float:
    """Seconds of one forward + loss + backward step."""
    text, _, codes = labels
    start = time.perf_counter()
    loss_fn(model(text, codes), labels).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    loss_fn.pop_history()
    return elapsed


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    vocab = VocabLayout(text_size=256, codebook_size=512)

    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, vocab.text_size, (args.batch, args.caption + 2), generator=gen)
    text[:, 0], text[:, -1] = vocab.bos_id, vocab.boi_id
    mask = torch.ones_like(text, dtype=torch.bool)
    codes = torch.randint(0, vocab.codebook_size, (args.batch, args.grid, args.grid), generator=gen)
    labels = (text, mask, codes)

    runs = []
    for s in args.windows:
        spec = ModelSpec.from_config(
            ModelConfig(flavor="debug", num_layers=args.layers, attention_backend="sdpa"), vocab, s
        )
        runs.append((s, spec, TokenShuffleLM(spec, seed=0), TokenShuffleLoss(vocab, s, 1.0, 1e-4)))
    # Round-robin over the windows, so a busy machine slows every column alike.
    times: dict[int, list[float]] = {s: [] for s in args.windows}
    for i in range(args.warmup + args.iters):
        for s, _, model, loss_fn in runs:
            elapsed = step_seconds(model, loss_fn, labels)
            if i >= args.warmup:
                times[s].append(elapsed)

    rows = []
    for s, spec, _, _ in runs:
        flops = sample_flops(
            spec.shape, spec.padded_vocab, args.caption, args.grid, s, spec.shuffle_mlp_blocks
        )
        rows.append(
            {
                "s": s,
                "positions": SequenceLayout(args.caption, args.grid, s).seq_len,
                "median_s": statistics.median(times[s]),
                "min_s": min(times[s]),
                "flops": flops.training * args.batch,
            }
        )

    base = rows[0]
    print(
        f"# torch {torch.__version__}, {args.threads} threads, {platform.processor() or 'cpu'}; "
        f"debug width (d=64, 4 heads, ffn 176), {args.layers} layers, batch {args.batch}, "
        f"{args.grid}x{args.grid} codes + {args.caption + 2} text positions, "
        f"{args.iters} timed steps per s after {args.warmup} warm-up, round-robin"
    )
    print(
        "| s | positions / sample | fwd+bwd ms / step (median) | min ms | speed-up vs s=1 "
        "(median / min) | training GFLOP / step | FLOPs ratio vs s=1 | GFLOP/s (min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['s']} | {r['positions']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} "
            f"| {base['median_s'] / r['median_s']:.2f}x / {base['min_s'] / r['min_s']:.2f}x "
            f"| {r['flops'] / 1e9:.2f} | {base['flops'] / r['flops']:.2f}x "
            f"| {r['flops'] / r['min_s'] / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
