"""`ts-eval shapes`: generate images for demo-grammar prompts and score them with the analyser.

The default prompt set covers every seen colour-shape pair at every position (single objects),
one two-object prompt per seen pair, and every held-out pair (data_tools.demo.HELD_OUT) at every
position; held-out prompts are reported separately as compositional generalisation.

`default_prompts(aspect="2:1")` is the same set in the wide grammar (data_tools.demo.
WIDE_POSITIONS: "a red circle on the left"), to be generated as 2:1 images. Every prompt carries
its aspect ("1:1" or "2:1"); the summary groups the scores by aspect and split.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from data_tools.demo import (
    COLORS,
    HELD_OUT,
    POSITIONS,
    PREPOSITIONS,
    SHAPES,
    WIDE_POSITIONS,
    DemoObject,
    caption,
)
from megatron_ts.evaluation.analyser import analyse, score

ATTRS = ("color", "shape", "position", "count", "all")

ASPECTS: tuple[str, ...] = ("1:1", "2:1")
"""Image shapes ts-eval asks for, as aspect-ratio bucket names (megatron_ts.buckets)."""

GRAMMARS: dict[str, dict[str, tuple[float, float]]] = {"1:1": POSITIONS, "2:1": WIDE_POSITIONS}
"""The position grammar of each aspect's prompts and images (what the analyser names)."""

SPLITS = ("seen", "held_out")


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    objects: tuple[DemoObject, ...]
    split: str  # "seen" or "held_out"
    aspect: str = "1:1"  # one of ASPECTS: the image shape to generate


_PHRASE = re.compile(
    r"an? (?P<color>\w+) (?P<shape>\w+) (?P<prep>in|on) the (?P<position>[a-z]+(?: [a-z]+)?)"
)


def parse_caption(text: str, aspect: str = "1:1") -> tuple[DemoObject, ...]:
    """Objects stated by a demo-grammar caption ('a red circle in the top left and ...'; with
    aspect "2:1" the wide grammar: 'a red circle on the left and a blue square in the center').

    Raises:
        ValueError: naming the part that is not in the aspect's grammar.
    """
    positions = GRAMMARS[aspect]
    objects = []
    for part in text.strip().split(" and "):
        part = part.split(" on a ")[0].strip()
        m = _PHRASE.fullmatch(part)
        if (
            not m
            or m["color"] not in COLORS
            or m["shape"] not in SHAPES
            or m["position"] not in positions
            or m["prep"] != PREPOSITIONS.get(m["position"], "in")
        ):
            other = "2:1" if aspect == "1:1" else "1:1"
            hint = (
                f" ('{m['position']}' is a {other} position: pass --aspect {other})"
                if m and m["position"] in GRAMMARS[other] and m["position"] not in positions
                else ""
            )
            phrases = [f"{PREPOSITIONS.get(p, 'in')} the {p}" for p in positions]
            raise ValueError(
                f"{part!r} is not 'a <colour> <shape> <position>' of a {aspect} image with "
                f"colours {list(COLORS)}, shapes {list(SHAPES)}, positions {phrases}{hint}"
            )
        objects.append(DemoObject(m["color"], m["shape"], m["position"]))
    return tuple(objects)


# the two positions of each two-object prompt, by prompt number (the square set's rule is inline)
_WIDE_PAIRS = (("left", "right"), ("right", "left"), ("left", "center"), ("center", "right"))


