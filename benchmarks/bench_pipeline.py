"""Batched pipeline speed: N prompts in one `TokenShufflePipeline` call vs N calls of one prompt.

Both ways sample the same images (seed + k per image; checked here pixel for pixel), so the ratio
is what batching the conditional and unconditional rows of every prompt into one forward per
decoding step saves. Variants alternate within one process (`--rounds` each) and the median is
reported. Examples:

    python benchmarks/bench_pipeline.py --model demo_out/export          # the demo's export
    python benchmarks/bench_pipeline.py                                   # a random demo-size one

Without --model, a demo-flavor model (hidden 192, 4 blocks, s = 2, 128 px with an 8x VQ of 1024
codes: 64 decoding steps, caption 18) with random weights and a random native VQ is exported to
a temporary directory; speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle in the bottom right",
    "a yellow cross in the top right",
    "two purple circles on the left",
    "an orange square in the bottom left",
    "three small blue triangles",
    "a white cross in the center",
]


def random_demo_export(root: Path) -> Path:
    """A demo-size export with random weights and a random native VQ (what scripts/demo.sh
    trains, minus the training)."""
    from megatron_ts.checkpoint.model_files import mark_complete, write_meta, write_model_files
    from megatron_ts.config import ModelConfig
    from megatron_ts.distributed.init import init_distributed, init_model_parallel
    from megatron_ts.hf.export import export_to_hf
    from megatron_ts.hf.vq_token_shuffle import NativeVQ, NativeVQConfig, save_native, vq_identity
    from megatron_ts.models.model import ModelSpec, TokenShuffleLM
    from megatron_ts.testing import randomize_weights
    from megatron_ts.vocab import VocabLayout

    init_distributed("gloo")
    init_model_parallel(1, 1)
    vq_path = root / "vq.safetensors"
    torch.manual_seed(0)
    save_native(NativeVQ(NativeVQConfig(codebook_size=1024, downsample=8)), vq_path)
    vocab = VocabLayout(256, 1024, vq_tokenizer=vq_identity("native", vq_path))
    spec = ModelSpec.from_config(ModelConfig(flavor="demo"), vocab, 2)
    model = TokenShuffleLM(spec, seed=0)
    randomize_weights(model, 0)
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    write_model_files(model, ckpt, 0, spec.shape.num_layers)
    tokenizer = {"text": "byte", "vq_format": "native", "vq_checkpoint": str(vq_path)}
    tokenizer["downsample"] = 8
    stage = {"caption_len": 18, "resolution": 128}
    meta = {"step": 1, "model_spec": spec.to_dict(), "stage": stage}
    write_meta(ckpt, {**meta, "config": {"tokenizer": tokenizer}})
    mark_complete(ckpt)
    return export_to_hf(root / "run", root / "export")


def pixels(images) -> list[str]:
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="export directory (default: a random demo-size export)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per call (at most 8)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each variant")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = random_demo_export(Path(tmp.name))
    pipe = TokenShufflePipeline.from_pretrained(model_dir, device=args.device, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[: args.prompts]

    def batched():
        return pipe(prompts, seed=0)

    def single():
        images = []
        for k, prompt in enumerate(prompts):
            images += pipe(prompt, seed=k).images
        return images

    single()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"batched": [], "single": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in (("batched", batched), ("single", single)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            outputs[name] = out.images if name == "batched" else out
    same = pixels(outputs["batched"]) == pixels(outputs["single"])
    median = {k: statistics.median(v) for k, v in times.items()}
    config = pipe.config
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model or "random demo-size export"),
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "shuffle_window": config.shuffle_window,
        "resolution": config.resolutions[0],
        "steps_per_image": config.image_positions(config.resolutions[0]),
        "cfg_scale": pipe(prompts[0], output_type="codes").settings["cfg_scale"],
        "prompts": len(prompts),
        "rounds": args.rounds,
        "batched_s": round(median["batched"], 3),
        "single_calls_s": round(median["single"], 3),
        "speedup": round(median["single"] / median["batched"], 2),
        "same_pixels": same,
        "all_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
