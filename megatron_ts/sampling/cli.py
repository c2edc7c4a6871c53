"""`ts-generate`: prompts in, PNGs out, from a directory written by `ts-convert to-hf`.

It samples through the export's own `TokenShufflePipeline`, the code a user without megatron_ts
runs, so its images are the pipeline's images.

    ts-generate --model exports/demo --prompt "a red circle" --out samples/ \
        --cfg 7.5 --cfg-schedule half-linear --top-k 0 --seed 0 --num-images 4

A model trained on aspect-ratio buckets draws any of its trained sizes: `--size 96x48` (width x
height in pixels, or the bucket's ratio `--size 2:1`); `--resolution 64` asks for a square.

Defaults for cfg, schedule, temperature, top-k and top-p come from the export's
generation_config.json; flags override them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from megatron_ts.hf.generation_token_shuffle import CFG_SCHEDULES
from megatron_ts.hf.pipeline_token_shuffle import DTYPES, TokenShufflePipeline, resolve_device
from megatron_ts.sampling.png import save_png


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ts-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export directory (ts-convert to-hf)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output directory for PNGs")
    p.add_argument("--cfg", type=float, help="guidance scale (1 = no guidance)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="guidance schedule over the steps")
    p.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, help="keep the k most likely codes (0 = all)")
    p.add_argument("--top-p", type=float, help="nucleus mass (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="images decoded together")
    p.add_argument(
        "--resolution", type=int, help="side in pixels of a square image (a trained one)"
    )
    p.add_argument(
        "--size",
        help="image size WxH in pixels, width first (96x48 is landscape), or a bucket ratio W:H; "
        "one the model trained on (an unknown size lists them)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32"
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix every step")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"ts-generate: --prompts-file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise SystemExit(
                f"ts-generate: --prompts-file {path} is not UTF-8 text (byte {err.start}): save "
                "it as UTF-8, one prompt per line"
            ) from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("ts-generate: give --prompt TEXT or --prompts-file FILE")
    return prompts


def sampling_flags(args: argparse.Namespace) -> dict:
    """The pipeline's sampling arguments from the flags ts-generate and ts-eval share (None:
    the export's generation_config.json)."""
    return {
        "guidance_scale": args.cfg,
        "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "resolution": args.resolution,
        "size": getattr(args, "size", None),  # ts-eval has no --size
    }


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:n].lower() or "empty"


def main(argv: list[str] | None = None) -> int:
    """Runs ts-generate; known failures end with one line and the code of megatron_ts.errors."""
    from megatron_ts.errors import run_cli

    return run_cli("ts-generate", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    prompts = _prompts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device, args.dtype)
    try:
        pipe = TokenShufflePipeline.from_pretrained(args.model, device=device, dtype=dtype)
        result = pipe(
            prompts,
            num_images_per_prompt=args.num_images,
            **sampling_flags(args),
            use_cache=not args.no_kv_cache,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except ValueError as err:  # ModelDirError included
        print(f"ts-generate: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.num_images
    for k, (image, prompt, seed) in enumerate(
        zip(result.images, result.prompts, result.seeds, strict=True)
    ):
        settings = {
            **result.settings,
            "seed": seed,
            "model": str(Path(args.model).resolve().name),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
        }
        name = f"{k // n:04d}-{k % n:02d}-{_slug(prompt)}.png"
        path = save_png(image, out / name, prompt, settings)
        print(path)
    per_image = result.timings["decode_s"] / max(1, len(result.images))
    print(
        json.dumps(
            {
                "images": len(result.images),
                "steps_per_image": result.steps,
                "decode_s_per_image": round(per_image, 3),
            }
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
