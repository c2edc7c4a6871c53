"""`ts-data`: make-demo, train-vq, tokenize, merge and inspect (see docs/data.md)."""

from __future__ import annotations

import argparse
import json
import sys
import typing

from megatron_ts.config import VqFormat
from megatron_ts.errors import EXIT_DATA, EXIT_USAGE, classify
from megatron_ts.logging import get_logger

log = get_logger(__name__)


def _size(text: str) -> int:
    """'256MB', '64KiB', '1000' -> bytes."""
    text = text.strip().upper().replace("IB", "B")
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def _ratios(text: str) -> tuple[str, ...]:
    """'1:1,16:9' -> ('1:1', '16:9'); each checked later by TokenizeOptions."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("make-demo", help="write the synthetic coloured-shapes dataset")
    demo.add_argument("out", help="output directory")
    demo.add_argument("--num", type=int, default=2000, help="samples")
    demo.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="dataset seed (deterministic)")
    demo.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    demo.add_argument(
        "--holdout",
        default="default",
        help="colour-shape pairs left out: 'default' (demo.HELD_OUT), 'none' or "
        "'red triangle,blue circle'",
    )
    demo.add_argument(
        "--only-holdout", action="store_true", help="write only held-out pairs (evaluation)"
    )
    demo.add_argument("--two-object-prob", type=float, default=0.3, help="share of 2-object images")
    demo.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    demo.add_argument(
        "--wide-fraction",
        type=float,
        default=0.0,
        help="share of 2:1 images (2 x resolution wide; 'on the left' / 'on the right')",
    )

    vq = sub.add_parser("train-vq", help="train the small native VQ tokenizer")
    vq.add_argument("inputs", nargs="+", help="image shards: dirs, tars, brace patterns, s3://")
    vq.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    vq.add_argument("--steps", type=int, default=400)
    vq.add_argument("--resolution", type=int, default=64)
    vq.add_argument("--batch-size", type=int, default=32)
    vq.add_argument("--lr", type=float, default=2e-3)
    vq.add_argument("--codebook-size", type=int, default=512)
    vq.add_argument("--downsample", type=int, default=8)
    vq.add_argument("--channels", default=None, help="widths per level, e.g. 32,64,64")
    vq.add_argument("--embed-dim", type=int, default=16)
    vq.add_argument("--max-images", type=int, default=4000)
    vq.add_argument(
        "--foreground-weight",
        type=float,
        default=0.0,
        help="extra loss weight of pixels away from the image's median colour (demo: 8)",
    )
    vq.add_argument("--seed", type=int, default=0)
    vq.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")

    tok = sub.add_parser("tokenize", help="image/caption shards -> token shards + manifest")
    tok.add_argument("--input", nargs="+", required=True, help="dirs, tars, {a..b} patterns, s3://")
    tok.add_argument("--output", required=True, help="output directory or s3://bucket/prefix/")
    tok.add_argument(
        "--resolution",
        type=int,
        required=True,
        help="stage resolution (square; with --buckets the side of the pixel budget)",
    )
    tok.add_argument("--vq-format", default="native", choices=typing.get_args(VqFormat))
    tok.add_argument("--vq-checkpoint", required=True, help="VQ checkpoint path")
    tok.add_argument("--text", default="byte", help="'byte' or a tokenizers JSON path")
    tok.add_argument(
        "--buckets",
        type=_ratios,
        default=None,
        help="aspect-ratio buckets W:H,... (e.g. 1:1,4:3,3:4,16:9,9:16,2:1,1:2); default: square",
    )
    tok.add_argument(
        "--grid-multiple",
        type=int,
        default=None,
        help="bucket code-grid sides are multiples of this (default 4; only with --buckets)",
    )
    tok.add_argument("--min-size", type=int, default=None, help="default: resolution // 2")
    tok.add_argument("--batch-size", type=int, default=32, help="images per VQ encode")
    tok.add_argument("--shard-size", type=_size, default=_size("256MB"), help="e.g. 256MB")
    tok.add_argument("--shard-samples", type=int, default=100_000)
    tok.add_argument("--workers", type=int, default=2, help="decode/resize threads")
    tok.add_argument("--rank", type=int, default=None, help="default: SLURM_ARRAY_TASK_ID")
    tok.add_argument("--world-size", type=int, default=None, help="default: SLURM_ARRAY_TASK_COUNT")
    tok.add_argument("--device", default=None, help="VQ device (default: cuda when present)")
    tok.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    tok.add_argument("--tmp-dir", default=None, help="staging dir for shards before upload")
    tok.add_argument("--no-merge", action="store_true", help="do not write manifest.json")

    merge = sub.add_parser("merge", help="write manifest.json from all ranks' results")
    merge.add_argument("output", help="the tokenize --output")
    merge.add_argument("--endpoint-url", default=None)

    ins = sub.add_parser("inspect", help="check a token-shard set; non-zero exit when corrupt")
    ins.add_argument("url", help="token-shard directory or manifest URL")
    ins.add_argument("--endpoint-url", default=None)
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--no-sha", action="store_true", help="skip sha256 verification")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ts-data; known failures end with one line and the code of megatron_ts.errors."""
    from megatron_ts.errors import run_cli

    return run_cli("ts-data", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    """Runs one ts-data command; returns the exit status (0 ok, 2 usage, 3 corrupt/failed)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as exc:
        if classify(exc) is not None:
            raise  # a class with its own exit code (manifest, source, input): run_cli reports it
        # any other ValueError here is a bad argument value (a VQ format, a size, ...)
        print(f"ts-data: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-demo":
        from data_tools.demo import make_demo, parse_holdout

        paths = make_demo(
            args.out,
            args.num,
            args.resolution,
            args.seed,
            args.per_shard,
            parse_holdout(args.holdout),
            args.two_object_prob,
            args.only_holdout,
            args.image_format,
            args.wide_fraction,
        )
        print(f"wrote {args.num} samples in {len(paths)} shards to {args.out}")
        return 0
    if args.command == "train-vq":
        from data_tools.train_vq import train_vq

        channels = [int(c) for c in args.channels.split(",")] if args.channels else None
        result = train_vq(
            args.inputs,
            args.out,
            steps=args.steps,
            resolution=args.resolution,
            batch_size=args.batch_size,
            lr=args.lr,
            codebook_size=args.codebook_size,
            downsample=args.downsample,
            channels=channels,
            embed_dim=args.embed_dim,
            max_images=args.max_images,
            foreground_weight=args.foreground_weight,
            seed=args.seed,
            endpoint_url=args.endpoint_url,
        )
        print(json.dumps(result.to_dict()))
        return 0
    if args.command == "tokenize":
        from data_tools.tokenize import TokenizeOptions, rank_from_env, tokenize
        from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer
        from megatron_ts.hf.vq_token_shuffle import load_vq

        rank, world = rank_from_env(args.rank, args.world_size)
        opts = TokenizeOptions(
            resolution=args.resolution,
            min_size=args.min_size,
            batch_size=args.batch_size,
            shard_bytes=args.shard_size,
            shard_samples=args.shard_samples,
            workers=args.workers,
            rank=rank,
            world_size=world,
            endpoint_url=args.endpoint_url,
            tmp_dir=args.tmp_dir,
            buckets=args.buckets,
            grid_multiple=args.grid_multiple,
        )
        vq = load_vq(args.vq_format, args.vq_checkpoint, device=args.device)
        text = load_text_tokenizer(args.text)
        result = tokenize(args.input, args.output, vq, text, opts, merge_after=not args.no_merge)
        print(json.dumps(result))
        return EXIT_DATA if result["failed_inputs"] else 0
    if args.command == "merge":
        from data_tools.tokenize import merge

        print(merge(args.output, args.endpoint_url))
        return 0
    if args.command == "inspect":
        from data_tools.inspect import format_report, inspect
        from megatron_ts.data.manifest import ManifestError

        try:
            report = inspect(args.url, args.endpoint_url, verify_sha=not args.no_sha)
        except ManifestError as exc:
            print(f"CORRUPT: {exc}")
            return EXIT_DATA
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        return EXIT_DATA if report["corrupt"] else 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
