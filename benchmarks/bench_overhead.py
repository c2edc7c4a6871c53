"""What ts-train's machinery costs per step against a plain PyTorch loop of the same network.

    python benchmarks/bench_overhead.py                      # demo flavor, 32 / 64 / 128 px
    python benchmarks/bench_overhead.py --resolutions 128 --rounds 40

In one process, one thread, fp32 on CPU, for each resolution (the demo curriculum's shapes:
s = 1 at 32 px, s = 2 at 64 and 128 px, micro batch 16, 16-token captions, 8x VQ, 1024 codes)
five variants take one optimizer step each in turn, round after round (the order rotating):

    ts-train   the real StageEngine (megatron-core layers in DeepSpeed, as bench_train builds
               it) with parallel.zero_stage = 1, so ZeRO stage 0 in effect at DP = 1
    zero1      the same engine with ZeRO-1 forced (the behaviour before issue 22)
    allreduce  ts-train with DeepSpeed's gradient all-reduce over the one DP rank turned back
               on (`engine.skip_lone_allreduce` undone: a cat and a copy of every gradient)
    mlinear    ts-train with megatron-core's own linear function at TP = 1 instead of torch's
               (`models/linear.py` undone)
    plain      the exported Hugging Face modeling file's model, built from the same weights,
               its head scored as ts-train scores it (text rows for text positions, codebook
               rows for image positions), the same loss written out in PyTorch,
               torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW with the same
               hyper-parameters and weight-decay groups

It prints the first-step losses (same weights, same batch: they must agree), the median
wall-clock and CPU time per step of each variant, and the ratios ts-train / plain and
zero1 / plain. CPU time (this process's user + system) is the steadier number on a shared box.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the demo curriculum (pretrain/configs/demo.toml): resolution -> shuffle window, z-loss
DEMO_STAGES = {32: (1, 0.0), 64: (2, 0.0), 128: (2, 1e-4)}
TEXT_SIZE, CODEBOOK, DOWNSAMPLE, CAPTION, MICRO = 28, 1024, 8, 16, 16
LR, WEIGHT_DECAY, GRAD_CLIP, TEXT_WEIGHT, SEED = 2e-3, 0.05, 1.0, 0.1, 1234


def stage_config(resolution: int):
    from megatron_ts.config import Config, validate

    window, z_loss = DEMO_STAGES[resolution]
    cfg = Config()
    cfg.model.flavor = "demo"
    cfg.model.shuffle_window = window
    cfg.tokenizer.codebook_size = CODEBOOK
    cfg.tokenizer.downsample = DOWNSAMPLE
    cfg.data.resolution = resolution
    cfg.data.caption_len = CAPTION
    cfg.train.micro_batch = cfg.train.global_batch = MICRO
    cfg.train.z_loss = z_loss
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip = LR, WEIGHT_DECAY, GRAD_CLIP
    cfg.parallel.zero_stage = 1  # the demo's setting
    return cfg, validate(cfg, 1)[0]


def fixed_batch(vocab, resolution: int) -> dict:
    """One seeded micro-batch of the stage's shape; every variant trains on it every step."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, TEXT_SIZE, (MICRO, CAPTION + 2), generator=g)
    text[:, 0], text[:, -1] = vocab.bos_id, vocab.boi_id
    mask = torch.ones(MICRO, CAPTION + 2)
    mask[:, -4:-1] = 0  # some caption padding, so the mask matters
    text[:, -4:-1] = vocab.pad_id
    grid = resolution // DOWNSAMPLE
    codes = torch.randint(0, CODEBOOK, (MICRO, grid, grid), generator=g)
    return {"text": text, "text_mask": mask, "codes": codes}


