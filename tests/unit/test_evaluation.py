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
    WIDE_POSITIONS,
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
    summarise,
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


# --- 2:1 images (issue 21): the wide grammar, its prompts and the grouped report ---


@pytest.mark.parametrize("resolution", [64, 128])
def test_analyser_scores_wide_ground_truth(resolution):
    """Measured: 300 wide samples at 64 and 128 px score 100% on every attribute."""
    totals = dict.fromkeys(("color", "shape", "position", "count", "all"), 0.0)
    n = 100
    for i in range(n):
        image, _, meta = make_sample(i, seed=3, resolution=resolution, wide_fraction=1.0)
        assert image.size == (2 * resolution, resolution)
        s = score(meta["objects"], analyse(image))
        for k in totals:
            totals[k] += s[k] / n
    assert totals["color"] >= 0.99 and totals["position"] >= 0.99
    assert totals["shape"] >= 0.98 and totals["all"] >= 0.98


def test_every_colour_shape_and_wide_position_is_recognised_alone():
    for color in COLORS:
        for shape in SHAPES:
            for position in WIDE_POSITIONS:
                obj = DemoObject(color, shape, position)
                found = analyse(render([obj], "gray", 64, width=128))
                assert [(d.color, d.shape, d.position) for d in found] == [(color, shape, position)]


def test_analyser_picks_the_grammar_by_aspect():
    left = render([DemoObject("red", "circle", "left")], "gray", 64, width=128)
    assert [d.position for d in analyse(left)] == ["left"]
    # the same pixels squeezed to 1.4:1 are read in the square grammar
    squeezed = left.resize((90, 64), Image.Resampling.BOX)
    (found,) = analyse(squeezed)
    assert found.position in POSITIONS and found.position not in WIDE_POSITIONS
    # a 2:1 object is a full-size object: the noise floor uses the height, not the area
    (found,) = analyse(left)
    assert found.area > 0.9 * (2 * 0.16 * 64) ** 2 * 0.785


def test_wide_prompt_set_and_caption_parsing(tmp_path):
    prompts = default_prompts(aspect="2:1")
    n_seen = len(COLORS) * len(SHAPES) - len(HELD_OUT)
    assert len(prompts) == n_seen * 3 + n_seen + len(HELD_OUT) * 3 == 124
    assert {p.aspect for p in prompts} == {"2:1"}
    assert {o.position for p in prompts for o in p.objects} == set(WIDE_POSITIONS)
    pairs = [p for p in prompts if len(p.objects) == 2]
    assert len(pairs) == n_seen
    for p in pairs:
        a, b = p.objects
        assert a.color != b.color and a.position != b.position, p.text
    assert {p.objects[0].position for p in pairs} >= {"left", "right"}
    for p in prompts:
        assert parse_caption(p.text, "2:1") == p.objects
        assert caption(list(p.objects)) == p.text
    assert any(" on the left and " in p.text and p.text.endswith(" on the right") for p in pairs)
    assert any(p.text.endswith(" in the center") for p in pairs)
    held = [p for p in prompts if p.split == "held_out"]
    assert {(o.color, o.shape) for p in held for o in p.objects} == set(HELD_OUT)
    with pytest.raises(ValueError, match="pass --aspect 2:1"):
        parse_caption("a red circle on the left")
    with pytest.raises(ValueError, match="pass --aspect 1:1"):
        parse_caption("a red circle in the top left", "2:1")
    with pytest.raises(ValueError, match="'on the left'"):
        parse_caption("a red circle in the left", "2:1")  # the wrong preposition
    path = tmp_path / "wide.txt"
    path.write_text("a red triangle on the right\na green square in the center\n")
    got = read_prompts(path, aspect="2:1")
    assert [(p.split, p.aspect) for p in got] == [("held_out", "2:1"), ("seen", "2:1")]
    with pytest.raises(ValueError, match="wide.txt:1"):
        read_prompts(path)


