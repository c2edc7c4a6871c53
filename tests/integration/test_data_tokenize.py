"""ts-data end to end: make-demo -> train-vq -> tokenize -> inspect, resume, corrupt inputs, S3."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as ts_data
from data_tools.demo import COLORS, make_sample
from data_tools.images import resize_center_crop, resize_to_bucket, to_tensor_batch
from megatron_ts.data.manifest import load_manifest
from megatron_ts.hf.vq_token_shuffle import load_vq

RES = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """24 demo images in 3 shards and a tiny native VQ trained on them by the CLI."""
    root = tmp_path_factory.mktemp("demo")
    assert ts_data(["make-demo", str(root / "raw"), "--num", "24", "--resolution", "48",
                    "--per-shard", "8", "--seed", "1"]) == 0  # fmt: skip
    vq = root / "vq.safetensors"
    args = ["train-vq", str(root / "raw"), "--out", str(vq), "--steps", "8", "--resolution", "32"]
    args += ["--codebook-size", "64", "--channels", "8,16,16", "--batch-size", "8"]
    assert ts_data(args) == 0
    return {"raw": root / "raw", "vq": vq, "root": root}


def _tokenize(demo, out, *extra: str, inputs: list[str] | None = None) -> int:
    args = ["tokenize", "--input", *(inputs or [str(demo["raw"])]), "--output", str(out)]
    args += ["--resolution", str(RES), "--vq-checkpoint", str(demo["vq"]), "--batch-size", "5"]
    return ts_data(args + list(extra))


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_round_trip_read_with_plain_webdataset(demo, tmp_path, capsys):
    import webdataset as wds

    out = tmp_path / "tok"
    assert _tokenize(demo, out) == 0
    m = load_manifest(str(out))
    assert (m.resolution, m.grid, m.downsample, m.total_samples) == (RES, 4, 8, 24)
    assert [s.name for s in m.shards] == [f"tokens-{i:06d}-000.tar" for i in range(3)]
    assert m.vocab.codebook_size == 64 and m.vocab.text_size == 256
    assert m.vq["format"] == "native" and m.vocab.vq_tokenizer.startswith("native:")
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "megatron_ts.tokens/1"
    assert raw["vq"]["checkpoint_sha256"] == hashlib.sha256(demo["vq"].read_bytes()).hexdigest()

    urls = [str(out / s.name) for s in m.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 24
    vq = load_vq("native", str(demo["vq"]), device="cpu")
    first = samples[0]
    assert set(first) >= {"__key__", "codes.npy", "ids.npy", "txt", "json"}
    assert first["codes.npy"].dtype == np.uint16 and first["codes.npy"].shape == (4, 4)
    assert first["ids.npy"].dtype == np.int32
    assert bytes(first["ids.npy"].astype(np.uint8)).decode() == first["txt"]
    assert first["json"]["source_shard"].endswith("00000.tar")
    assert (first["json"]["original_width"], first["json"]["original_height"]) == (48, 48)
    # the caption and attributes of sample 0 of seed 1; codes are the VQ's codes of the image
    image, caption, meta = make_sample(0, seed=1, resolution=48)
    assert first["__key__"] == "000000000" and first["txt"] == caption
    assert first["json"]["objects"] == meta["objects"]
    want = vq.encode(to_tensor_batch([resize_center_crop(image, RES)]))[0].numpy()
    assert np.array_equal(first["codes.npy"], want)

    capsys.readouterr()
    assert ts_data(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples_read"] == 24 and not report["corrupt"] and report["codes_in_range"]
    assert report["caption_chars"]["min"] >= len("a red circle in the center")


def test_rerun_writes_nothing_and_interrupted_run_resumes(demo, tmp_path):
    out = tmp_path / "tok"
    assert _tokenize(demo, out) == 0
    before = _files(out)
    manifest = (out / "manifest.json").read_bytes()
    assert _tokenize(demo, out, "--no-merge") == 0
    after = _files(out)
    assert {k: v for k, v in after.items() if not k.startswith("_ranks")} == {
        k: v for k, v in before.items() if not k.startswith("_ranks")
    }
    # state of a run killed while writing input #2: its record missing, its shard half written,
    # no manifest yet
    (out / "_done/000002.json").unlink()
    shard = out / "tokens-000002-000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    (out / "manifest.json").unlink()
    assert _tokenize(demo, out) == 0
    assert (out / "manifest.json").read_bytes() == manifest
    resumed = _files(out)
    assert resumed["tokens-000000-000.tar"] == before["tokens-000000-000.tar"]  # untouched
    assert resumed["tokens-000002-000.tar"][0] == before["tokens-000002-000.tar"][0]


def test_ranks_and_merge_give_the_single_run_manifest(demo, tmp_path, monkeypatch):
    single = tmp_path / "single"
    assert _tokenize(demo, single) == 0
    split = tmp_path / "split"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")  # rank 1 of 2
    assert _tokenize(demo, split, "--no-merge") == 0
    assert sorted(p.name for p in split.glob("tokens-*")) == ["tokens-000001-000.tar"]
    assert ts_data(["merge", str(split)]) == 2  # rank 0 missing: named error
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert _tokenize(demo, split, "--no-merge") == 0
    assert ts_data(["merge", str(split)]) == 0
    a = json.loads((single / "manifest.json").read_text())
    b = json.loads((split / "manifest.json").read_text())
    assert a == b


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _img(mode: str, size: int, fmt: str, **kw) -> bytes:
    color = {"RGB": COLORS["red"], "L": 90, "CMYK": (0, 200, 200, 0), "RGBA": (0, 0, 255, 0)}
    img = Image.new(mode if mode != "P" else "RGB", (size, size), color.get(mode, COLORS["red"]))
    if mode == "P":
        img = img.convert("P")
        img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_corrupt_inputs_are_reported_and_skipped(demo, tmp_path, logged):
    src = tmp_path / "in"
    src.mkdir()
    cap = b"a caption"
    _tar(
        src / "a.tar",
        [
            ("good.png", _img("RGB", 40, "PNG")),
            ("good.txt", cap),
            ("good.json", b'{"url": "x"}'),
            ("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
            ("broken.txt", cap),
            ("cmyk.jpg", _img("CMYK", 40, "JPEG")),
            ("cmyk.txt", cap),
            ("tiny.png", _img("RGB", 8, "PNG")),
            ("tiny.txt", cap),
            ("nocap.png", _img("RGB", 40, "PNG")),
            ("grey.png", _img("L", 40, "PNG")),
            ("grey.txt", cap),
            ("alpha.png", _img("RGBA", 40, "PNG")),
            ("alpha.txt", cap),
            ("pal.png", _img("P", 40, "PNG")),
            ("pal.txt", cap),
        ],
    )
    members = []
    for i in range(3):
        members += [(f"s{i}.png", _img("RGB", 40, "PNG")), (f"s{i}.txt", cap)]
    raw = _tar(src / "b.tar", members)
    with tarfile.open(src / "b.tar") as tar:
        cut = tar.getmember("s2.png").offset_data + 20
    (src / "b.tar").write_bytes(raw[:cut])  # truncated inside the third sample's image
    (src / "c.tar").write_bytes(b"this is not a tar file at all" * 40)
    out = tmp_path / "tok"
    rc = _tokenize(demo, out, "--min-size", "16", inputs=[str(src)])
    assert rc == 3  # an unreadable input shard is a failure of the job ...
    m = load_manifest(str(out))  # ... but everything readable was written and listed
    done = {i: json.loads((out / f"_done/{i:06d}.json").read_text()) for i in range(3)}
    skipped_a = {s["key"]: s["reason"] for s in done[0]["skipped"]}
    assert set(skipped_a) == {"broken", "tiny", "nocap"}
    assert skipped_a["broken"].startswith("undecodable image")
    assert skipped_a["tiny"] == "image below --min-size 16: 8x8"
    assert "missing caption" in skipped_a["nocap"]
    assert done[0]["samples"] == 5  # good, cmyk, grey, alpha, palette converted to RGB
    assert done[1]["samples"] == 2 and done[1]["skipped"][0]["key"] == "s2"
    assert done[2]["failed"] and "c.tar" in done[2]["url"]
    assert m.total_samples == 7 and m.extra["failed_inputs"] == [str(src / "c.tar")]
    assert m.extra["skipped"] == {
        "image below --min-size 16": 1,
        "missing caption (.txt)": 1,
        "truncated or corrupt": 1,
        "undecodable image": 1,
    }
    text = "\n".join(logged)
    assert "c.tar is unreadable" in text and "broken: undecodable image" in text

    import webdataset as wds

    got = {s["__key__"]: s for s in wds.WebDataset([str(out / n.name) for n in m.shards]).decode()}
    assert set(got) == {"good", "cmyk", "grey", "alpha", "pal", "s0", "s1"}
    assert got["good"]["json"]["url"] == "x"
    # a re-run retries the failed input (it fails again) and rewrites no token shard
    before = _files(out)
    assert _tokenize(demo, out, "--min-size", "16", inputs=[str(src)]) == 3
    assert {k: v for k, v in _files(out).items() if "tokens" in k} == {
        k: v for k, v in before.items() if "tokens" in k
    }


def test_store_failure_fails_the_input_and_the_next_run_retries_it(demo, tmp_path, monkeypatch):
    from megatron_ts import storage

    clean = tmp_path / "clean"
    assert _tokenize(demo, clean) == 0
    real_open = storage.open_url
    bad = str(demo["raw"] / "00001.tar")

    class _Outage(io.RawIOBase):  # the store answers 2 KiB, then stays unreachable
        def __init__(self, url):
            self.inner, self.left = real_open(url), 2048

        def readable(self):
            return True

        def readinto(self, buf):
            if self.left <= 0:
                raise storage.StorageError(f"{bad}: failed after 6 attempts: connection reset")
            n = self.inner.readinto(memoryview(buf)[: min(len(buf), self.left)])
            self.left -= n
            return n

    def flaky_open(url, endpoint_url=None):
        return io.BufferedReader(_Outage(url)) if url == bad else real_open(url, endpoint_url)

    monkeypatch.setattr(storage, "open_url", flaky_open)
    out = tmp_path / "tok"
    assert _tokenize(demo, out) == 3
    record = json.loads((out / "_done/000001.json").read_text())
    assert "StorageError" in record["failed"] and record["shards"] == []
    assert not record["skipped"]  # not mistaken for a truncated shard
    assert load_manifest(str(out)).extra["failed_inputs"] == [bad]

    monkeypatch.setattr(storage, "open_url", real_open)  # the store is back
    kept = _files(out)["tokens-000000-000.tar"]
    assert _tokenize(demo, out) == 0
    assert _files(out)["tokens-000000-000.tar"] == kept  # finished inputs are not redone
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_inspect_flags_corrupt_sets(demo, tmp_path, capsys):
    out = tmp_path / "tok"
    assert _tokenize(demo, out) == 0
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / "tokens-000001-000.tar"
    data = bytearray(shard.read_bytes())
    data[-3000] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert ts_data(["inspect", str(bad)]) == 3
    text = capsys.readouterr().out
    assert "BAD SHARD tokens-000001-000.tar: sha256 differs" in text and "CORRUPT" in text

    # codes beyond the manifest's codebook
    oob = tmp_path / "oob"
    shutil.copytree(out, oob)
    manifest = json.loads((oob / "manifest.json").read_text())
    manifest["vq"]["codebook_size"] = manifest["vocab"]["codebook_size"] = 2
    (oob / "manifest.json").write_text(json.dumps(manifest))
    assert ts_data(["inspect", str(oob), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert not report["codes_in_range"]
    assert report["bad_samples"][0]["problem"].startswith("code ")
    (oob / "manifest.json").unlink()
    assert ts_data(["inspect", str(oob)]) == 3
    assert "manifest.json not found" in capsys.readouterr().out


def test_s3_in_and_out(demo, tmp_path, s3_bucket, monkeypatch, capfd, logged):
    from megatron_ts import storage

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SeCrEt-never-logged-42")
    for p in sorted(demo["raw"].glob("*.tar")):
        storage.upload_file(p, f"s3://{bucket}/raw/{p.name}", endpoint)
    local = tmp_path / "local"
    assert _tokenize(demo, local) == 0
    url = f"s3://{bucket}/tokens/"
    inputs = [f"s3://{bucket}/raw/{{00000..00002}}.tar"]
    assert _tokenize(demo, url, "--endpoint-url", endpoint, inputs=inputs) == 0
    s3_manifest = json.loads(storage.read_bytes(url + "manifest.json", endpoint))
    local_manifest = json.loads((local / "manifest.json").read_text())
    # Same shards and samples; the bytes differ only where each sample's json names its source.
    strip = [
        {k: v for k, v in s.items() if k not in ("sha256", "bytes")} for s in s3_manifest["shards"]
    ]
    assert strip == [
        {k: v for k, v in s.items() if k not in ("sha256", "bytes")}
        for s in local_manifest["shards"]
    ]
    for shard in local_manifest["shards"]:
        remote = tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url + shard["name"], endpoint)))
        here = tarfile.open(local / shard["name"])
        for a, b in zip(remote.getmembers(), here.getmembers(), strict=True):
            assert a.name == b.name
            ra, rb = remote.extractfile(a).read(), here.extractfile(b).read()
            if a.name.endswith(".json"):
                ja, jb = json.loads(ra), json.loads(rb)
                assert ja.pop("source_shard").startswith(f"s3://{bucket}/raw/")
                assert jb.pop("source_shard").startswith(str(demo["raw"]))
                assert ja == jb
            else:
                assert ra == rb, a.name
    assert [i["url"] for i in s3_manifest["inputs"]] == [
        f"s3://{bucket}/raw/0000{i}.tar" for i in range(3)
    ]
    capfd.readouterr()
    assert ts_data(["inspect", url, "--endpoint-url", endpoint]) == 0
    assert "OK" in capfd.readouterr().out
    # idempotent on S3 too: nothing is rewritten
    listing = storage.list_prefix(url, endpoint)
    etags = {u: storage.stat_size(u, endpoint) for u in listing}
    assert _tokenize(demo, url, "--endpoint-url", endpoint, inputs=inputs) == 0
    assert {u: storage.stat_size(u, endpoint) for u in listing} == etags
    text = "\n".join(logged) + capfd.readouterr().out
    assert logged and "SeCrEt" not in text and "SeCrEt" not in json.dumps(s3_manifest)


def _photo(width: int, height: int, seed: int, fmt: str) -> bytes:
    """A smooth random colour field of the given size, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    img = small.resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# key: (width, height, format, the bucket it must land in); input a then input b
