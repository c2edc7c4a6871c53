"""The bundled synthetic dataset: coloured shapes on plain backgrounds with captions.

Each image holds one or two objects (a shape in a colour at a named position) on a grey
background; the caption states them ("a red circle in the top left"). With `wide_fraction` > 0
that share of the images is 2:1 (twice as wide as high) and uses the wide grammar
(`WIDE_POSITIONS`: "a red circle on the left and a blue square on the right"). The attribute labels go into
`KEY.json` so that generated images can be scored by a pixel analyser later. Images are written
in the img2dataset layout (`NNNNN.tar` with `KEY.png`, `KEY.txt`, `KEY.json`), deterministically
per (seed, sample index).

The grammar (COLORS, SHAPES, POSITIONS, WIDE_POSITIONS, PREPOSITIONS, BACKGROUNDS, `caption`,
`ATTRIBUTES`) is module-level data
so evaluation code can build prompts and score images. `HELD_OUT` colour-shape combinations are
left out of the training split by default to measure compositional generalisation.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
"""Object colours (RGB), far apart so a nearest-colour pixel analyser tells them apart."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "dark gray": (70, 70, 70),
    "light gray": (185, 185, 185),
}
"""Background colours; neutral, so they never match an object colour."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Object shapes."""

POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
"""Named positions: object centre as a fraction of (width, height)."""

WIDE_POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
}
"""Named positions of 2:1 images, as fractions of (width, height). Objects are sized by the
height, so neighbours are half a height apart and 0.18 of the height clear of each other."""

WIDE_ASPECT = 1.5
"""Images with width / height at least this use WIDE_POSITIONS (`positions_for`)."""

PREPOSITIONS: dict[str, str] = {"left": "on", "right": "on"}
"""The word before 'the <position>' where it is not 'in' ("on the left", "in the center")."""

OBJECT_SIZE = 0.16
"""Object half-extent as a fraction of the image height (the side of a square image). Objects at a corner and the centre can
touch: two squares there overlap by 0.02 of the side (36 pixels of 4900 at 256 px)."""

HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("green", "cross"),
)
"""Colour-shape combinations excluded from the training split by default."""

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
"""Attributes of every object in KEY.json's `objects` list (plus `background` per image)."""


@dataclass(frozen=True)
class DemoObject:
    color: str
    shape: str
    position: str

    def to_dict(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "position": self.position}


def positions_for(width: int, height: int) -> dict[str, tuple[float, float]]:
    """The position grammar of a width x height image: WIDE_POSITIONS when it is at least
    WIDE_ASPECT times as wide as high, else POSITIONS."""
    return WIDE_POSITIONS if width >= WIDE_ASPECT * height else POSITIONS


def object_phrase(obj: DemoObject) -> str:
    """'a red circle in the top left' (or '... in the center', '... on the left')."""
    return f"a {obj.color} {obj.shape} {PREPOSITIONS.get(obj.position, 'in')} the {obj.position}"


def caption(objects: list[DemoObject], background: str | None = None) -> str:
    """The caption stating the objects (and the background when given).

    Args:
        objects: one or two objects.
        background: background name to mention, or None.
    """
    text = " and ".join(object_phrase(o) for o in objects)
    if background is not None:
        text += f" on a {background} background"
    return text


def parse_holdout(spec: str | None) -> tuple[tuple[str, str], ...]:
    """Parses `--holdout`: 'default', 'none' or 'red triangle,blue circle'.

    Raises:
        ValueError: naming an unknown colour or shape.
    """
    if spec is None or spec == "default":
        return HELD_OUT
    if spec.strip() in ("", "none"):
        return ()
    out = []
    for item in spec.split(","):
        words = item.strip().split()
        if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
            raise ValueError(
                f"--holdout item {item.strip()!r} is not '<colour> <shape>' with a colour in "
                f"{list(COLORS)} and a shape in {list(SHAPES)}"
            )
        out.append((words[0], words[1]))
    return tuple(out)


def sample_attributes(
    rng: np.random.Generator,
    holdout: tuple[tuple[str, str], ...] = HELD_OUT,
    two_object_prob: float = 0.3,
    only_holdout: bool = False,
    positions: dict[str, tuple[float, float]] = POSITIONS,
) -> tuple[list[DemoObject], str]:
    """Draws the objects and background of one image.

    Args:
        rng: the sample's random generator.
        holdout: colour-shape pairs never drawn (or the only ones drawn with only_holdout).
        two_object_prob: probability of a second object.
        only_holdout: draw only held-out pairs (an evaluation split).
        positions: the position grammar (POSITIONS, or WIDE_POSITIONS for a 2:1 image).
    """
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if only_holdout:
        if not holdout:
            raise ValueError("--only-holdout needs a non-empty --holdout list")
        pairs = list(holdout)
    else:
        pairs = [p for p in pairs if p not in set(holdout)]
    n = 2 if rng.random() < two_object_prob else 1
    positions = list(positions)
    chosen_pos = rng.choice(len(positions), size=n, replace=False)
    objects = []
    for k in range(n):
        color, shape = pairs[int(rng.integers(len(pairs)))]
        objects.append(DemoObject(color, shape, positions[int(chosen_pos[k])]))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return objects, background


