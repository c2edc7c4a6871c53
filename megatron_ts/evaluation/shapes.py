"""`ts-eval shapes`: generate images for demo-grammar prompts and score them with the analyser.

The default prompt set covers every seen colour-shape pair at every position (single objects),
one two-object prompt per seen pair, and every held-out pair (data_tools.demo.HELD_OUT) at every
position; held-out prompts are reported separately as compositional generalisation.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from data_tools.demo import COLORS, HELD_OUT, POSITIONS, SHAPES, DemoObject, caption
from megatron_ts.evaluation.analyser import analyse, score

ATTRS = ("color", "shape", "position", "count", "all")


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    objects: tuple[DemoObject, ...]
    split: str  # "seen" or "held_out"


_PHRASE = re.compile(
    r"an? (?P<color>\w+) (?P<shape>\w+) in the (?P<position>top left|top right|bottom left|bottom right|center)"
)


def parse_caption(text: str) -> tuple[DemoObject, ...]:
    """Objects stated by a demo-grammar caption ('a red circle in the top left and ...').

    Raises:
        ValueError: naming the part that is not in the grammar.
    """
    objects = []
    for part in text.strip().split(" and "):
        part = part.split(" on a ")[0].strip()
        m = _PHRASE.fullmatch(part)
        if not m or m["color"] not in COLORS or m["shape"] not in SHAPES:
            raise ValueError(
                f"{part!r} is not 'a <colour> <shape> in the <position>' with colours "
                f"{list(COLORS)}, shapes {list(SHAPES)}, positions {list(POSITIONS)}"
            )
        objects.append(DemoObject(m["color"], m["shape"], m["position"]))
    return tuple(objects)


def default_prompts(held_out: tuple[tuple[str, str], ...] = HELD_OUT) -> list[EvalPrompt]:
    """The default evaluation set (deterministic; 188 prompts with the default held-out pairs).

    Every seen colour-shape pair at every position as a single object (140), one two-object
    prompt per seen pair, with a second object of another colour (28: a corner object with the
    centre or the next corner), and every held-out pair at every position (20, split held_out).
    """
    positions = list(POSITIONS)
    held = set(held_out)
    seen_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    n = len(seen_pairs)
    prompts = []
    for color, shape in seen_pairs:
        for pos in positions:
            obj = DemoObject(color, shape, pos)
            prompts.append(EvalPrompt(caption([obj]), (obj,), "seen"))
    for i, (color, shape) in enumerate(seen_pairs):
        order = [(11 * i + 5) % n, (11 * i + 9) % n, *range(n)]
        other = next((seen_pairs[j] for j in order if seen_pairs[j][0] != color), seen_pairs[0])
        pa = positions[i % 4]
        pb = positions[4] if i % 2 == 0 else positions[(i + 1) % 4]
        objs = (DemoObject(color, shape, pa), DemoObject(other[0], other[1], pb))
        prompts.append(EvalPrompt(caption(list(objs)), objs, "seen"))
    for color, shape in held_out:
        for pos in positions:
            obj = DemoObject(color, shape, pos)
            prompts.append(EvalPrompt(caption([obj]), (obj,), "held_out"))
    return prompts


def read_prompts(
    path: str | Path, held_out: tuple[tuple[str, str], ...] = HELD_OUT
) -> list[EvalPrompt]:
    """Prompts from a file: one caption per line in the demo grammar (blank lines and # skip).

    A prompt whose colour-shape pairs include a held-out pair is reported as held_out.
    """
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            objects = parse_caption(line)
        except ValueError as err:
            raise ValueError(f"{path}:{n}: {err}") from None
        split = "held_out" if any((o.color, o.shape) in set(held_out) for o in objects) else "seen"
        out.append(EvalPrompt(line, objects, split))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean of every attribute per split, with counts."""
    summary = {}
    for split in ("seen", "held_out"):
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            summary[split] = {a: sum(r["score"][a] for r in chosen) / len(chosen) for a in ATTRS}
            summary[split]["n"] = len(chosen)
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
    cells = []
    for split, values in summary.items():
        cells.append(
            f"<tr><th>{split}</th>"
            + "".join(f"<td>{values[a]:.1%}</td>" for a in ATTRS)
            + f"<td>{values['n']}</td></tr>"
        )
    table = (
        "<table><tr><th>split</th>"
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
            f"<p><b>{html.escape(r['prompt'])}</b> ({r['split']})</p>"
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
