"""The bundled demo data: square images as before, and 2:1 images with the wide grammar."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from data_tools.cli import main as ts_data
from data_tools.demo import (
    HELD_OUT,
    POSITIONS,
    WIDE_POSITIONS,
    DemoObject,
    caption,
    is_wide,
    make_demo,
    make_sample,
    positions_for,
    render,
)
from data_tools.demo_tokenizer import write_demo_tokenizer

# sha256 of the shards (in order) and of the tokenizer JSON, computed at commit 75571e0, before
# wide images existed, with the locked pillow (requirements/lock.txt). A new pillow or zlib may
# encode the same pixels into other bytes: recompute these at the commit above, then compare.
PINNED = {
    "png": "9c329206f36426cdd8e08c5304443fb61ce864baf96459533e5d42f088b7dfad",
    "jpg": "6b5b9c5f237108395d0ec7872c26de84b3c29515d24fa09921a23727cd4ad5e4",
    "tokenizer": "1d680766e7150dd943f03c26ec35d1e1b3ccf37d6e3ff35b8364f042dd9f9a10",
}


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _samples(out) -> dict[str, dict[str, bytes]]:
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return members


def test_no_wide_images_writes_the_bytes_of_before(tmp_path):
    png = make_demo(
        tmp_path / "a", num=24, resolution=32, seed=5, per_shard=10, two_object_prob=0.5
    )
    assert _digest(png) == PINNED["png"]
    jpg = make_demo(tmp_path / "b", num=12, resolution=48, seed=2, per_shard=12, image_format="jpg")
    assert _digest(jpg) == PINNED["jpg"]
    tok = write_demo_tokenizer(tmp_path / "tok.json")
    assert hashlib.sha256(tok.read_bytes()).hexdigest() == PINNED["tokenizer"]
    # the CLI's default is no wide images, the same bytes
    argv = ["make-demo", str(tmp_path / "c"), "--num", "24", "--resolution", "32", "--seed", "5"]
    assert ts_data([*argv, "--per-shard", "10", "--two-object-prob", "0.5"]) == 0
    assert _digest(sorted((tmp_path / "c").glob("*.tar"))) == PINNED["png"]


def test_wide_samples_have_their_size_caption_and_json(tmp_path):
    argv = ["make-demo", str(tmp_path), "--num", "100", "--resolution", "32", "--seed", "4"]
    assert ts_data([*argv, "--per-shard", "40", "--wide-fraction", "0.5"]) == 0
    samples = _samples(tmp_path)
    assert len(samples) == 100
    wide = 0
    for key, m in samples.items():
        meta = json.loads(m["json"])
        image = Image.open(io.BytesIO(m["png"]))
        assert image.size == (meta["width"], meta["height"]), key
        objects = [DemoObject(**o) for o in meta["objects"]]
        assert m["txt"].decode() == meta["caption"] == caption(objects)
        assert meta["height"] == 32 and meta["width"] in (32, 64), key
        grammar = WIDE_POSITIONS if meta["width"] == 64 else POSITIONS
        assert all(o.position in grammar for o in objects), meta
        assert not {(o.color, o.shape) for o in objects} & set(HELD_OUT), meta
        assert len({o.position for o in objects}) == len(objects), meta
        wide += meta["width"] == 64
        if meta["width"] == 64:
            for o in objects:
                word = "in" if o.position == "center" else "on"
                assert f"{o.color} {o.shape} {word} the {o.position}" in meta["caption"]
    assert 35 <= wide <= 65  # Binomial(100, 0.5): outside this 1 time in 400


def test_wide_draw_is_per_sample_and_leaves_square_samples_alone():
    square = {i: make_sample(i, 7, 32) for i in range(40)}
    some = [i for i in range(40) if is_wide(i, 7, 0.3)]
    more = [i for i in range(40) if is_wide(i, 7, 0.6)]
    assert 0 < len(some) < len(more) < 40 and set(some) <= set(more)
    assert [i for i in range(40) if is_wide(i, 7, 0.3)] == some  # deterministic
    assert not any(is_wide(i, 7, 0.0) for i in range(40))
    assert all(is_wide(i, 7, 1.0) for i in range(40))
    for i in range(40):
        image, text, meta = make_sample(i, 7, 32, wide_fraction=0.3)
        if i in some:
            assert image.size == (64, 32) and (meta["width"], meta["height"]) == (64, 32)
        else:  # a square sample is the one a run without wide images has at this index
            assert image.tobytes() == square[i][0].tobytes() and meta == square[i][2]


def test_wide_only_holdout_and_two_objects():
    for i in range(30):
        _, text, meta = make_sample(
            i, 1, 32, two_object_prob=1.0, only_holdout=True, wide_fraction=1.0
        )
        objects = meta["objects"]
        assert len(objects) == 2 and " and " in text, text
        assert {(o["color"], o["shape"]) for o in objects} <= set(HELD_OUT)


def test_wide_objects_are_drawn_at_the_height_scale_and_position():
    """A circle on the left of a 2:1 image is the square image's circle, moved."""
    obj = DemoObject("red", "circle", "center")
    square = render([obj], "gray", 64)
    wide = render([DemoObject("red", "circle", "left")], "gray", 64, width=128)
    assert wide.size == (128, 64)
    # the left centre of a 2:1 image (32 px) is the centre of its left square half
    assert wide.crop((0, 0, 64, 64)).tobytes() == square.tobytes()
    with pytest.raises(ValueError, match="WIDE_POSITIONS for 2:1"):
        render([DemoObject("red", "circle", "top left")], "gray", 64, width=128)
    with pytest.raises(ValueError, match="'left'"):
        render([DemoObject("red", "circle", "left")], "gray", 64)
    assert positions_for(128, 64) is WIDE_POSITIONS and positions_for(64, 64) is POSITIONS
    assert positions_for(95, 64) is POSITIONS and positions_for(96, 64) is WIDE_POSITIONS


def test_demo_tokenizer_covers_wide_captions(tmp_path):
    from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer

    tok = load_text_tokenizer(str(write_demo_tokenizer(tmp_path / "tok.json")))
    longest_square = max(
        len(tok.encode(make_sample(i, 0, 32, two_object_prob=1.0)[1])) for i in range(50)
    )
    for i in range(100):
        _, text, _ = make_sample(i, 0, 32, two_object_prob=0.5, wide_fraction=1.0)
        ids = tok.encode(text)
        assert 0 not in ids, f"unknown word in {text!r}"
        # the stages' caption_len fits the square captions (test_recipes), so it fits these
        assert len(ids) <= longest_square, text


def test_bad_wide_fraction_is_refused_before_writing(tmp_path, capsys):
    argv = ["make-demo", str(tmp_path / "x"), "--num", "4", "--wide-fraction", "1.5"]
    assert ts_data(argv) == 2
    assert "--wide-fraction 1.5" in capsys.readouterr().err
    assert not list((tmp_path / "x").glob("*.tar"))