def test_report_groups_scores_by_aspect(tmp_path):
    square = default_prompts()[:2]
    wide = default_prompts(aspect="2:1")[:3]
    images = [render(list(p.objects), "gray", 64) for p in square]
    # the second wide image draws its object in the wrong place: only 2:1 position drops
    drawn = [list(p.objects) for p in wide]
    drawn[1] = [
        DemoObject(o.color, o.shape, "right" if o.position != "right" else "left") for o in drawn[1]
    ]
    images += [render(objs, "gray", 64, width=128) for objs in drawn]
    (tmp_path / "images").mkdir()
    names = [f"images/{i}.png" for i in range(5)]
    rows = score_images(square + wide, images, names)
    json_path, html_path = write_report(tmp_path, rows, {"model": "ground truth"})
    summary = json.loads(json_path.read_text())["summary"]
    by = summary["by_aspect"]
    assert set(by) == {"1:1", "2:1"}
    assert by["1:1"]["seen"]["position"] == 1.0 and by["1:1"]["seen"]["n"] == 2
    assert by["2:1"]["seen"]["position"] == pytest.approx(2 / 3) and by["2:1"]["seen"]["n"] == 3
    assert by["2:1"]["seen"]["color"] == 1.0
    assert summary["seen"]["n"] == 5 and summary["seen"]["position"] == pytest.approx(4 / 5)
    page = html_path.read_text()
    for label in ("1:1 seen", "2:1 seen", "all seen"):
        assert f"<th>{label}</th>" in page
    # a square-only report has no all-aspect rows, and old rows without "aspect" count as 1:1
    square_rows = [{k: v for k, v in r.items() if k != "aspect"} for r in rows[:2]]
    assert set(summarise(square_rows)["by_aspect"]) == {"1:1"}


def test_ts_eval_analyse_groups_wide_ground_truth(tmp_path, capsys):
    make_demo(tmp_path / "demo", num=60, resolution=64, seed=1, per_shard=30, wide_fraction=0.5)
    assert ts_eval(["analyse", "--data", str(tmp_path / "demo")]) == 0
    result = json.loads(capsys.readouterr().out)
    by = result["by_aspect"]
    assert result["n"] == 60 and by["1:1"]["n"] + by["2:1"]["n"] == 60 and by["2:1"]["n"] > 15
    assert by["2:1"]["position"] == 1.0 and by["2:1"]["color"] == 1.0 and by["2:1"]["all"] >= 0.95


def _config(buckets: bool):
    from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig

    listed = []
    if buckets:  # as an export of a run with 1:1 and 2:1 buckets at 128 and 64 px lists them
        for r, (w, h) in ((128, (192, 96)), (64, (96, 48))):
            listed += [{"name": "1:1", "width": r, "height": r, "resolution": r}]
            listed += [{"name": "2:1", "width": w, "height": h, "resolution": r}]
    return TokenShuffleConfig(
        resolutions=[128, 64], buckets=listed, vq_downsample=8, shuffle_window=2
    )


class _GroundTruthPipe:
    """Stands in for TokenShufflePipeline: resolves the size as the export's pipeline does
    (`resolve_size` on an export config) and draws what each prompt asks for at that size."""

    config = _config(buckets=True)
    calls: list[dict] = []

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def __call__(
        self,
        prompt,
        num_images_per_prompt=1,
        *,
        resolution=None,
        size=None,
        seed=0,
        guidance_scale=None,
        cfg_schedule=None,
        temperature=None,
        top_k=None,
        top_p=None,
        batch_size=None,
        progress=None,
    ):
        from types import SimpleNamespace

        from megatron_ts.hf.generation_token_shuffle import resolve_size

        self.calls.append({"n": len(prompt), "resolution": resolution, "size": size, "seed": seed})
        width, height = resolve_size(self.config, size, resolution)
        aspect = "2:1" if width >= 1.5 * height else "1:1"
        images = [render(list(parse_caption(t, aspect)), "gray", height, width) for t in prompt]
        return SimpleNamespace(images=images, settings={"size": [width, height]})