def render(
    objects: list[DemoObject], background: str, resolution: int, width: int | None = None
) -> Image.Image:
    """Draws the objects on the background (2x supersampled, then downscaled: soft edges).

    Args:
        objects: the objects, with positions of the image's grammar (`positions_for`).
        background: a BACKGROUNDS name.
        resolution: image height in pixels (and width, unless given).
        width: image width in pixels; 2 x resolution draws a 2:1 image in WIDE_POSITIONS.
    """
    ss = 2
    width = resolution if width is None else width
    w, h = width * ss, resolution * ss
    positions = positions_for(width, resolution)
    img = Image.new("RGB", (w, h), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    r = OBJECT_SIZE * h  # by the height: an object of a 2:1 image looks like one of a square
    for obj in objects:
        if obj.position not in positions:
            raise ValueError(
                f"position {obj.position!r} is not one of a {width}x{resolution} image's "
                f"{list(positions)}; use those (WIDE_POSITIONS for 2:1, POSITIONS otherwise)"
            )
        fx, fy = positions[obj.position]
        cx, cy = fx * w, fy * h
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif obj.shape == "cross":
            t = r * 0.35
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    return img.resize((width, resolution), Image.Resampling.BOX)


def make_sample(
    index: int,
    seed: int,
    resolution: int,
    holdout: tuple[tuple[str, str], ...] = HELD_OUT,
    two_object_prob: float = 0.3,
    only_holdout: bool = False,
    wide_fraction: float = 0.0,
) -> tuple[Image.Image, str, dict]:
    """Image, caption and metadata of sample `index` (depends only on seed and index).

    Args:
        index: sample index.
        seed: dataset seed.
        resolution: image height (and the width of a square image) in pixels.
        holdout: colour-shape pairs excluded (see HELD_OUT).
        two_object_prob: probability of a second object.
        only_holdout: draw only held-out pairs.
        wide_fraction: probability that the sample is 2:1 (`is_wide`).
    """
    wide = is_wide(index, seed, wide_fraction)
    width = 2 * resolution if wide else resolution
    rng = np.random.default_rng([seed, index])
    objects, background = sample_attributes(
        rng, holdout, two_object_prob, only_holdout, positions_for(width, resolution)
    )
    text = caption(objects)
    meta = {
        "caption": text,
        "objects": [o.to_dict() for o in objects],
        "background": background,
        "width": width,
        "height": resolution,
        "status": "success",
    }
    return render(objects, background, resolution, width), text, meta


_WIDE_STREAM = 21  # a stream of its own: the square samples' draws stay as they were


def is_wide(index: int, seed: int, wide_fraction: float) -> bool:
    """Whether sample `index` is 2:1: a draw from its own (seed, index) stream below
    `wide_fraction`, so a larger fraction keeps every wide sample of a smaller one.

    Raises:
        ValueError: when wide_fraction is outside [0, 1].
    """
    if not 0.0 <= wide_fraction <= 1.0:
        raise ValueError(f"--wide-fraction {wide_fraction}: use a share in [0, 1]")
    if wide_fraction == 0.0:
        return False
    return bool(np.random.default_rng([seed, index, _WIDE_STREAM]).random() < wide_fraction)


def _encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def make_demo(
    out: str | Path,
    num: int,
    resolution: int = 64,
    seed: int = 0,
    per_shard: int = 1000,
    holdout: tuple[tuple[str, str], ...] = HELD_OUT,
    two_object_prob: float = 0.3,
    only_holdout: bool = False,
    image_format: str = "png",
    wide_fraction: float = 0.0,
) -> list[Path]:
    """Writes the demo dataset in img2dataset layout.

    Args:
        out: output directory (created).
        num: number of samples.
        resolution: image side in pixels (the height of a 2:1 image).
        seed: dataset seed; the same seed gives byte-identical shards.
        per_shard: samples per tar shard.
        holdout: colour-shape pairs excluded (see HELD_OUT).
        two_object_prob: fraction of images with two objects.
        only_holdout: write only held-out combinations (an evaluation split).
        image_format: png, jpg or webp.
        wide_fraction: share of 2:1 images (width 2 x resolution), drawn per (seed, index); 0
            writes the same bytes as before wide images existed.

    Returns:
        The shard paths.
    """
    if image_format not in ("png", "jpg", "webp"):
        raise ValueError(f"--image-format {image_format!r}: use png, jpg or webp")
    is_wide(0, seed, wide_fraction)  # checks the fraction before any file is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((num + per_shard - 1) // per_shard):
        path = out / f"{shard:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for index in range(shard * per_shard, min(num, (shard + 1) * per_shard)):
                img, text, meta = make_sample(
                    index, seed, resolution, holdout, two_object_prob, only_holdout, wide_fraction
                )
                key = f"{index:09d}"
                meta["key"] = key
                _add(tar, f"{key}.{image_format}", _encode_image(img, image_format))
                _add(tar, f"{key}.txt", text.encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        tmp.replace(path)
        paths.append(path)
    return paths