BUCKET_INPUTS = {
    "a.tar": {
        "w1": (200, 100, "PNG", "2:1"),
        "t1": (100, 200, "PNG", "1:2"),
        "s1": (64, 64, "PNG", "1:1"),
        "q1": (120, 90, "PNG", "4:3"),
        "w2": (150, 60, "PNG", "2:1"),
    },
    "b.tar": {
        "w3": (400, 200, "JPEG", "2:1"),  # JPEG: decoded at a reduced draft scale
        "t2": (60, 130, "PNG", "1:2"),
        "s2": (50, 48, "PNG", "1:1"),
    },
}
BUCKET_FLAGS = ["--buckets", "1:1,2:1,1:2,4:3", "--grid-multiple", "1", "--shard-samples", "1"]
GRIDS = {"1:1": (4, 4), "2:1": (3, 6), "1:2": (6, 3), "4:3": (3, 4)}  # 32 px budget, 8 px codes


@pytest.fixture()
def bucket_inputs(tmp_path) -> tuple[Path, dict[str, Image.Image]]:
    """Two img2dataset-style tars of wide, tall and square images; returns (dir, images by key)."""
    src = tmp_path / "in"
    src.mkdir()
    images = {}
    for name, samples in BUCKET_INPUTS.items():
        members = []
        for key, (w, h, fmt, _) in samples.items():
            data = _photo(w, h, len(images), fmt)
            images[key] = Image.open(io.BytesIO(data))
            ext = "jpg" if fmt == "JPEG" else "png"
            members += [(f"{key}.{ext}", data), (f"{key}.txt", f"a {key} image".encode())]
        _tar(src / name, members)
    return src, images


