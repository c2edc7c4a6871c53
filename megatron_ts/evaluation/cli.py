"""`ts-eval`: score generated images of demo-grammar prompts with a deterministic analyser.

ts-eval shapes --model EXPORT_DIR --out DIR [--aspect 1:1|2:1|both] [--prompts-file F] [flags]
ts-eval analyse --data DEMO_SHARDS_DIR [--limit N]     # the analyser on ground-truth images
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

from data_tools.demo import WIDE_POSITIONS, positions_for
from megatron_ts.evaluation.analyser import analyse, score
from megatron_ts.evaluation.shapes import (
    ASPECTS,
    ATTRS,
    default_prompts,
    read_prompts,
    score_images,
    summarise,
    write_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="generate and score demo-grammar prompts")
    shapes.add_argument("--model", required=True, help="export directory (ts-convert to-hf)")
    shapes.add_argument("--out", required=True, help="directory for images and the report")
    shapes.add_argument(
        "--aspect",
        default="1:1",
        choices=[*ASPECTS, "both"],
        help="image shape: 1:1, 2:1 (wide grammar, 'on the left'; the export's trained 2:1 "
        "size) or both (the report groups the scores by aspect)",
    )
    shapes.add_argument(
        "--prompts-file", help="one demo-grammar caption per line (in the grammar of --aspect)"
    )
    shapes.add_argument("--limit", type=int, help="score only the first N prompts (of each aspect)")
    shapes.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    shapes.add_argument("--cfg-schedule", help="constant, linear or half-linear")
    shapes.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
    shapes.add_argument("--top-k", type=int, help="keep the k most likely codes")
    shapes.add_argument("--top-p", type=float, help="nucleus mass")
    shapes.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    shapes.add_argument("--batch-size", type=int, default=8, help="images decoded together")
    shapes.add_argument(
        "--resolution",
        type=int,
        help="side of the square images (a trained one; default the model's first)",
    )
    shapes.add_argument(
        "--wide-size",
        type=_wide_size,
        help="WxH of the 2:1 images (a trained size) instead of the export's trained 2:1 bucket, "
        "e.g. 192x96",
    )
    shapes.add_argument("--device", default="auto", help="auto, cpu, cuda")
    check = sub.add_parser("analyse", help="score ground-truth demo shards (analyser check)")
    check.add_argument("--data", required=True, help="directory of make-demo .tar shards")
    check.add_argument("--limit", type=int, default=1000, help="samples to score")
    check.add_argument(
        "--vq-checkpoint",
        help="score VQ reconstructions instead (encode + decode): the ceiling for any generator "
        "on this tokenizer",
    )
    check.add_argument("--vq-format", default="native", help="native, llamagen or chameleon")
    check.add_argument(
        "--resolution",
        type=int,
        help="resize to this side (the height of a wide image, keeping its aspect) before the VQ",
    )
    return parser


def _wide_size(text: str) -> str:
    """'192x96', checked wide enough for the analyser's wide grammar (the pipeline's size)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH, e.g. 192x96") from None
    if height < 1 or positions_for(width, height) is not WIDE_POSITIONS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a wide image: the width must be at least 1.5 x the height"
        )
    return f"{width}x{height}"


def _prompt_set(args: argparse.Namespace) -> list:
    """The prompts of every requested aspect, square first (--limit applies per aspect)."""
    aspects = list(ASPECTS) if args.aspect == "both" else [args.aspect]
    if args.prompts_file and len(aspects) > 1:
        raise ValueError(
            "--prompts-file is read in one grammar: pass --aspect 1:1 or --aspect 2:1 with it "
            "(one ts-eval run per file), or drop it to use the built-in sets of both"
        )
    prompts = []
    for aspect in aspects:
        chosen = (
            read_prompts(args.prompts_file, aspect=aspect)
            if args.prompts_file
            else default_prompts(aspect=aspect)
        )
        prompts += chosen[: args.limit] if args.limit else chosen
    return prompts


def generation_kwargs(args: argparse.Namespace, aspect: str, pipe, first_image: int) -> dict:
    """The pipeline call's keyword arguments for the images of one aspect.

    The one place that says how ts-eval asks for an image's size: a square image by
    `resolution` (None: the model's first), any other aspect by `size`: the `--wide-size` given
    ("WxH"), else the ratio itself, which the export resolves to the trained bucket of that
    ratio (its config's `buckets`, the current stage's first). Image i of the whole run is
    sampled with seed + i, so the second aspect's call starts at seed + first_image.

    Args:
        args: the parsed `ts-eval shapes` flags.
        aspect: one of ASPECTS.
        pipe: the TokenShufflePipeline (its config names the trained sizes).
        first_image: the index of the call's first image in the run.

    Raises:
        ValueError: a non-square aspect for a model trained on square images only.
    """
    from megatron_ts.sampling.cli import sampling_flags

    kwargs = {**sampling_flags(args), "batch_size": args.batch_size, "progress": False}
    kwargs["seed"] = args.seed + first_image
    if aspect != "1:1":
        if not getattr(pipe.config, "buckets", None):
            raise ValueError(
                f"--aspect {aspect}: this export was trained on square images only (its "
                "config.json lists no buckets); use --aspect 1:1, or train with aspect-ratio "
                "buckets (docs/model.md)"
            )
        kwargs.pop("resolution", None)
        kwargs["size"] = args.wide_size or aspect
    return kwargs


