"""One transformer block, forward + backward: megatron_ts's BlockLayer vs the plain HF-file layer.

    python benchmarks/bench_block.py [--flavor demo] [--seq 82] [--batch 16] [--repeats 200]

Four variants with the same weights, alternating in one process so machine noise hits all alike:

- `megatron_ts block`: `BlockLayer` (megatron-core TransformerLayer, local TP layers at TP = 1,
  RoPE applied by our core attention with cached cos/sin, `models/rope.py`, and megatron's MLP
  with SwiGLU as one autograd function, `models/swiglu.py`);
- `our RoPE, megatron-core MLP`: the same with megatron-core's own `MLP` (chunk, silu, product);
- `megatron-core RoPE + MLP (before)`: also RoPE left to megatron-core's SelfAttention
  (`rotary_pos_emb=`, its unfused `apply_rotary_pos_emb`): the block before issue 22;
- `plain PyTorch (HF file)`: `TokenShuffleDecoderLayer` of the exported modeling file
  (separate q/k/v and gate/up linears, (B, S, d) layout), weights converted by `hf/weights.py`.

Defaults: the demo flavor at its 128 px stage (16 caption + 2 text positions, 16 x 16 codes at
s = 2: S = 82), micro-batch 16, fp32, one thread. Time: wall-clock median and minimum and the
median of this process's CPU time (user + system), which other jobs on a shared machine disturb
less. `--profile` prints torch.profiler's top operators of each variant.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from megatron_ts.config import ModelConfig
from megatron_ts.distributed.init import init_distributed, init_model_parallel
from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig
from megatron_ts.hf.modeling_token_shuffle import TokenShuffleDecoderLayer, _rope_cos_sin
from megatron_ts.hf.weights import AttentionShape, to_hf
from megatron_ts.models.attention import resolve_backend
from megatron_ts.models.layer_specs import llama_layer_spec
from megatron_ts.models.model import BlockLayer, ModelSpec, transformer_config
from megatron_ts.models.rope import rope_freqs
from megatron_ts.vocab import VocabLayout


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="demo")
    parser.add_argument("--seq", type=int, default=82, help="positions S (82: demo at 128 px)")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch B")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print top operators per variant")
    return parser.parse_args()


class MegatronCoreBlock(nn.Module):
    """`block`'s weights in the spec with megatron-core's MLP and, optionally, its RoPE."""

    def __init__(self, block: BlockLayer, config, megatron_rope: bool):
        super().__init__()
        self.spec = block.spec
        self.megatron_rope = megatron_rope
        backend = resolve_backend(block.spec.attention_backend)
        layer_spec = llama_layer_spec(backend, None if megatron_rope else block.spec.rope_theta)
        layer_spec.submodules.mlp.module = MLP  # megatron-core's chunk + silu + product
        self.layer = build_module(layer_spec, config=config, layer_number=1)
        self.layer.load_state_dict(block.layer.state_dict())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        freqs = None
        if self.megatron_rope:
            freqs = _freqs(hidden.shape[0], self.spec.shape.head_dim, self.spec.rope_theta)
        out, _ = self.layer(hidden, attention_mask=None, rotary_pos_emb=freqs)
        return out


@functools.lru_cache(maxsize=4)
def _freqs(seq: int, dim: int, theta: float) -> torch.Tensor:
    return rope_freqs(seq, dim, theta, "cpu")  # cached per shape, as the old BlockLayer did


def plain_layer(block: BlockLayer) -> TokenShuffleDecoderLayer:
    """The HF-file decoder layer holding `block`'s weights."""
    spec = block.spec
    shape = spec.shape
    config = TokenShuffleConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
    )
    layer = TokenShuffleDecoderLayer(config)
    attn = AttentionShape(shape.num_heads, shape.num_kv_heads, shape.head_dim)
    state = {}
    for name, tensor in block.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        for hf_name, hf_tensor in to_hf(f"blocks.0.{name}", tensor, attn):
            state[hf_name.removeprefix("model.layers.0.")] = hf_tensor
    layer.load_state_dict(state)
    return layer


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    vocab = VocabLayout(text_size=256, codebook_size=512)
    spec = ModelSpec.from_config(ModelConfig(flavor=args.flavor), vocab, 2)
    config = transformer_config(spec)
    block = BlockLayer(spec, config, 0, seed=5)
    mcore_mlp = MegatronCoreBlock(block, config, megatron_rope=False)
    old = MegatronCoreBlock(block, config, megatron_rope=True)
    plain = plain_layer(block)
    shape = spec.shape
    x = torch.randn(
        args.seq, args.batch, shape.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    x_plain = x.transpose(0, 1).contiguous()  # (B, S, d)
    text_len = torch.tensor([18])

    def run_block() -> torch.Tensor:
        h = x.detach().requires_grad_()
        out, _ = block((h, text_len))  # (S, B, d)
        out.backward(torch.ones_like(out))
        return out.detach()

    def runner(module: MegatronCoreBlock):
        def run() -> torch.Tensor:
            h = x.detach().requires_grad_()
            out = module(h)
            out.backward(torch.ones_like(out))
            return out.detach()

        return run

    def run_plain() -> torch.Tensor:
        h = x_plain.detach().requires_grad_()
        # as the HF model does once per forward; positions 0..S-1, fp32
        cos, sin = _rope_cos_sin(torch.arange(args.seq), shape.head_dim, spec.rope_theta, h.dtype)
        out = plain(h, cos, sin, None, 0, 0)  # (B, S, d)
        out.backward(torch.ones_like(out))
        return out.detach().transpose(0, 1)

    variants = {
        "megatron_ts block": run_block,
        "our RoPE, megatron-core MLP": runner(mcore_mlp),
        "megatron-core RoPE + MLP (before)": runner(old),
        "plain PyTorch (HF file)": run_plain,
    }
    ref = run_plain()
    for name, fn in variants.items():
        out = fn()
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"# {name}: output max |diff| vs plain / max |plain| = {rel:.1e}")

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            for module in (block, mcore_mlp, old, plain):
                module.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    print(
        f"# torch {torch.__version__}, {args.threads} thread(s); flavor {args.flavor} "
        f"(d {shape.hidden_size}, {shape.num_heads} heads, ffn {shape.ffn_hidden_size}), "
        f"S {args.seq}, B {args.batch}, fp32, TP = 1; {args.repeats} timed fwd+bwd per variant "
        f"after {args.warmup} warm-up, alternating"
    )
    print("| one block, fwd+bwd | median ms | min ms | median CPU ms | CPU vs plain |")
    print("|---|---|---|---|---|")
    plain_cpu = statistics.median(cpu["plain PyTorch (HF file)"])
    for name in variants:
        med_cpu = statistics.median(cpu[name])
        print(
            f"| {name} | {statistics.median(times[name]) * 1e3:.2f} | "
            f"{min(times[name]) * 1e3:.2f} | {med_cpu * 1e3:.2f} | "
            f"{(med_cpu / plain_cpu - 1) * 100:+.1f}% |"
        )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in variants.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    fn()
            print(f"\n## {name}: 10 x fwd+bwd")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
