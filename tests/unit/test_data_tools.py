"""data_tools pieces without a pipeline run: ranks, shard sizes, reading input tars, bucket
resizing and the format /2 manifest's checks."""

from __future__ import annotations

import copy
import io
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_tools import shards
from data_tools.cli import _size
from data_tools.images import resize_center_crop, resize_to_bucket
from data_tools.tokenize import TokenizeOptions, output_name, rank_from_env, tokenize
from megatron_ts import storage
from megatron_ts.buckets import make_buckets, nearest
from megatron_ts.data.manifest import Manifest, ManifestError
from megatron_ts.vocab import VocabLayout

SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


def test_rank_from_flags_then_slurm_array_then_single(monkeypatch):
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    assert rank_from_env(None, None) == (0, 1)
    assert rank_from_env(2, 4) == (2, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")  # --array=1-8
    assert rank_from_env(None, None) == (6, 8)
    # each value falls back on its own: a fixed --world-size keeps the task's rank
    assert rank_from_env(None, 8) == (6, 8)
    assert rank_from_env(0, None) == (0, 8)
    assert rank_from_env(3, 4) == (3, 4)
    with pytest.raises(ValueError, match="--rank 6 must be in"):
        TokenizeOptions(resolution=32, rank=6, world_size=4)


def test_shard_size_parser():
    assert _size("256MB") == 256 << 20
    assert _size("64KiB") == 64 << 10
    assert _size("1.5GB") == 3 << 29
    assert _size("1000") == 1000


def test_codebook_beyond_uint16_is_refused_before_reading():
    vq = SimpleNamespace(codebook_size=70_000, downsample=16)
    with pytest.raises(ValueError, match="70000 codes does not fit the uint16 codes.npy"):
        tokenize(["/nonexistent/{0..9}.tar"], "/nonexistent/out", vq, None, TokenizeOptions(256))


def _tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("txt", b"caption %d" % i), ("png", bytes(3000))):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Failing(io.RawIOBase):
    """A stream over `data` that raises `exc` once `limit` bytes were read."""

    def __init__(self, data: bytes, limit: int, exc: Exception | None):
        self.data, self.limit, self.exc, self.pos = data, limit, exc, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.pos >= self.limit:
            if self.exc is not None:
                raise self.exc
            return 0
        n = min(len(buf), self.limit - self.pos, 512)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_a_store_failure_is_raised_but_a_short_tar_is_a_truncation(monkeypatch):
    data = _tar_bytes(4)
    cut = len(data) // 2  # right before the header of k2.png

    def opener(exc):
        return lambda url, endpoint_url=None: io.BufferedReader(_Failing(data, cut, exc))

    # the file simply ends: samples before the cut, then a ShardReadError naming the key
    monkeypatch.setattr(shards.storage, "open_url", opener(None))
    items = list(shards.iter_samples("s3://b/x.tar"))
    assert [type(i).__name__ for i in items] == ["RawSample", "RawSample", "ShardReadError"]
    assert items[-1].key == "k2" and "truncated" in items[-1].error
    # the store gave up after its retries: not a truncation, the caller fails (and retries) it
    failure = storage.StorageError("s3://b/x.tar: failed after 6 attempts")
    data = _tar_bytes(12)
    cut = len(data) // 2
    monkeypatch.setattr(shards.storage, "open_url", opener(failure))
    got = []
    with pytest.raises(storage.StorageError, match="failed after 6 attempts"):
        for item in shards.iter_samples("s3://b/x.tar"):
            got.append(item)
    assert got and all(isinstance(i, shards.RawSample) for i in got)


# 32 px budget, downsample 8, grid multiple 1: 32x32, 48x24, 24x48 and 32x24 pixels
BUCKETS = make_buckets(["1:1", "2:1", "1:2", "4:3"], 32, 8)