def test_buckets_end_to_end(demo, bucket_inputs, tmp_path, capsys):
    import webdataset as wds

    src, images = bucket_inputs
    out = tmp_path / "tok"
    assert _tokenize(demo, out, *BUCKET_FLAGS, inputs=[str(src)]) == 0
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "megatron_ts.tokens/2"
    assert (raw["resolution"], raw["grid"], raw["grid_multiple"]) == (RES, 4, 1)
    assert raw["buckets"] == [
        {"name": "1:1", "width": 32, "height": 32},
        {"name": "2:1", "width": 48, "height": 24},
        {"name": "1:2", "width": 24, "height": 48},
        {"name": "4:3", "width": 32, "height": 24},
    ]
    # one bucket per shard, parts counted per input and bucket, names sorted
    assert [(s["name"], s["bucket"]) for s in raw["shards"]] == [
        ("tokens-000000-24x48-000.tar", "1:2"),
        ("tokens-000000-32x24-000.tar", "4:3"),
        ("tokens-000000-32x32-000.tar", "1:1"),
        ("tokens-000000-48x24-000.tar", "2:1"),
        ("tokens-000000-48x24-001.tar", "2:1"),
        ("tokens-000001-24x48-000.tar", "1:2"),
        ("tokens-000001-32x32-000.tar", "1:1"),
        ("tokens-000001-48x24-000.tar", "2:1"),
    ]
    m = load_manifest(str(out))
    assert m.bucket_samples == {"1:1": 2, "2:1": 3, "1:2": 2, "4:3": 1}
    done = json.loads((out / "_done/000000.json").read_text())
    assert len(done["shards"]) == 5 and done["buckets"] == raw["buckets"]

    vq = load_vq("native", str(demo["vq"]), device="cpu")
    want_bucket = {k: v[3] for samples in BUCKET_INPUTS.values() for k, v in samples.items()}
    seen = set()
    for entry in m.shards:
        for sample in wds.WebDataset([str(out / entry.name)], shardshuffle=False).decode():
            key = sample["__key__"]
            seen.add(key)
            assert want_bucket[key] == entry.bucket, key
            codes = sample["codes.npy"]
            assert codes.dtype == np.uint16 and codes.shape == GRIDS[entry.bucket], key
            w, h, _, _ = BUCKET_INPUTS["a.tar" if key in BUCKET_INPUTS["a.tar"] else "b.tar"][key]
            assert (sample["json"]["original_width"], sample["json"]["original_height"]) == (w, h)
    assert seen == set(want_bucket)
    # the codes are the VQ's codes of the bucket-resized image (a 200x100 image kept whole)
    first_wide = next(iter(wds.WebDataset([str(out / "tokens-000000-48x24-000.tar")]).decode()))
    assert first_wide["__key__"] == "w1"
    pixels = resize_to_bucket(images["w1"], 48, 24)
    want = vq.encode(to_tensor_batch([pixels]))[0].numpy()
    assert np.array_equal(first_wide["codes.npy"], want)

    capsys.readouterr()
    assert ts_data(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["corrupt"] and report["samples_read"] == 8
    assert report["bucket_histogram"] == {"1:1": 2, "2:1": 3, "1:2": 2, "4:3": 1}
    assert ts_data(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        "buckets (readable samples): 1:1 32x32: 2, 2:1 48x24: 3, 1:2 24x48: 2, 4:3 32x24: 1" in text
    )

    # a shard listed under another bucket: its codes have the wrong shape, and inspect says so
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][3]["bucket"] = "1:2"  # tokens-000000-48x24-000.tar holds 2:1 codes
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert ts_data(["inspect", str(bad), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["bad_samples"] == [
        {
            "shard": "tokens-000000-48x24-000.tar",
            "key": "w1",
            "problem": "codes uint16 (3, 6), expected uint16 (6, 3)",
        }
    ]


def test_buckets_rerun_skips_done_inputs_and_resumes(demo, bucket_inputs, tmp_path):
    src, _ = bucket_inputs
    out = tmp_path / "tok"
    assert _tokenize(demo, out, *BUCKET_FLAGS, inputs=[str(src)]) == 0
    before = _files(out)
    manifest = (out / "manifest.json").read_bytes()
    assert _tokenize(demo, out, *BUCKET_FLAGS, "--no-merge", inputs=[str(src)]) == 0
    assert {k: v for k, v in _files(out).items() if not k.startswith("_ranks")} == {
        k: v for k, v in before.items() if not k.startswith("_ranks")
    }
    # input #1 interrupted: no record, one of its three shards half written
    (out / "_done/000001.json").unlink()
    shard = out / "tokens-000001-48x24-000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    (out / "manifest.json").unlink()
    assert _tokenize(demo, out, *BUCKET_FLAGS, inputs=[str(src)]) == 0
    assert (out / "manifest.json").read_bytes() == manifest
    resumed = _files(out)
    for name in ("tokens-000000-48x24-000.tar", "tokens-000000-48x24-001.tar"):
        assert resumed[name] == before[name]  # input #0 untouched
    assert resumed["tokens-000001-48x24-000.tar"][0] == before["tokens-000001-48x24-000.tar"][0]
    # other buckets make every input's record stale: all inputs are redone
    result_dir = tmp_path / "other"
    shutil.copytree(out, result_dir)
    flags = ["--buckets", "1:1,2:1", "--grid-multiple", "1"]
    assert _tokenize(demo, result_dir, *flags, inputs=[str(src)]) == 0
    m = load_manifest(str(result_dir))
    assert [b.name for b in m.buckets] == ["1:1", "2:1"] and m.total_samples == 8


def test_merge_refuses_ranks_with_other_buckets(demo, bucket_inputs, tmp_path, capsys):
    src, _ = bucket_inputs
    out = tmp_path / "tok"
    rank = ["--no-merge", "--world-size", "2", "--rank"]
    assert _tokenize(demo, out, *BUCKET_FLAGS, *rank, "0", inputs=[str(src)]) == 0
    assert _tokenize(demo, out, *rank, "1", inputs=[str(src)]) == 0  # square
    capsys.readouterr()
    assert ts_data(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rank 1 has buckets None" in err and "same tokenizers, resolution and --buckets" in err
