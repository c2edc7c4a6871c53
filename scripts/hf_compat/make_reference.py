"""Writes the exports and reference numbers that `check_export.py` tests other transformers against.

Runs in the main environment (megatron_ts installed). For each entry of EXPORTS it builds a debug
TokenShuffleLM with random weights everywhere (grouped-query attention), saves it as a complete
training checkpoint, exports it with megatron_ts's own exporter (`export_to_hf`, the code behind
`ts-convert to-hf`) and records what megatron_ts computes:

- the TRAINING model's fp32 text and image logits on fixed random sequences
  (`<bos>` caption `<boi>` + a full grid of codes);
- the codes of megatron_ts's KV-cache sampler (`sample_codes`, as ts-generate calls it) with
  classifier-free guidance: greedy, and one seeded temperature + top-k run when two runs of it
  agree on this machine;
- the export's `TokenShufflePipeline` (a small random native VQ ships in the export): codes and
  the sha256 of each image's pixels for two prompts x two images, seeded, when the sampled run
  is deterministic.

Output (OUT, default .compat/reference):

    export_s2/, export_s1/       HF directories as `ts-convert to-hf` writes them
    runs/export_s*/checkpoints/  the training checkpoints they came from
    export_s2.safetensors, ...   inputs and reference outputs (tensors named in reference.json)
    reference.json               settings per export, guidance scale per step, versions

Usage: DS_ACCELERATOR=cpu python scripts/hf_compat/make_reference.py [OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CAPTION_LEN = 6  # stored in the checkpoint's stage; prompts are <bos> + 6 ids + <boi>
RESOLUTION = 128  # px
VQ_DOWNSAMPLE = 16  # the exporter's default without a VQ tokenizer -> an 8 x 8 code grid
BATCH = 3  # logits sequences per export
PROMPTS = 2  # prompts decoded together; guidance doubles the rows to [cond; uncond]
CFG = 3.0
CFG_SCHEDULE = "half-linear"
TEMPERATURE = 1.0
TOP_K = 16
MARKER = ".hf_compat_reference"  # OUT is only ever deleted when it holds this file
SAMPLE_SEED = 7  # prompt i is sampled with a generator seeded SAMPLE_SEED + i, as generate() does
PIPELINE_PROMPTS = ["a red square", "blue"]
PIPELINE_IMAGES = 2  # per prompt, all four decoded in one batch


@dataclass(frozen=True)
class Export:
    name: str
    window: int
    kv_heads: int
    seed: int


EXPORTS = (
    Export("export_s2", window=2, kv_heads=2, seed=11),
    Export("export_s1", window=1, kv_heads=2, seed=12),
)


def write_checkpoint(run: Path, export: Export):
    """A random-weight debug model saved as a complete TP = 1 checkpoint in `run`."""
    from megatron_ts.checkpoint.model_files import mark_complete, write_meta, write_model_files
    from megatron_ts.config import ModelConfig
    from megatron_ts.hf.vq_token_shuffle import NativeVQ, NativeVQConfig, save_native, vq_identity
    from megatron_ts.models.model import ModelSpec, TokenShuffleLM
    from megatron_ts.testing import randomize_weights
    from megatron_ts.vocab import VocabLayout

    vq_path = run / "vq.safetensors"  # a random native VQ, so the export's pipeline can decode
    vq_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(export.seed)
    vq_config = NativeVQConfig(codebook_size=64, downsample=VQ_DOWNSAMPLE, channels=[8, 8, 8, 8])
    save_native(NativeVQ(vq_config), vq_path)
    # 325 ids, padded to 384
    vocab = VocabLayout(
        text_size=256, codebook_size=64, vq_tokenizer=vq_identity("native", vq_path)
    )
    model_cfg = ModelConfig(flavor="debug", num_kv_heads=export.kv_heads)
    spec = ModelSpec.from_config(model_cfg, vocab, export.window)
    model = TokenShuffleLM(spec, seed=export.seed).eval()
    randomize_weights(model, export.seed)
    ckpt = run / "checkpoints" / "step_00000005"
    write_model_files(model, ckpt, 0, spec.shape.num_layers)
    stage = {
        "index": 0,
        "caption_len": CAPTION_LEN,
        "resolution": RESOLUTION,
        "shuffle_window": export.window,
    }
    tokenizer = {
        "text": "byte",
        "vq_format": "native",
        "vq_checkpoint": str(vq_path),
        "downsample": VQ_DOWNSAMPLE,
    }
    meta = {"step": 5, "model_spec": spec.to_dict(), "stage": stage}
    write_meta(ckpt, {**meta, "config": {"tokenizer": tokenizer}})
    mark_complete(ckpt)
    return model, spec


def prompts(vocab, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) prompts `<bos>` caption `<boi>` (the second one shorter, padded) and the
    unconditional prompts `<bos> <pad> x caption_len <boi>` that guidance uses."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, vocab.text_size, (CAPTION_LEN - i,), generator=gen).tolist()
        rows.append([vocab.bos_id, *ids, *[vocab.pad_id] * i, vocab.boi_id])
    uncond = [[vocab.bos_id, *[vocab.pad_id] * CAPTION_LEN, vocab.boi_id]] * n
    return torch.tensor(rows), torch.tensor(uncond)


def sample(model, prompt, uncond, grid: int, temperature: float, top_k: int) -> torch.Tensor:
    """Codes (B, G, G) from megatron_ts's KV-cache sampler with guidance."""
    from megatron_ts.hf.generation_token_shuffle import SamplingConfig, sample_codes

    sampling = SamplingConfig(
        cfg_scale=CFG,
        cfg_schedule=CFG_SCHEDULE,
        temperature=temperature,
        top_k=top_k,
        seed=SAMPLE_SEED,
    )
    gens = [torch.Generator().manual_seed(SAMPLE_SEED + i) for i in range(prompt.shape[0])]
    return sample_codes(model, prompt, grid, sampling, gens, uncond)


