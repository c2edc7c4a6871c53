"""Image head + loss at the paper's vocabulary: full-vocabulary head vs codebook rows only.

    python benchmarks/bench_image_head.py [--hidden 1024] [--positions 1024] [--repeats 5]

The paper's vocabulary (32000 text ids + 5 specials + 16384 codes, padded to 48512 rows) and
`--positions` image positions of s = 2 (1024: one 1024 px sample, 4096 predicted codes). Times
forward + backward of the head (`OutputHead`, TP = 1) and the image cross-entropy + z-loss on
its logits, for the old path (every vocabulary row, the loss masking non-codes to -inf; the
code of `vocab_parallel_ce` before the change, kept below) and the new one (`OutputHead` with
`rows=`, `vocab_parallel_ce` over the codebook columns), alternating the two in one process.
Time: wall-clock median and minimum, and the median of the process's CPU time (user + system
over its threads), which other jobs on a shared machine disturb less. Memory: the fp32 logits
tensor, and the peak of tensors allocated during forward + backward as torch's MemTracker counts
them (weight gradients included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch.distributed._tools.mem_tracker import MemTracker

from megatron_ts.config import ModelConfig
from megatron_ts.distributed.init import init_distributed, init_model_parallel
from megatron_ts.models.loss import vocab_parallel_ce
from megatron_ts.models.model import ModelSpec, OutputHead, code_columns, transformer_config
from megatron_ts.vocab import VocabLayout

Z_COEF = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="model width d")
    parser.add_argument("--positions", type=int, default=1024, help="image positions (s = 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def old_vocab_parallel_ce(
    logits: torch.Tensor, targets: torch.Tensor, allowed: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron_ts.models.loss.vocab_parallel_ce before the code-only head (masked, all of V)."""
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    part = logits.shape[-1]
    start = tp_rank * part
    ids = torch.arange(start, start + part, device=logits.device)
    logits = logits.float().masked_fill((ids < allowed[0]) | (ids >= allowed[1]), float("-inf"))
    local_max = logits.max(dim=-1).values.detach()
    if tp_world > 1:
        dist.all_reduce(
            local_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
        )
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    sum_exp = reduce_from_tensor_model_parallel_region(sum_exp.contiguous())
    log_z = local_max + torch.log(sum_exp)
    local_target = targets - start
    in_shard = (local_target >= 0) & (local_target < part)
    picked = torch.gather(logits, -1, local_target.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    target_logit = reduce_from_tensor_model_parallel_region(picked.contiguous())
    return log_z - target_logit, log_z


def step(head: OutputHead, x: torch.Tensor, targets: torch.Tensor, vocab: VocabLayout, new: bool):
    """Forward + backward of head and image loss; returns (loss, logits bytes)."""
    lo, hi = vocab.code_offset, vocab.code_offset + vocab.codebook_size
    if new:
        a, b = code_columns(vocab, head.output_size_per_partition)
        logits, _ = head(x, rows=(a, b))  # (N, s^2, C)
        ce, log_z = vocab_parallel_ce(logits, targets, a)
    else:
        logits, _ = head(x)  # (N, s^2, V)
        ce, log_z = old_vocab_parallel_ce(logits, targets, (lo, hi))
    loss = ce.mean() + Z_COEF * (log_z**2).mean()
    loss.backward()
    return loss.detach(), logits.numel() * 4


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    vocab = VocabLayout(text_size=32000, codebook_size=16384)
    spec = ModelSpec.from_config(
        ModelConfig(flavor="debug", hidden_size=args.hidden, num_heads=8, num_kv_heads=8),
        vocab,
        2,
    )
    config = transformer_config(spec)
    head = OutputHead(
        args.hidden, spec.padded_vocab, config=config, init_method=config.init_method, bias=False
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.positions, 4, args.hidden, generator=gen).requires_grad_()
    targets = vocab.code_offset + torch.randint(0, vocab.codebook_size, (args.positions, 4))

    variants = {"old (all 48512 rows, masked)": False, "new (16384 codebook rows)": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    losses, logits_bytes, peaks = {}, {}, {}
    for i in range(args.warmup + args.repeats):
        for name, new in variants.items():  # alternate, so machine noise hits both alike
            head.zero_grad(set_to_none=True)
            x.grad = None
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name], logits_bytes[name] = step(head, x, targets, vocab, new)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    for name, new in variants.items():
        head.zero_grad(set_to_none=True)
        x.grad = None
        tracker = MemTracker()
        with tracker:
            step(head, x, targets, vocab, new)
        peaks[name] = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())

    old, new = variants
    print(
        f"# torch {torch.__version__}, {args.threads} threads; vocabulary {spec.padded_vocab} "
        f"rows ({vocab.codebook_size} codes), hidden {args.hidden}, {args.positions} image "
        f"positions x 4 codes (s = 2), fp32, TP = 1; {args.repeats} timed runs per variant "
        f"after {args.warmup} warm-up, alternating"
    )
    print(f"# loss old {float(losses[old]):.6f}, new {float(losses[new]):.6f}")
    print(
        "| image head + loss, fwd+bwd | median ms | min ms | median CPU ms | logits GB "
        "| peak allocated GB |"
    )
    print("|---|---|---|---|---|---|")
    for name in variants:
        print(
            f"| {name} | {statistics.median(times[name]) * 1e3:.0f} | "
            f"{min(times[name]) * 1e3:.0f} | {statistics.median(cpu[name]) * 1e3:.0f} | "
            f"{logits_bytes[name] / 1e9:.3f} | {peaks[name] / 1e9:.3f} |"
        )

    def faster(series: dict[str, list[float]], stat) -> str:
        return f"{stat(series[old]) / stat(series[new]):.2f}x faster"

    print(
        f"| new vs old | {faster(times, statistics.median)} | {faster(times, min)} | "
        f"{faster(cpu, statistics.median)} | {logits_bytes[new] / logits_bytes[old]:.2f}x | "
        f"{peaks[new] / peaks[old]:.2f}x |"
    )


if __name__ == "__main__":
    main()