def _striped(width: int, height: int) -> Image.Image:
    """A red band along the left edge, a blue one along the right (10% each), white between; the
    green channel ramps from top to bottom, so a vertical crop differs from a squash."""
    arr = np.full((height, width, 3), 255, np.uint8)
    band = max(1, width // 10)
    arr[:, :band] = (255, 0, 0)
    arr[:, -band:] = (0, 0, 255)
    arr[:, :, 1] = np.linspace(0, 255, height).round().astype(np.uint8)[:, None]
    return Image.fromarray(arr)


def test_images_go_to_the_nearest_bucket_by_ratio():
    assert [b.size for b in BUCKETS] == ["32x32", "48x24", "24x48", "32x24"]
    by_size = {
        (200, 100): "2:1",
        (100, 230): "1:2",
        (90, 100): "1:1",
        (160, 118): "4:3",
        (400, 120): "2:1",  # wider than any bucket: the widest
        (100, 100): "1:1",
    }
    assert {size: nearest(BUCKETS, *size).name for size in by_size} == by_size


def test_resize_to_bucket_keeps_the_whole_image_when_the_ratio_matches():
    img = _striped(200, 100)
    out = resize_to_bucket(img, 48, 24)
    assert out.shape == (24, 48, 3) and out.dtype == np.uint8
    want = img.resize((48, 24), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert np.array_equal(out, np.asarray(want))  # a plain resize: nothing cropped
    assert tuple(out[12, 0, [0, 2]]) == (255, 0) and tuple(out[12, -1, [0, 2]]) == (0, 255)
    # the square path crops the centre square: both edge bands are gone
    square = resize_center_crop(img, 32)
    assert square.shape == (32, 32, 3) and tuple(square[16, 0, [0, 2]]) == (255, 255)


def test_resize_to_bucket_crops_only_the_sliver_the_ratio_needs():
    tall = _striped(100, 230)  # 1:2.3 into 24x48: width fits, 55 rows -> 48, 3 off the top
    out = resize_to_bucket(tall, 24, 48)
    assert out.shape == (48, 24, 3)
    resized = tall.resize((24, 55), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert np.array_equal(out, np.asarray(resized.crop((0, 3, 24, 51))))
    wide = _striped(180, 100)  # 1.8:1 into 48x24: height fits, 43 columns of 48 ... upscaled
    out = resize_to_bucket(wide, 48, 24)
    assert out.shape == (24, 48, 3)
    assert out[12, 0, 0] > 200 and out[12, 0, 2] < 60  # the red edge band is kept
    assert out[12, -1, 2] > 200 and out[12, -1, 0] < 60  # and the blue one
    grey = Image.new("L", (64, 64), 90)  # any mode: converted to RGB, square fits exactly
    assert resize_to_bucket(grey, 32, 32).shape == (32, 32, 3)


def test_bucket_options_are_checked_before_any_work():
    opts = TokenizeOptions(resolution=32, buckets=("1:1", " 2:1"))
    assert opts.buckets == ("1:1", "2:1") and opts.grid_multiple == 4
    assert [b.size for b in opts.bucket_list(8)] == ["32x32", "64x32"]
    assert TokenizeOptions(resolution=32).bucket_list(8) is None
    with pytest.raises(ValueError, match="1:1 and 4:3 are both 64x64 .* multiples of 32 px"):
        TokenizeOptions(resolution=64, buckets=("1:1", "4:3")).bucket_list(8)
    with pytest.raises(ValueError, match="--grid-multiple applies only"):
        TokenizeOptions(resolution=32, grid_multiple=2)
    with pytest.raises(ValueError, match="'16x9' is not of the form W:H"):
        TokenizeOptions(resolution=32, buckets=("1:1", "16x9"))
    with pytest.raises(ValueError, match="--grid-multiple 0 must be at least 1"):
        TokenizeOptions(resolution=32, buckets=("1:1",), grid_multiple=0)
    assert output_name(3, 1) == "tokens-000003-001.tar"
    assert output_name(3, 1, BUCKETS[1]) == "tokens-000003-48x24-001.tar"


def _manifest_v2() -> dict:
    vocab = VocabLayout(text_size=256, codebook_size=64, vq_tokenizer="native:abc")
    return {
        "format": "megatron_ts.tokens/2",
        "resolution": 32,
        "grid": 4,
        "downsample": 8,
        "buckets": [b.to_dict() for b in BUCKETS],
        "grid_multiple": 1,
        "vocab": vocab.to_dict(),
        "vq": {"format": "native", "codebook_size": 64, "downsample": 8},
        "text_tokenizer": {"spec": "byte"},
        "shards": [
            {"name": "tokens-000000-32x32-000.tar", "samples": 3, "bucket": "1:1"},
            {"name": "tokens-000000-48x24-000.tar", "samples": 2, "bucket": "2:1"},
            {"name": "tokens-000001-48x24-000.tar", "samples": 4, "bucket": "2:1"},
        ],
        "total_samples": 9,
        "inputs": [],
    }


def test_manifest_v2_round_trip_grids_and_counts():
    data = _manifest_v2()
    m = Manifest.from_dict(copy.deepcopy(data), "/x/manifest.json")
    assert m.format == "megatron_ts.tokens/2" and m.grid_multiple == 1
    assert m.buckets == BUCKETS and m.shards[1].bucket == "2:1"
    assert m.bucket_grid("2:1") == (3, 6) and m.bucket_grid("1:2") == (6, 3)
    assert m.bucket_samples == {"1:1": 3, "2:1": 6, "1:2": 0, "4:3": 0}
    assert m.to_dict() == data
    with pytest.raises(ManifestError, match="no bucket '16:9'; its buckets are 1:1, 2:1"):
        m.bucket_grid("16:9")
    # format /1: one square bucket, and no bucket fields written
    v1 = {k: v for k, v in data.items() if k not in ("buckets", "grid_multiple")}
    v1["format"] = "megatron_ts.tokens/1"
    v1["shards"] = [{k: v for k, v in s.items() if k != "bucket"} for s in data["shards"]]
    m1 = Manifest.from_dict(copy.deepcopy(v1))
    assert m1.buckets is None and m1.bucket_grid(None) == (4, 4) == m1.bucket_grid("1:1")
    assert m1.bucket_samples == {"1:1": 9} and m1.to_dict() == v1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["shards"][2].update(bucket="16:9"),
            r"shards\[2\] \(tokens-000001-48x24-000.tar\) has bucket '16:9', which is not in "
            r"buckets \(1:1, 2:1, 1:2, 4:3\)",
        ),
        (lambda d: d["shards"][0].pop("bucket"), r"shards\[0\] .* has bucket None"),
        (
            lambda d: d["buckets"][1].update(width=64),
            r"buckets\[1\] 2:1 is 64x24 pixels, but at resolution 32 with downsample 8 x "
            r"grid_multiple 1 it is 48x24",
        ),
        (
            lambda d: d.update(grid_multiple=2, buckets=d["buckets"][:3]),
            r"buckets\[1\] 2:1 is 48x24 pixels, .* it is 32x16",
        ),
        (
            lambda d: d.update(grid_multiple=2),
            "buckets: aspect-ratio buckets 1:1 and 4:3 are both 32x32 pixels",
        ),
        (lambda d: d.pop("buckets"), "format megatron_ts.tokens/2 without field 'buckets'"),
        (lambda d: d["buckets"][0].pop("width"), "buckets is malformed"),
        (lambda d: d.update(format="megatron_ts.tokens/1"), "tokens/1 has field 'buckets'"),
        (lambda d: d.update(format="megatron_ts.tokens/3"), "expected one of"),
    ],
)
def test_manifest_v2_errors_name_the_field(edit, message):
    data = _manifest_v2()
    edit(data)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data, "/x/manifest.json")


def test_a_bucket_in_a_v1_manifest_is_refused():
    data = _manifest_v2()
    for key in ("buckets", "grid_multiple"):
        data.pop(key)
    data["format"] = "megatron_ts.tokens/1"
    with pytest.raises(ManifestError, match=r"shards\[0\] .* has bucket '1:1' but the manifest"):
        Manifest.from_dict(data)
