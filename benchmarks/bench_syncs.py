"""Device-to-host syncs of one training step and of one sampling call, counted on any device.

A GPU stalls its stream at every sync (`.item()`, `.tolist()`, `.cpu()`, `bool(tensor)`...);
the CPU cannot show the stall, so this counts the syncs instead (megatron_ts.testing.SyncCounter)
and prints where each one is made. Examples:

    python benchmarks/bench_syncs.py                      # debug flavor, CPU, 1 rank
    python benchmarks/bench_syncs.py --zero 1 --accumulation 4 --resolutions 64 128
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_ts.testing import SyncCounter

CAPTION_LEN = 8


def _engine(zero: int, accumulation: int, micro: int):
    """A one-rank gloo StageEngine of the debug flavor (64 px, s = 2, 512 codes)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
    }.items():
        os.environ.setdefault(key, value)
    from megatron_ts.config import Config, validate
    from megatron_ts.distributed.init import init_distributed, init_model_parallel
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.training.engine import StageEngine
    from megatron_ts.vocab import VocabLayout

    _, world = init_distributed("gloo")
    cfg = Config()
    cfg.model.flavor = "debug"
    cfg.model.shuffle_window = 2
    cfg.tokenizer.codebook_size = 512
    cfg.tokenizer.downsample = 8
    cfg.data.resolution = 64
    cfg.data.caption_len = CAPTION_LEN
    cfg.train.micro_batch = micro
    cfg.train.global_batch = micro * accumulation
    cfg.train.z_loss = 1e-3
    cfg.parallel.zero_stage = zero
    stage = validate(cfg, world)[0]
    init_model_parallel(1, 1)
    vocab = VocabLayout(256, 512)
    spec = ModelSpec.from_config(cfg.model, vocab, 2, 1)
    engine = StageEngine(spec, stage, cfg.parallel, cfg.optim, 1.0, 7, torch.device("cpu"), False)
    return engine, vocab


def micro_batches(vocab, n: int, micro: int) -> list[dict]:
    """`n` fixed host micro-batches (built outside any counted region)."""
    g = torch.Generator().manual_seed(1000)
    out = []
    for _ in range(n):
        text = torch.randint(0, 256, (micro, CAPTION_LEN + 2), generator=g)
        text[:, 0], text[:, -1] = vocab.bos_id, vocab.boi_id
        mask = torch.ones(micro, CAPTION_LEN + 2)
        mask[:, 0] = mask[:, -1] = 0
        codes = torch.randint(0, 512, (micro, 8, 8), generator=g)
        out.append({"text": text, "text_mask": mask, "codes": codes, "keys": []})
    return out


def count_train(zero: int, accumulation: int, micro: int = 2, steps: int = 3) -> dict:
    """Syncs per optimizer step of StageEngine.train_step (after one warm-up step)."""
    engine, vocab = _engine(zero, accumulation, micro)
    batches = iter(micro_batches(vocab, accumulation * (steps + 1), micro))
    engine.set_lr(1e-3)
    engine.train_step(batches)  # warm-up: one-time work (optimizer state) is not per step
    with SyncCounter() as syncs:
        for _ in range(steps):
            engine.train_step(batches)
    return {
        "zero": zero,
        "accumulation": accumulation,
        "steps": steps,
        "syncs_per_step": syncs.count / steps,
        "sites": syncs.sites,
    }


def count_sampling(window: int, resolution: int, batch: int, cfg_scale: float) -> dict:
    """Syncs of one `sample_codes` call of a tiny random model."""
    from megatron_ts.config import ModelConfig
    from megatron_ts.hf.build import hf_config_from_spec
    from megatron_ts.hf.generation_token_shuffle import SamplingConfig, caption_ids, sample_codes
    from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.vocab import VocabLayout

    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VocabLayout(256, 512), window)
    config = hf_config_from_spec(spec, CAPTION_LEN, [resolution], 8)
    torch.manual_seed(0)
    model = TokenShuffleForCausalLM(config).eval()

    class Bytes:
        def encode(self, text):
            return list(text.encode())

    prompts = ["a red bicycle", "two cats"][:batch] + ["a boat"] * max(0, batch - 2)
    ids = torch.tensor([caption_ids(Bytes(), p, CAPTION_LEN, config) for p in prompts])
    uncond = torch.tensor([caption_ids(Bytes(), "", CAPTION_LEN, config)] * batch)
    sampling = SamplingConfig(cfg_scale=cfg_scale, top_k=100, top_p=0.9, seed=0)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    grid = config.grid(resolution)
    with SyncCounter() as syncs:
        sample_codes(model, ids, grid, sampling, gens, uncond if cfg_scale > 1 else None)
    return {
        "s": window,
        "resolution": resolution,
        "batch": batch,
        "decoding_steps": (grid // window) ** 2,
        "syncs": syncs.count,
        "sites": syncs.sites,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sites", action="store_true", help="print where each sync is made")
    args = parser.parse_args()
    rows = []
    for res in args.resolutions:
        for window in (1, 2):
            rows.append(count_sampling(window, res, batch=2, cfg_scale=7.5))
    for zero in args.zero:
        rows.append(count_train(zero, args.accumulation))
        from megatron_ts.distributed.init import shutdown_distributed  # a fresh world per ZeRO

        shutdown_distributed(True)
    for row in rows:
        if not args.sites:
            row.pop("sites")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