def reference_for(out: Path, export: Export) -> dict:
    """Checkpoint, export and reference tensors of one export; returns its reference.json entry."""
    from megatron_ts.hf.export import export_to_hf
    from megatron_ts.hf.generation_token_shuffle import scheduled_guidance
    from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM, grid_to_windows
    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline

    run = out / "runs" / export.name
    model, spec = write_checkpoint(run, export)
    export_dir = export_to_hf(run, out / export.name)
    vocab, s = spec.vocab, export.window
    grid = RESOLUTION // VQ_DOWNSAMPLE
    steps = (grid // s) ** 2

    # logits of the training model on fixed random sequences
    gen = torch.Generator().manual_seed(1000 + export.seed)
    text = torch.randint(0, vocab.text_size, (BATCH, CAPTION_LEN + 2), generator=gen)
    text[:, 0], text[:, -1] = vocab.bos_id, vocab.boi_id
    text[1, -3:-1] = vocab.pad_id  # one caption shorter than caption_len
    codes = torch.randint(0, vocab.codebook_size, (BATCH, grid, grid), generator=gen)
    with torch.no_grad():
        text_logits, image_logits = model(text, codes)  # (T-1, B, V), (N, B, s^2, V)
    text_logits = text_logits.transpose(0, 1).contiguous()  # (B, T-1, V)
    image_logits = image_logits.transpose(0, 1).contiguous()  # (B, N, s^2, V)

    # the sampler, on megatron_ts's own copy of the HF model loaded from the export
    hf = TokenShuffleForCausalLM.from_pretrained(str(export_dir)).eval()
    with torch.no_grad():
        hf_out = hf(input_ids=text, image_windows=grid_to_windows(codes, s))
    own_diff = max(
        (hf_out.logits[:, : text_logits.shape[1]] - text_logits).abs().max().item(),
        (hf_out.image_logits[:, :steps] - image_logits).abs().max().item(),
    )
    if own_diff > 1e-4:
        sys.exit(f"{export.name}: megatron_ts's own HF model differs from training by {own_diff}")
    prompt, uncond = prompts(vocab, PROMPTS, 2000 + export.seed)
    greedy = sample(hf, prompt, uncond, grid, 0.0, 0)
    sampled = sample(hf, prompt, uncond, grid, TEMPERATURE, TOP_K)
    sampled_again = sample(hf, prompt, uncond, grid, TEMPERATURE, TOP_K)
    deterministic = torch.equal(sampled, sampled_again)
    settings = dict(guidance_scale=CFG, cfg_schedule=CFG_SCHEDULE, temperature=TEMPERATURE)
    generated = hf.generate(prompt, **settings, top_k=TOP_K, seed=SAMPLE_SEED)
    if deterministic and not torch.equal(generated, sampled):
        sys.exit(f"{export.name}: model.generate() differs from sample_codes")
    pipeline = None
    if deterministic:
        pipe = TokenShufflePipeline.from_pretrained(export_dir, device="cpu")
        images = pipe(
            PIPELINE_PROMPTS,
            PIPELINE_IMAGES,
            **settings,
            top_k=TOP_K,
            seed=SAMPLE_SEED,
            progress=False,
        )
        pipeline = {
            "prompts": PIPELINE_PROMPTS,
            "num_images_per_prompt": PIPELINE_IMAGES,
            "settings": {**settings, "top_k": TOP_K, "seed": SAMPLE_SEED},
            "pixels_sha256": [hashlib.sha256(im.tobytes()).hexdigest() for im in images.images],
        }

    tensors = {
        "text_ids": text,
        "codes": codes,
        "image_windows": grid_to_windows(codes, s).clone(),  # s = 1: a view of codes
        "text_logits": text_logits,
        "image_logits": image_logits,
        "prompt_ids": prompt,
        "uncond_ids": uncond,
        "greedy_codes": greedy,
    }
    if deterministic:
        tensors["sampled_codes"] = sampled
        tensors["pipeline_codes"] = images.codes
    tensor_file = f"{export.name}.safetensors"
    save_file(tensors, str(out / tensor_file))
    return {
        "name": export.name,
        "dir": export.name,
        "tensors": tensor_file,
        "shuffle_window": s,
        "num_key_value_heads": spec.shape.num_kv_heads,
        "num_attention_heads": spec.shape.num_heads,
        "grid": grid,
        "steps": steps,
        "caption_len": CAPTION_LEN,
        "cfg": CFG,
        "cfg_schedule": CFG_SCHEDULE,
        "cfg_scales": [scheduled_guidance(CFG_SCHEDULE, CFG, k, steps) for k in range(steps)],
        "sampled": (
            {"temperature": TEMPERATURE, "top_k": TOP_K, "seed": SAMPLE_SEED}
            if deterministic
            else None
        ),
        "sampled_skipped": None if deterministic else "two seeded runs differed on this machine",
        "pipeline": pipeline,
        "megatron_ts_hf_diff": own_diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=".compat/reference", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()

    import transformers

    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    if args.out.exists():
        if any(args.out.iterdir()) and not (args.out / MARKER).is_file():
            sys.exit(f"{args.out} is not empty and was not written by this script; pass a new OUT")
        shutil.rmtree(args.out)  # never mix exports of an older modeling file with new numbers
    args.out.mkdir(parents=True)
    (args.out / MARKER).write_text("written by scripts/hf_compat/make_reference.py\n")
    entries = [reference_for(args.out, export) for export in EXPORTS]
    reference = {
        "format": "megatron_ts.hf_compat/1",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "logit_tolerance": 1e-4,
        "exports": entries,
    }
    (args.out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    names = ", ".join(e["name"] for e in entries)
    print(f"reference: {names} in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