class TsTrain:
    """One ts-train step: StageEngine.train_step, as the trainer calls it."""

    def __init__(
        self,
        cfg,
        stage,
        spec,
        batch: dict,
        force_zero1: bool,
        allreduce: bool = False,
        megatron_linear: bool = False,
    ):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        from megatron_ts.training import engine as engine_mod

        effective = engine_mod.effective_zero_stage
        if force_zero1:  # the behaviour before issue 22: the configured stage whatever DP is
            engine_mod.effective_zero_stage = lambda configured, *_: (configured, "forced")
        try:
            self.engine = engine_mod.StageEngine(
                spec, stage, cfg.parallel, cfg.optim, TEXT_WEIGHT, SEED, torch.device("cpu"),
                bf16=False,
            )  # fmt: skip
        finally:
            engine_mod.effective_zero_stage = effective
        self.name = f"ts-train (ZeRO {self.engine.engine.zero_optimization_stage()})"
        if allreduce:
            self.engine.engine.enable_backward_allreduce = True
            self.name += " + DP all-reduce"
        if megatron_linear:  # megatron-core's autograd linear, as before models/linear.py
            for module in self.engine.engine.module.modules():
                for cls in (ColumnParallelLinear, RowParallelLinear):
                    if isinstance(module, cls):
                        module._forward_impl = types.MethodType(cls._forward_impl, module)
            self.name += " + megatron linear"
        self.batch = batch

    def step(self) -> float:
        self.engine.set_lr(LR)
        return self.engine.train_step(iter([self.batch])).loss


