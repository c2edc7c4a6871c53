"""Aspect-ratio buckets: the image shapes a stage trains on, at about the stage's pixel count.

A bucket is named by its ratio "W:H" (width first, as screens are: "16:9" is landscape, "9:16"
portrait). At a stage of `resolution` R the pixel budget is R^2; a bucket's size is W x H pixels
with both sides multiples of `unit` = downsample x grid_multiple, so the code grid
(H / downsample, W / downsample) has sides divisible by `grid_multiple` and every shuffle window
dividing it tiles the grid. Sides are whole units: of the short sides near sqrt(R^2 / ratio) and
the long sides rounded either way from short x ratio, the pair with the least |log ratio error| +
|log area error| wins. A portrait bucket is the transpose of its landscape twin.

`ts-data tokenize --buckets` resizes each image to the nearest bucket by ratio (`nearest`) and
crops only the sliver the ratio needs; the manifest records the buckets it used and the stage
config recomputes them with the same function, so a mismatch is caught before training.

This module imports neither torch nor numpy, so `megatron_ts.config` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SQUARE = "1:1"
DEFAULT_GRID_MULTIPLE = 4
"""Code-grid sides are multiples of this: shuffle windows 1, 2 and 4 tile every bucket."""


@dataclass(frozen=True)
class Bucket:
    """One image shape: its ratio name and its size in pixels."""

    name: str
    """Ratio "W:H" as configured, for example "16:9"."""
    width: int
    """Pixels across."""
    height: int
    """Pixels down."""

    def grid(self, downsample: int) -> tuple[int, int]:
        """(rows, columns) of VQ codes: (height / downsample, width / downsample)."""
        return self.height // downsample, self.width // downsample

    @property
    def size(self) -> str:
        """ "WxH", the form `ts-generate --size` takes."""
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict:
        return {"name": self.name, "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, data: dict) -> Bucket:
        return cls(str(data["name"]), int(data["width"]), int(data["height"]))


def parse_ratio(text: str) -> tuple[int, int]:
    """ "W:H" -> (W, H), both positive integers.

    Raises:
        ValueError: naming the text and the form expected.
    """
    parts = str(text).strip().split(":")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        w = h = 0
    if len(parts) != 2 or w < 1 or h < 1:
        raise ValueError(f"aspect-ratio bucket {text!r} is not of the form W:H (for example 16:9)")
    return w, h


def bucket_size(ratio: str, resolution: int, unit: int) -> Bucket:
    """The bucket of `ratio` at a pixel budget of `resolution`^2, sides in multiples of `unit`.

    Args:
        ratio: "W:H".
        resolution: the stage's square side in pixels (the budget is its square).
        unit: pixels per step of a side (downsample x grid multiple).

    Raises:
        ValueError: a malformed ratio, or a unit or resolution below 1.
    """
    if unit < 1 or resolution < 1:
        raise ValueError(f"bucket unit {unit} and resolution {resolution} must be at least 1")
    w, h = parse_ratio(ratio)
    long = max(w, h) / min(w, h)  # the landscape ratio; a portrait bucket is its transpose
    budget = resolution * resolution
    exact = math.sqrt(budget / long) / unit  # short side in units at exactly the budget
    best = None
    for rows in range(max(1, math.floor(exact) - 1), math.ceil(exact) + 2):
        for cols in {max(1, math.floor(rows * long)), max(1, math.ceil(rows * long))}:
            ratio_error = abs(math.log(cols / rows / long))
            area_error = abs(math.log(rows * cols * unit * unit / budget))
            score = (round(ratio_error + area_error, 9), round(ratio_error, 9), rows)
            if best is None or score < best[0]:
                best = (score, rows, cols)
    _, short_units, long_units = best
    if w >= h:
        return Bucket(ratio.strip(), long_units * unit, short_units * unit)
    return Bucket(ratio.strip(), short_units * unit, long_units * unit)


def make_buckets(ratios: Iterable[str], resolution: int, unit: int) -> tuple[Bucket, ...]:
    """The buckets of `ratios` at `resolution`, in the order given.

    Raises:
        ValueError: a malformed ratio, a ratio listed twice, or two ratios that give one size.
    """
    out: list[Bucket] = []
    for ratio in ratios:
        bucket = bucket_size(ratio, resolution, unit)
        for other in out:
            if parse_ratio(other.name) == parse_ratio(bucket.name):
                raise ValueError(f"aspect-ratio bucket {bucket.name} is listed twice")
            if other.size == bucket.size:
                raise ValueError(
                    f"aspect-ratio buckets {other.name} and {bucket.name} are both {bucket.size} "
                    f"pixels at resolution {resolution}; drop one of them"
                )
        out.append(bucket)
    if not out:
        raise ValueError("an empty list of aspect-ratio buckets; list at least one, such as 1:1")
    return tuple(out)


def nearest(buckets: Sequence[Bucket], width: int, height: int) -> Bucket:
    """The bucket whose ratio is closest to width / height on a log scale (ties: the first)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.width / b.height) - ratio))


def find(buckets: Sequence[Bucket], size: str) -> Bucket:
    """The bucket of a "WxH" size or a "W:H" ratio name.

    Raises:
        ValueError: no bucket has that size or name; the message lists the ones there are.
    """
    text = size.strip().lower()
    for bucket in buckets:
        if text in (bucket.size, bucket.name):
            return bucket
    listed = ", ".join(f"{b.size} ({b.name})" for b in buckets)
    raise ValueError(f"size {size!r} is not one this model trained on; use one of: {listed}")