def test_ts_eval_shapes_asks_for_2_to_1_images_and_groups_them(tmp_path, monkeypatch, capsys):
    from megatron_ts.hf import pipeline_token_shuffle

    monkeypatch.setattr(pipeline_token_shuffle, "TokenShufflePipeline", _GroundTruthPipe)
    _GroundTruthPipe.calls.clear()
    out = tmp_path / "eval"
    argv = ["shapes", "--model", str(tmp_path), "--out", str(out), "--limit", "4", "--seed", "10"]
    assert ts_eval([*argv, "--aspect", "both", "--resolution", "128"]) == 0
    # 2:1 asks for the ratio: the export picks its trained 2:1 bucket (the first listed)
    assert _GroundTruthPipe.calls == [
        {"n": 4, "resolution": 128, "size": None, "seed": 10},
        {"n": 4, "resolution": None, "size": "2:1", "seed": 14},
    ]
    report = json.loads((out / "report.json").read_text())
    assert [r["aspect"] for r in report["prompts"]] == ["1:1"] * 4 + ["2:1"] * 4
    assert Image.open(out / report["prompts"][-1]["image"]).size == (192, 96)
    for aspect in ("1:1", "2:1"):
        assert report["summary"]["by_aspect"][aspect]["seen"]["all"] == 1.0
    assert set(report["settings"]) == {"1:1", "2:1"}
    _GroundTruthPipe.calls.clear()  # another trained 2:1 size, by pixels
    assert ts_eval([*argv, "--aspect", "2:1", "--wide-size", "96x48"]) == 0
    assert _GroundTruthPipe.calls[0]["size"] == "96x48"
    report = json.loads((out / "report.json").read_text())
    assert Image.open(out / report["prompts"][-1]["image"]).size == (96, 48)
    with pytest.raises(SystemExit):  # argparse: not wide enough for the wide grammar
        ts_eval([*argv, "--aspect", "2:1", "--wide-size", "80x64"])
    assert "at least 1.5 x the height" in capsys.readouterr().err
    # a prompts file is one grammar
    assert ts_eval([*argv, "--aspect", "both", "--prompts-file", str(tmp_path / "p.txt")]) == 2
    assert "--prompts-file is read in one grammar" in capsys.readouterr().err


def test_ts_eval_shapes_refuses_2_to_1_on_a_square_only_model(tmp_path, monkeypatch, capsys):
    from megatron_ts.hf import pipeline_token_shuffle

    class SquarePipe(_GroundTruthPipe):
        config = _config(buckets=False)

    monkeypatch.setattr(pipeline_token_shuffle, "TokenShufflePipeline", SquarePipe)
    argv = ["shapes", "--model", str(tmp_path), "--out", str(tmp_path / "e"), "--limit", "1"]
    SquarePipe.calls.clear()
    assert ts_eval([*argv, "--aspect", "both"]) == 2
    assert "trained on square images only" in capsys.readouterr().err
    assert SquarePipe.calls == []  # refused before the square images were drawn


def test_vq_round_trip_keeps_a_wide_image_wide(monkeypatch):

    from megatron_ts.evaluation import cli
    from megatron_ts.hf import vq_token_shuffle

    seen = []

    class IdentityVQ:
        def encode(self, x):
            seen.append(tuple(x.shape))
            return x

        def decode(self, z):
            return z

    monkeypatch.setattr(vq_token_shuffle, "load_vq", lambda *a, **k: IdentityVQ())
    round_trip = cli._vq_round_trip("native", "unused", 32)
    wide = render([DemoObject("red", "circle", "left")], "gray", 64, width=128)
    assert round_trip(wide).size == (64, 32) and seen[-1] == (1, 3, 32, 64)
    assert round_trip(render([], "gray", 64)).size == (32, 32)
