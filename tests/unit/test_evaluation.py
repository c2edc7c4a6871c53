"""The demo-grammar analyser and ts-eval's prompt set, scoring and report."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from data_tools.demo import (
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    DemoObject,
    caption,
    make_demo,
    make_sample,
    render,
)
from megatron_ts.evaluation.analyser import analyse, score
from megatron_ts.evaluation.cli import main as ts_eval
from megatron_ts.evaluation.shapes import (
    default_prompts,
    parse_caption,
    read_prompts,
    score_images,
    write_report,
)


@pytest.mark.parametrize("resolution", [64, 128])
def test_analyser_scores_ground_truth_near_100_percent(resolution):
    totals = dict.fromkeys(("color", "shape", "position", "count", "all"), 0.0)
    n = 200
    for i in range(n):
        image, _, meta = make_sample(i, seed=3, resolution=resolution)
        s = score(meta["objects"], analyse(image))
        for k in totals:
            totals[k] += s[k] / n
    assert totals["color"] >= 0.99
    assert totals["position"] >= 0.99
    assert totals["shape"] >= 0.97
    assert totals["all"] >= 0.97


def test_every_colour_shape_and_position_is_recognised_alone():
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                obj = DemoObject(color, shape, position)
                found = analyse(render([obj], "gray", 64))
                assert [(d.color, d.shape, d.position) for d in found] == [(color, shape, position)]


def test_squares_with_rounded_corners_stay_squares():
    """An 8x VQ rounds a square's corners off; it is still not a circle (nor a circle a square)."""
    from PIL import ImageDraw

    def drawn(radius: int | None) -> str:
        img = Image.new("RGB", (128, 128), (128, 128, 128))
        box = [46, 46, 81, 81]  # a 36 px object, the demo's square at 128 px
        draw = ImageDraw.Draw(img)
        if radius is None:
            draw.ellipse(box, fill=COLORS["red"])
        else:
            draw.rounded_rectangle(box, radius=radius, fill=COLORS["red"])
        (found,) = analyse(img)
        return found.shape, found.corners, found.fill

    for radius in (0, 5, 8):  # corner coverage 1.0, 0.91, 0.75
        shape, corners, _ = drawn(radius)
        assert shape == "square" and corners > 0.6, (radius, corners)
    shape, corners, fill = drawn(None)
    assert shape == "circle" and corners < 0.1 and 0.7 < fill < 0.85


def test_scoring_rules():
    want = [{"color": "red", "shape": "circle", "position": "top left"}]
    right = analyse(render([DemoObject("red", "circle", "top left")], "gray", 64))
    assert score(want, right) == {
        "color": 1.0,
        "shape": 1.0,
        "position": 1.0,
        "count": 1.0,
        "all": 1.0,
    }
    moved = analyse(render([DemoObject("red", "circle", "center")], "gray", 64))
    assert score(want, moved) == {
        "color": 1.0,
        "shape": 1.0,
        "position": 0.0,
        "count": 1.0,
        "all": 0.0,
    }
    wrong = analyse(render([DemoObject("blue", "square", "top left")], "gray", 64))
    assert score(want, wrong) == {
        "color": 0.0,
        "shape": 0.0,
        "position": 1.0,
        "count": 1.0,
        "all": 0.0,
    }
    empty = analyse(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert empty == [] and score(want, empty)["all"] == 0.0


def test_prompt_set_and_caption_parsing(tmp_path):
    prompts = default_prompts()
    held = [p for p in prompts if p.split == "held_out"]
    assert len(held) == len(POSITIONS) * len(HELD_OUT)
    singles = {p.objects for p in prompts if p.split == "seen" and len(p.objects) == 1}
    pairs = [p for p in prompts if len(p.objects) == 2]
    n_seen = len(COLORS) * len(SHAPES) - len(HELD_OUT)
    assert len(singles) == n_seen * len(POSITIONS) and len(pairs) == n_seen
    assert len(prompts) == len(singles) + len(pairs) + len(held)
    for p in pairs:
        a, b = p.objects
        assert a.color != b.color and a.position != b.position, p.text
    assert {(o.color, o.shape) for p in held for o in p.objects} == set(HELD_OUT)
    seen_pairs = {(o.color, o.shape) for p in prompts if p.split == "seen" for o in p.objects}
    assert not seen_pairs & set(HELD_OUT)
    assert len(seen_pairs) == len(COLORS) * len(SHAPES) - len(HELD_OUT)
    for p in prompts:
        assert parse_caption(p.text) == p.objects
        assert caption(list(p.objects)) == p.text
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na red triangle in the center\n\na green square in the top left\n")
    got = read_prompts(path)
    assert [p.split for p in got] == ["held_out", "seen"]
    path.write_text("a pink elephant in the sky\n")
    with pytest.raises(ValueError, match="prompts.txt:1"):
        read_prompts(path)


def test_report_files(tmp_path):
    prompts = default_prompts()[:3]
    images = [render(list(p.objects), "gray", 64) for p in prompts]
    for i, im in enumerate(images):
        (tmp_path / "images").mkdir(exist_ok=True)
        im.save(tmp_path / f"images/{i}.png")
    rows = score_images(prompts, images, [f"images/{i}.png" for i in range(3)])
    json_path, html_path = write_report(tmp_path, rows, {"model": "ground truth"})
    report = json.loads(json_path.read_text())
    assert report["summary"]["seen"]["all"] == 1.0 and report["summary"]["seen"]["n"] == 3
    page = html_path.read_text()
    assert page.count('<img src="images/') == 3 and "ground truth" in page


def test_ts_eval_analyse_on_make_demo_shards(tmp_path, capsys):
    make_demo(tmp_path / "demo", num=60, resolution=64, seed=1, per_shard=30)
    assert ts_eval(["analyse", "--data", str(tmp_path / "demo")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 60 and result["all"] >= 0.95
    assert ts_eval(["analyse", "--data", str(tmp_path / "nowhere")]) == 2