def default_prompts(
    held_out: tuple[tuple[str, str], ...] = HELD_OUT, aspect: str = "1:1"
) -> list[EvalPrompt]:
    """The default evaluation set (deterministic).

    Square ("1:1", 188 prompts with the default held-out pairs): every seen colour-shape pair at
    every position as a single object (140), one two-object prompt per seen pair, with a second
    object of another colour (28: a corner object with the centre or the next corner), and
    every held-out pair at every position (20, split held_out).

    Wide ("2:1", 124 prompts): the same in WIDE_POSITIONS: seen pairs at left, center and right
    (84), one two-object prompt per seen pair (28: left and right, or one of them with the
    centre), held-out pairs at the three positions (12).

    Raises:
        ValueError: for an aspect that is not one of ASPECTS.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r}: use one of {ASPECTS}")
    positions = list(GRAMMARS[aspect])
    held = set(held_out)
    seen_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    n = len(seen_pairs)
    prompts = []
    for color, shape in seen_pairs:
        for pos in positions:
            obj = DemoObject(color, shape, pos)
            prompts.append(EvalPrompt(caption([obj]), (obj,), "seen", aspect))
    for i, (color, shape) in enumerate(seen_pairs):
        order = [(11 * i + 5) % n, (11 * i + 9) % n, *range(n)]
        other = next((seen_pairs[j] for j in order if seen_pairs[j][0] != color), seen_pairs[0])
        if aspect == "1:1":
            pa = positions[i % 4]
            pb = positions[4] if i % 2 == 0 else positions[(i + 1) % 4]
        else:
            pa, pb = _WIDE_PAIRS[i % len(_WIDE_PAIRS)]
        objs = (DemoObject(color, shape, pa), DemoObject(other[0], other[1], pb))
        prompts.append(EvalPrompt(caption(list(objs)), objs, "seen", aspect))
    for color, shape in held_out:
        for pos in positions:
            obj = DemoObject(color, shape, pos)
            prompts.append(EvalPrompt(caption([obj]), (obj,), "held_out", aspect))
    return prompts


def read_prompts(
    path: str | Path, held_out: tuple[tuple[str, str], ...] = HELD_OUT, aspect: str = "1:1"
) -> list[EvalPrompt]:
    """Prompts from a file: one caption per line in the demo grammar (blank lines and # skip).

    A prompt whose colour-shape pairs include a held-out pair is reported as held_out. Every
    line is read in the grammar of `aspect` (the wide one for "2:1") and generated at it.
    """
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            objects = parse_caption(line, aspect)
        except ValueError as err:
            raise ValueError(f"{path}:{n}: {err}") from None
        split = "held_out" if any((o.color, o.shape) in set(held_out) for o in objects) else "seen"
        out.append(EvalPrompt(line, objects, split, aspect))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def _by_split(rows: list[dict]) -> dict:
    out = {}
    for split in SPLITS:
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            out[split] = {a: sum(r["score"][a] for r in chosen) / len(chosen) for a in ATTRS}
            out[split]["n"] = len(chosen)
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean of every attribute per split, with counts: over all prompts (`seen`, `held_out`)
    and per image aspect (`by_aspect`: {"1:1": {"seen": ..., "held_out": ...}, "2:1": ...}).

    Rows without an `aspect` (reports written before aspects existed) count as "1:1".
    """
    summary = _by_split(rows)
    aspects = [a for a in ASPECTS if any(r.get("aspect", "1:1") == a for r in rows)]
    summary["by_aspect"] = {
        a: _by_split([r for r in rows if r.get("aspect", "1:1") == a]) for a in aspects
    }
    return summary


def score_images(prompts: list[EvalPrompt], images, image_names: list[str]) -> list[dict]:
    rows = []
    for prompt, image, name in zip(prompts, images, image_names):
        detected = analyse(image)
        expected = [o.to_dict() for o in prompt.objects]
        rows.append(
            {
                "prompt": prompt.text,
                "split": prompt.split,
                "aspect": prompt.aspect,
                "image": name,
                "expected": expected,
                "detected": [d.to_dict() for d in detected],
                "score": score(expected, detected),
            }
        )
    return rows


def write_report(out_dir: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """Writes report.json and report.html (images linked relative to out_dir)."""
    summary = summarise(rows)
    report = {**meta, "summary": summary, "prompts": rows}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2))
    # one row per aspect and split; the all-aspect rows only when there is more than one aspect
    groups = [
        (f"{a} {split}", v) for a, d in summary["by_aspect"].items() for split, v in d.items()
    ]
    if len(summary["by_aspect"]) > 1:
        groups += [(f"all {split}", summary[split]) for split in SPLITS if split in summary]
    cells = []
    for label, values in groups:
        cells.append(
            f"<tr><th>{label}</th>"
            + "".join(f"<td>{values[a]:.1%}</td>" for a in ATTRS)
            + f"<td>{values['n']}</td></tr>"
        )
    table = (
        "<table><tr><th>aspect, split</th>"
        + "".join(f"<th>{a}</th>" for a in ATTRS)
        + "<th>prompts</th></tr>"
        + "".join(cells)
        + "</table>"
    )
    cards = []
    for r in rows:
        s = r["score"]
        ok = "ok" if s["all"] == 1.0 else "miss"
        found = (
            "; ".join(f"{d['color']} {d['shape']} @ {d['position']}" for d in r["detected"])
            or "nothing"
        )
        cards.append(
            f'<div class="card {ok}"><img src="{html.escape(r["image"])}" width="192">'
            f"<p><b>{html.escape(r['prompt'])}</b> ({r.get('aspect', '1:1')}, {r['split']})</p>"
            f"<p>colour {s['color']:.0%} shape {s['shape']:.0%} position {s['position']:.0%} "
            f"count {s['count']:.0%}</p><p>found: {html.escape(found)}</p></div>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ts-eval shapes</title>
<style>body{{font-family:sans-serif}} table td,table th{{padding:4px 10px;border:1px solid #ccc}}
.card{{display:inline-block;width:210px;margin:6px;vertical-align:top;font-size:12px}}
.ok{{background:#e8f6e8}} .miss{{background:#fbeaea}} img{{image-rendering:pixelated}}</style></head>
<body><h1>ts-eval shapes</h1><p>model: {html.escape(str(meta.get("model")))}</p>{table}
<p>settings: {html.escape(json.dumps(meta.get("settings", {})))}</p>{"".join(cards)}</body></html>"""
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return json_path, html_path