def _shapes(args: argparse.Namespace) -> int:

    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline
    from megatron_ts.sampling.png import save_png

    prompts = _prompt_set(args)
    try:
        pipe = TokenShufflePipeline.from_pretrained(args.model, device=args.device, dtype="float32")
        calls = []  # every call's arguments first: a refused size fails before any image
        for aspect in ASPECTS:
            chosen = [p.text for p in prompts if p.aspect == aspect]
            if chosen:
                first = sum(len(c) for _, c, _ in calls)
                calls.append((aspect, chosen, generation_kwargs(args, aspect, pipe, first)))
        start = time.perf_counter()
        images, settings = [], {}
        for aspect, chosen, kwargs in calls:
            result = pipe(chosen, **kwargs)
            images += [(image, result.settings) for image in result.images]
            settings[aspect] = result.settings
    except ValueError as err:  # ModelDirError and bad settings
        print(f"ts-eval: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, ((image, image_settings), prompt) in enumerate(zip(images, prompts)):
        name = f"images/{i:03d}.png"
        save_png(image, out / name, prompt.text, image_settings)
        names.append(name)
    rows = score_images(prompts, [image for image, _ in images], names)
    meta = {
        "model": str(Path(args.model).resolve()),
        # one aspect: its settings as before; several: {aspect: settings}
        "settings": next(iter(settings.values())) if len(settings) == 1 else settings,
        "generate_s": seconds,
    }
    json_path, html_path = write_report(out, rows, meta)
    print(json.dumps(summarise(rows), indent=2))
    print(f"report: {json_path}\npage:   {html_path}\nimages: {out / 'images'}")
    return 0


def _ground_truth(data: Path, limit: int):
    """(image, objects) pairs from make-demo shards."""
    from PIL import Image

    shards = sorted(data.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{data} holds no .tar shards; make them with ts-data make-demo")
    n = 0
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key in sorted(members):
            m = members[key]
            image_ext = next((e for e in ("png", "jpg", "webp") if e in m), None)
            if image_ext is None or "json" not in m:
                continue
            yield Image.open(io.BytesIO(m[image_ext])), json.loads(m["json"])["objects"]
            n += 1
            if n >= limit:
                return


def _vq_round_trip(vq_format: str, checkpoint: str, resolution: int | None):
    """A function image -> the image after VQ encode and decode at `resolution`."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_ts.hf.vq_token_shuffle import load_vq

    vq = load_vq(vq_format, checkpoint, device="cpu")

    @torch.no_grad()
    def round_trip(image):
        image = image.convert("RGB")
        w, h = image.size
        size = (resolution * w // h, resolution) if resolution else (w, h)  # (W, H), aspect kept
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        y = vq.decode(vq.encode(x))[0].permute(1, 2, 0)
        return Image.fromarray(((y + 1) * 127.5).round().clamp(0, 255).byte().numpy())

    return round_trip


def _aspect(width: int, height: int) -> str:
    """The image's aspect as ts-eval groups it: "2:1" when wide (positions_for), else "1:1"."""
    return "2:1" if positions_for(width, height) is WIDE_POSITIONS else "1:1"


def _analyse(args: argparse.Namespace) -> int:
    totals: dict[str, dict[str, float]] = {}  # aspect -> attribute -> sum, and "n"
    prepare = (
        _vq_round_trip(args.vq_format, args.vq_checkpoint, args.resolution)
        if args.vq_checkpoint
        else (lambda image: image)
    )
    for image, objects in _ground_truth(Path(args.data), args.limit):
        s = score(objects, analyse(prepare(image)))
        group = totals.setdefault(_aspect(*image.size), dict.fromkeys([*ATTRS, "n"], 0.0))
        for a in ATTRS:
            group[a] += s[a]
        group["n"] += 1

    def means(groups: list[dict]) -> dict:
        n = int(sum(g["n"] for g in groups))
        return {a: sum(g[a] for g in groups) / max(n, 1) for a in ATTRS} | {"n": n}

    by_aspect = {a: means([totals[a]]) for a in ASPECTS if a in totals}
    print(json.dumps(means(list(totals.values())) | {"by_aspect": by_aspect}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ts-eval; known failures end with one line and the code of megatron_ts.errors."""
    from megatron_ts.errors import run_cli

    return run_cli("ts-eval", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _shapes(args) if args.command == "shapes" else _analyse(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ts-eval: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
