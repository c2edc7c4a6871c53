"""A deterministic pixel analyser for images in the demo grammar (data_tools/demo.py).

No model is involved: the background is the median of the image border, foreground pixels are
those far from it, connected components are the objects, and each object is described by

- colour: the nearest demo colour to the component's median pixel;
- position: the nearest named position to its centroid, in the image's grammar: WIDE_POSITIONS
  ("left", "center", "right") when it is at least 1.5 times as wide as high, else POSITIONS
  (`data_tools.demo.positions_for`);
- shape: from three scale-free measures of its mask: the ratio of mass in the upper and lower
  halves of its bounding box (a triangle pointing up has ~1/3, the symmetric shapes ~1); the
  corner coverage, the share of the box's four corner regions (outside the ellipse inscribed in
  the box) that the mask covers (square ~1, circle and cross ~0; a square with corners rounded to
  a quarter of its side still ~0.75); and the fill of the box (circle ~0.79, cross ~0.58).

It must score ground-truth demo images near 100% (tests/unit/test_evaluation.py checks it);
generated images are fuzzier, and the thresholds sit between the shapes' ideal values. An earlier
version told squares from circles by fill > 0.9 alone; that read squares with softened corners
(fill 0.83-0.89, clearly square to the eye) as circles, on VQ reconstructions of ground truth as
much as on samples (docs/demo.md has both versions' numbers).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from data_tools.demo import COLORS, OBJECT_SIZE, POSITIONS, positions_for

# A pixel is foreground when its RGB distance to the background exceeds this.
FOREGROUND_DISTANCE = 40.0
# Components smaller than this fraction of a full object's area are noise.
MIN_OBJECT_FRACTION = 0.2


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    position: str
    area: int
    fill: float
    top_bottom: float
    corners: float

    def to_dict(self) -> dict:
        return {
            "color": self.color,
            "shape": self.shape,
            "position": self.position,
            "area": self.area,
            "fill": round(self.fill, 3),
            "top_bottom": round(self.top_bottom, 3),
            "corners": round(self.corners, 3),
        }


def _components(labels: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of equal label >= 0, as arrays of (y, x) pixel coordinates.

    Labels are palette colours, so two touching objects of different colours stay apart.
    """
    h, w = labels.shape
    mask = labels >= 0
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        pixels = []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if (
                    0 <= ny < h
                    and 0 <= nx < w
                    and labels[ny, nx] == labels[y, x]
                    and not seen[ny, nx]
                ):
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def classify_shape(fill: float, top_bottom: float, corners: float) -> str:
    """Shape from the upper/lower mass ratio, corner coverage and bounding-box fill (see the
    module docstring)."""
    if top_bottom < 0.6:
        return "triangle"
    if corners >= 0.5:
        return "square"
    if fill > 0.68:
        return "circle"
    return "cross"


def corner_coverage(ys: np.ndarray, xs: np.ndarray) -> float:
    """Share of the bounding box's pixels outside its inscribed ellipse that the mask covers."""
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    gy, gx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    ry, rx = (y1 - y0 + 1) / 2.0, (x1 - x0 + 1) / 2.0
    outside = ((gx - (x0 + x1) / 2.0) / rx) ** 2 + ((gy - (y0 + y1) / 2.0) / ry) ** 2 > 1
    mask = np.zeros_like(outside)
    mask[ys - y0, xs - x0] = True
    return float((mask & outside).sum() / max(int(outside.sum()), 1))


_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def nearest_position(
    cx: float, cy: float, positions: dict[str, tuple[float, float]] = POSITIONS
) -> str:
    """The name in `positions` nearest to (cx, cy), fractions of (width, height)."""
    names = list(positions)
    centres = np.array([positions[n] for n in names])
    return names[int(np.argmin(((centres - (cx, cy)) ** 2).sum(axis=1)))]


def analyse(image) -> list[DetectedObject]:
    """Objects in a demo-style image, largest first.

    Positions are named in the image's grammar: WIDE_POSITIONS for a 2:1 image (width at least
    1.5 x height), POSITIONS otherwise.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array.
    """
    pixels = np.asarray(
        image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32
    )
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.sqrt(((pixels - background) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE
    # each foreground pixel labelled with its nearest palette colour, background -1
    dist = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(axis=3)  # (H, W, colours)
    labels = np.where(mask, dist.argmin(axis=2), -1)
    positions = positions_for(w, h)
    side = 2 * OBJECT_SIZE * min(h, w)  # objects are sized by the short side (the height)
    full_area = side * side
    objects = []
    for comp in _components(labels):
        if len(comp) < MIN_OBJECT_FRACTION * full_area:
            continue
        ys, xs = comp[:, 0], comp[:, 1]
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        box_area = (y1 - y0 + 1) * (x1 - x0 + 1)
        mid = (y0 + y1) / 2.0
        top = float((ys < mid).sum())
        bottom = float((ys > mid).sum())
        fill = len(comp) / box_area
        top_bottom = top / max(bottom, 1.0)
        color = nearest_color(np.median(pixels[ys, xs], axis=0))
        position = nearest_position(xs.mean() / w, ys.mean() / h, positions)
        corners = corner_coverage(ys, xs)
        shape = classify_shape(fill, top_bottom, corners)
        objects.append(DetectedObject(color, shape, position, len(comp), fill, top_bottom, corners))
    return sorted(objects, key=lambda o: -o.area)


def score(expected: list[dict], detected: list[DetectedObject]) -> dict:
    """Per-attribute correctness of one image against the objects its prompt asked for.

    For every expected object the analyser looks for a detected object at the expected position;
    position is right when there is one. Colour and shape are judged on that object, or, when
    none is there, on the detected object of the expected colour (else the largest), so a right
    object in the wrong place still scores its colour and shape. Count is right when the number
    of detected objects equals the number asked for.

    Returns:
        {"color": fraction, "shape": fraction, "position": fraction, "count": 0/1,
         "all": 0/1 (every attribute of every object right, and the count)}.
    """
    hits = {"color": 0, "shape": 0, "position": 0}
    for want in expected:
        at_position = [d for d in detected if d.position == want["position"]]
        if at_position:
            hits["position"] += 1
            match = at_position[0]
        else:
            same_color = [d for d in detected if d.color == want["color"]]
            match = (same_color or detected or [None])[0]
        if match is not None:
            hits["color"] += match.color == want["color"]
            hits["shape"] += match.shape == want["shape"]
    n = max(len(expected), 1)
    out = {k: v / n for k, v in hits.items()}
    out["count"] = float(len(detected) == len(expected))
    out["all"] = float(all(v == 1.0 for v in out.values()))
    return out