class Plain:
    """The exported modeling file's model trained by a plain PyTorch loop."""

    def __init__(self, cfg, stage, spec, batch: dict, workdir: Path):
        from megatron_ts.checkpoint.model_files import mark_complete, write_meta, write_model_files
        from megatron_ts.hf.export import export_to_hf
        from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM, grid_to_windows
        from megatron_ts.models.model import TokenShuffleLM

        source = TokenShuffleLM(spec, SEED)  # the engine builds its model with the same seed
        ckpt = workdir / "run/checkpoints/step_00000000"
        write_model_files(source, ckpt, 0, spec.shape.num_layers)
        meta_stage = {"index": 0, "caption_len": CAPTION, "resolution": stage.resolution}
        write_meta(ckpt, {"step": 0, "model_spec": spec.to_dict(), "stage": meta_stage})
        mark_complete(ckpt)
        export_to_hf(workdir / "run", workdir / "hf")
        self.model = TokenShuffleForCausalLM.from_pretrained(str(workdir / "hf")).train()
        vocab, window = spec.vocab, stage.shuffle_window
        self.text_rows = vocab.size  # the padding rows never compete
        self.code_rows = (vocab.code_offset, vocab.code_offset + vocab.codebook_size)
        self.z_coef = stage.z_loss
        text, mask, codes = batch["text"], batch["text_mask"], batch["codes"]
        self.inputs = {"input_ids": text, "image_windows": grid_to_windows(codes, window)}
        self.text_targets, self.mask = text[:, 1:], mask[:, 1:]  # (B, T-1)
        self.image_targets = self.inputs["image_windows"]  # (B, N, s^2) codebook-local
        decay, exempt = [], []
        for name, p in self.model.named_parameters():  # megatron_ts.training.optimizer's rule
            (exempt if p.ndim < 2 or "embed" in name else decay).append(p)
        self.params = decay + exempt
        self.decayed = sum(p.numel() for p in decay)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": exempt, "weight_decay": 0}],
            lr=LR, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        )  # fmt: skip
        self.name = "plain PyTorch"

    def loss(self) -> torch.Tensor:
        """image CE + w * text CE + z * mean(log Z^2): each a mean over its predictions."""
        hidden = self.model.model(**self.inputs)  # (B, T + N, d), final norm applied
        t, n = self.text_targets.shape[1] + 1, self.image_targets.shape[1]
        weight = self.model.lm_head.weight
        text_logits = hidden[:, : t - 1] @ weight[: self.text_rows].T  # (B, T-1, V)
        image_hidden = hidden[:, t - 1 : t - 1 + n]  # <boi> predicts the first window
        if self.model.unshuffle is not None:
            image_hidden = self.model.unshuffle(image_hidden)  # (B, N, s^2, d)
        else:
            image_hidden = image_hidden.unsqueeze(2)  # (B, N, 1, d)
        a, b = self.code_rows
        image_logits = image_hidden @ weight[a:b].T  # (B, N, s^2, C): codes only

        def ce(logits, targets):
            log_z = torch.logsumexp(logits, dim=-1)
            return log_z - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1), log_z

        img_ce, img_lz = ce(image_logits, self.image_targets)
        txt_ce, txt_lz = ce(text_logits, self.text_targets)
        n_text = self.mask.sum()
        total = img_ce.mean() + TEXT_WEIGHT * (txt_ce * self.mask).sum() / n_text
        if self.z_coef:
            z = ((img_lz**2).sum() + (txt_lz**2 * self.mask).sum()) / (img_lz.numel() + n_text)
            total = total + self.z_coef * z
        return total

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = LR
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def measure(resolution: int, rounds: int, warmup: int) -> dict:
    from megatron_ts.distributed.init import init_model_parallel
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.training.optimizer import no_decay
    from megatron_ts.vocab import VocabLayout

    cfg, stage = stage_config(resolution)
    init_model_parallel(1, 1)
    vocab = VocabLayout(TEXT_SIZE, CODEBOOK)
    spec = ModelSpec.from_config(cfg.model, vocab, stage.shuffle_window, 1)
    batch = fixed_batch(vocab, resolution)
    tmp = tempfile.TemporaryDirectory()  # the exported files, alive while their model trains
    variants = [
        TsTrain(cfg, stage, spec, batch, force_zero1=False),
        TsTrain(cfg, stage, spec, batch, force_zero1=True),
        TsTrain(cfg, stage, spec, batch, force_zero1=False, allreduce=True),
        TsTrain(cfg, stage, spec, batch, force_zero1=False, megatron_linear=True),
        Plain(cfg, stage, spec, batch, Path(tmp.name)),
    ]
    ours = variants[0].engine.engine.module
    decayed = sum(p.numel() for n, p in ours.named_parameters() if not no_decay(n, p))
    assert decayed == variants[-1].decayed, (decayed, variants[-1].decayed)
    first = {v.name: v.step() for v in variants}  # same weights, same batch: the same loss
    for _ in range(warmup - 1):
        for v in variants:
            v.step()
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate who goes first
            w0, c0 = time.perf_counter(), time.process_time()
            v.step()
            cpu[v.name].append(time.process_time() - c0)
            wall[v.name].append(time.perf_counter() - w0)
    tmp.cleanup()
    names = [v.name for v in variants]
    return {
        "resolution": resolution,
        "window": stage.shuffle_window,
        "first_loss": first,
        "wall_ms": {n: 1e3 * statistics.median(wall[n]) for n in names},
        "cpu_ms": {n: 1e3 * statistics.median(cpu[n]) for n in names},
        "names": names,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--rounds", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from deepspeed.utils import logger as ds_logger

    from megatron_ts.distributed.init import init_distributed

    ds_logger.setLevel(logging.WARNING)
    init_distributed("gloo")
    rows = [measure(res, args.rounds, args.warmup) for res in args.resolutions]
    for row in rows:
        print(f"{row['resolution']} px (s = {row['window']}) first-step loss:")
        for name, loss in row["first_loss"].items():
            print(f"  {name:20s} {loss!r}")
    print(
        f"\nmedians of {args.rounds} alternating steps each, 1 thread, fp32\n"
        "| px | s | ts-train ms | ZeRO-1 forced ms | plain ms | ts-train / plain "
        "| ZeRO-1 forced / plain | + all-reduce / plain | + megatron linear / plain "
        "| CPU ts-train / plain | CPU ZeRO-1 forced / plain | CPU + all-reduce / plain "
        "| CPU + megatron linear / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, old, reduce, mlin, plain = (row["wall_ms"][n] for n in row["names"])
        c_ours, c_old, c_reduce, c_mlin, c_plain = (row["cpu_ms"][n] for n in row["names"])
        print(
            f"| {row['resolution']} | {row['window']} | {ours:.1f} | {old:.1f} | {plain:.1f} "
            f"| {ours / plain:.3f} | {old / plain:.3f} | {reduce / plain:.3f} "
            f"| {mlin / plain:.3f} | {c_ours / c_plain:.3f} | {c_old / c_plain:.3f} "
            f"| {c_reduce / c_plain:.3f} | {c_mlin / c_plain:.3f} |"
        )


if __name__ == "__main__":
    main()
