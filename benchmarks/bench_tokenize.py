"""Images/s of `ts-data tokenize`, with where the time goes (decode, resize, encode, write).

Two parts, each timing `data_tools.tokenize.tokenize` (what `ts-data tokenize` runs) in this
process on demo data written by `make-demo` as JPEG (img2dataset's default format):

1. The demo's native VQ (8x, 1024 codes, the `scripts/demo.sh` settings), trained briefly with
   `train-vq` (its weights do not change the time), at `--resolutions` (default 128 and 256 px)
   from `--source` px images (default 512: every image is decoded and downscaled).
2. A 16x tokenizer in LlamaGen's VQ-16 layout (16384 x 8 codebook, 72M parameters) at
   `--vq16-resolutions` (default 512, 1024, 2048 px with `--device cuda`, none on CPU) from
   images of the same size. Its weights are random, saved as a `vq_ds16_t2i.pt`-style file and
   loaded with `load_vq("llamagen", ...)`: the time of a VQ forward does not depend on its weights.

Per run: images/s over the wall time, images per CPU-second of this process (all its threads;
less sensitive to other jobs on a shared machine), and per stage the summed seconds per image
that `tokenize` reports (`timings` in its JSON output). Decode and resize run in `--workers`
threads and overlap the VQ encode of the previous batch, so the stages add up to more than the
wall time when the workers keep up.

    python benchmarks/bench_tokenize.py [--images 512] [--resolutions 128 256] [--threads 1]
    python benchmarks/bench_tokenize.py --device cuda --workers 8 --vq16-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TS_LOG_LEVEL", "WARNING")  # before the package logger is configured

from data_tools.demo import make_demo  # noqa: E402
from data_tools.tokenize import TokenizeOptions, tokenize  # noqa: E402
from data_tools.train_vq import train_vq  # noqa: E402
from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer  # noqa: E402
from megatron_ts.hf.vq_token_shuffle import LlamaGenVQ, load_vq  # noqa: E402

STAGES = ("read", "decode", "resize", "encode", "text", "write")
VQ16_BATCH = {512: 16, 1024: 4, 2048: 1}
"""Images per VQ-16 encode by resolution (activations grow with the square of the side)."""


def make_inputs(root: Path, images: int, resolution: int) -> Path:
    """`images` demo samples at `resolution` px, JPEG, 4 input shards (cached under root)."""
    out = root / f"raw-{resolution}-{images}"
    if not out.exists():
        per_shard = max(1, -(-images // 4))
        make_demo(out, images, resolution, seed=0, per_shard=per_shard, image_format="jpg")
    return out


def native_vq(root: Path, raw: Path, steps: int, threads: int) -> Path:
    """The demo's native VQ (scripts/demo.sh settings) after `steps` train-vq steps."""
    path = root / "native_vq.safetensors"
    if not path.exists():
        result = train_vq(
            [str(raw)], str(path), steps=steps, resolution=64, codebook_size=1024, downsample=8,
            max_images=256, eval_images=32, threads=threads,
        )  # fmt: skip
        print(f"train-vq: {steps} steps in {result.seconds:.0f} s, PSNR {result.psnr:.1f} dB")
    return path


def random_vq16(root: Path) -> Path:
    """A randomly initialised VQ-16 saved in LlamaGen's checkpoint layout."""
    path = root / "vq_ds16_t2i.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({"model": LlamaGenVQ().state_dict()}, path)
    return path


def run_once(
    raw: Path, out: Path, vq, text, resolution: int, batch: int, workers: int, device: str
) -> dict:
    opts = TokenizeOptions(resolution=resolution, batch_size=batch, workers=workers)
    if device == "cuda":
        torch.cuda.synchronize()
    cpu0 = time.process_time()
    result = tokenize([str(raw)], str(out), vq, text, opts)
    cpu = time.process_time() - cpu0
    if result["failed_inputs"] or result["samples_skipped"]:
        raise RuntimeError(f"tokenize skipped or failed input: {result}")
    n = result["images"]
    return {
        "images": n,
        "images_per_s": n / result["seconds"],
        "images_per_cpu_s": n / cpu,
        "ms_per_image": {k: 1000 * result["timings"][k] / n for k in STAGES},
    }


def measure(
    name: str, raw: Path, root: Path, vq, text, args, resolution: int, source: int, batch: int
) -> dict:
    """Median over `--repeats` runs (each into a fresh output directory) after one warm-up."""
    runs = []
    for rep in range(max(1, args.repeats) + 1):
        out = root / f"tok-{name}-{resolution}-{rep}"
        run = run_once(raw, out, vq, text, resolution, batch, args.workers, args.device)
        if rep:  # the first run warms up the allocator, the page cache and cuDNN
            runs.append(run)
    row = {"vq": name, "px": resolution, "source_px": source, "batch": batch, **_median_run(runs)}
    row["images_per_s_runs"] = [round(r["images_per_s"], 1) for r in runs]
    return row


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images per native run (0: skip)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--source", type=int, default=512, help="demo image side (native part)")
    parser.add_argument("--vq-steps", type=int, default=20, help="train-vq steps (native VQ)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per native encode")
    parser.add_argument(
        "--vq16-resolutions",
        type=int,
        nargs="*",
        default=None,
        help="VQ-16 resolutions (default: 512 1024 2048 with --device cuda, none on CPU)",
    )
    parser.add_argument("--vq16-images", type=int, default=64, help="images per VQ-16 run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=2, help="decode/resize threads")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    vq16_res = args.vq16_resolutions
    if vq16_res is None:
        vq16_res = [512, 1024, 2048] if args.device == "cuda" else []
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_tokenize_"))
    root.mkdir(parents=True, exist_ok=True)
    text = load_text_tokenizer("byte")
    rows = []
    if args.images and args.resolutions:
        raw = make_inputs(root, args.images, args.source)
        vq = load_vq("native", native_vq(root, raw, args.vq_steps, args.threads), args.device)
        for res in args.resolutions:
            rows.append(measure("native 8x", raw, root, vq, text, args, res, args.source,
                                args.batch_size))  # fmt: skip
    if vq16_res:
        vq = load_vq("llamagen", random_vq16(root), args.device)
        for res in vq16_res:
            raw = make_inputs(root, args.vq16_images, res)
            rows.append(measure("VQ-16 (random)", raw, root, vq, text, args, res, res,
                                VQ16_BATCH.get(res, 4)))  # fmt: skip
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, workers {args.workers}, "
        f"median of {args.repeats} runs after 1 warm-up"
    )
    print(
        "| VQ | px | source px | batch | images | images/s | images/CPU-s | "
        + " | ".join(f"{s} ms" for s in STAGES)
        + " |"
    )
    print("|---" * (7 + len(STAGES)) + "|")
    for r in rows:
        ms = " | ".join(f"{r['ms_per_image'][s]:.2f}" for s in STAGES)
        print(
            f"| {r['vq']} | {r['px']} | {r['source_px']} | {r['batch']} | {r['images']} | "
            f"{r['images_per_s']:.3g} | {r['images_per_cpu_s']:.3g} | {ms} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
