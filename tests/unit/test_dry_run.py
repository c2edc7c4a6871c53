"""`ts-train --dry-run` as a user runs it: one JSON object on stdout, exit 2 on a bad config.

The plan for the paper's three stages (512 px without shuffle, 1024 and 2048 px with s = 2) is
computed once in a subprocess and checked against the formulas it reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_ts.models.flavors import FLAVORS
from megatron_ts.models.flops import param_counts, sample_flops

PAPER_TOML = """
[model]
flavor = "2.7B"

[tokenizer]
text = "llama2.json"   # not read: text_size plans the vocabulary without the file
text_size = 32000
codebook_size = 16384
downsample = 16

[parallel]
tensor = 2

[[curriculum.stages]]
name = "512px"
resolution = 512
shuffle_window = 1
caption_len = 126
global_batch = 256
tokens = 50_000_000   # 1152 positions x 256 samples = 294,912 per step -> 170 steps
pipeline = 2

[[curriculum.stages]]
name = "1024px"
resolution = 1024
shuffle_window = 2
caption_len = 126
global_batch = 128
steps = 1000

[[curriculum.stages]]
name = "2048px"
resolution = 2048
shuffle_window = 2
caption_len = 126
global_batch = 64
steps = 500
z_loss = 1e-5
"""


def ts_train(*args: str) -> subprocess.CompletedProcess:
    """Runs the installed `ts-train` console script (the module when it is not on PATH)."""
    exe = shutil.which("ts-train")
    command = [exe] if exe else [sys.executable, "-m", "pretrain.train"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.fixture(scope="module")
def paper_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dry") / "paper.toml"
    path.write_text(textwrap.dedent(PAPER_TOML))
    return path


@pytest.fixture(scope="module")
def report(paper_config: Path) -> dict:
    proc = ts_train("--config", str(paper_config), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole stdout is one JSON object


def test_report_parameters(report: dict):
    assert report["flavor"] == "2.7B"
    assert report["shape"] == {
        "hidden_size": 3072,
        "num_layers": 20,
        "num_heads": 24,
        "num_kv_heads": 24,
        "ffn_hidden_size": 8192,
    }
    # 32000 text + 5 specials + 16384 codes = 48389, padded to 48512 (multiple of 128)
    assert report["vocab"] == {"text": 32000, "specials": 5, "codes": 16384, "padded": 48512}
    # the model of the largest window (s = 2), as in test_model.test_large_flavor_param_counts
    assert report["parameters"] == {
        "embeddings": 149_028_864,
        "shuffle": 40_108_032,
        "transformer": 2_265_050_112,
        "unshuffle": 40_108_032,
        "head": 149_028_864,
        "total": 2_643_323_904,
    }
    assert [st["parameters"] for st in report["stages"]] == [
        2_563_107_840,  # no shuffle layers at 512 px
        2_643_323_904,
        2_643_323_904,
    ]


def test_report_codes_and_positions_per_stage(report: dict):
    got = [
        (
            st["name"],
            st["resolution"],
            st["shuffle_window"],
            st["image_codes_per_sample"],
            st["image_positions_per_sample"],
            st["sequence_length"],
        )
        for st in report["stages"]
    ]
    # 16x VQ: 512 px = 32^2 codes, 1024 px = 64^2, 2048 px = 128^2; s = 2 keeps 1/4 as positions
    assert got == [
        ("512px", 512, 1, 1024, 1024, 1152),  # + <bos> + 126 caption + <boi>
        ("1024px", 1024, 2, 4096, 1024, 1152),
        ("2048px", 2048, 2, 16384, 4096, 4224),
    ]


def test_report_flops_and_lengths(report: dict):
    padded = 48512
    for st, grid in zip(report["stages"], (32, 64, 128)):
        expected = sample_flops(
            FLAVORS["2.7B"],
            padded,
            126,
            grid,
            st["shuffle_window"],
            2,
            image_head_rows=report["vocab"]["codes"],  # image positions score codes only
        )
        assert st["training_flops_per_sample"] == expected.training
        assert st["flops_breakdown_per_sample"] == expected.to_dict()
        assert st["training_flops_per_step"] == expected.training * st["global_batch"]
        assert st["tokens"] == st["sequence_length"] * st["global_batch"] * st["steps"]
    # the 512 px stage was given in tokens: ceil(50e6 / (1152 x 256)) = 170 steps
    assert [st["steps"] for st in report["stages"]] == [170, 1000, 500]
    assert [(st["tensor"], st["pipeline"]) for st in report["stages"]] == [(2, 2), (2, 1), (2, 1)]
    # 1024 px with s = 2 costs only a little more per sample than 512 px without shuffle: the
    # same positions, but 4x as many codes go through the shuffle layers and the head
    f512, f1024 = (st["training_flops_per_sample"] for st in report["stages"][:2])
    assert 1.0 < f1024 / f512 < 1.5
    assert param_counts(FLAVORS["2.7B"], padded, 1, 2)["total"] == 2_563_107_840


def test_debug_config_dry_run():
    proc = ts_train("--config", "pretrain/configs/debug.toml", "--dry-run", "--train.steps", "7")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (stage,) = report["stages"]
    assert (stage["name"], stage["steps"], stage["image_positions_per_sample"]) == ("main", 7, 16)
    assert report["parameters"]["total"] == 250_176


@pytest.mark.parametrize(
    "args,field",
    [
        (["--model.shuffle_window", "3"], "model.shuffle_window"),
        (["--train.stepz", "3"], "train.stepz"),
        (["--parallel.pipeline", "2", "--parallel.zero_stage", "3"], "parallel.zero_stage"),
        (["--tokenizer.text", "no/such/tokenizer.json"], "tokenizer.text"),
    ],
)
def test_bad_config_exits_2_naming_the_field(args: list[str], field: str):
    proc = ts_train("--config", "pretrain/configs/debug.toml", "--dry-run", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("ts-train: config error:")
    assert field in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_exits_2(tmp_path: Path):
    proc = ts_train("--config", str(tmp_path / "nope.toml"), "--dry-run")
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr and "Traceback" not in proc.stderr


BUCKETS_TOML = """
[model]
flavor = "2.7B"
max_windows_per_side = {max_windows}

[tokenizer]
text = "llama2.json"
text_size = 32000
codebook_size = 16384
downsample = 16

[[curriculum.stages]]
name = "1024px"
resolution = 1024
shuffle_window = 2
caption_len = 126
global_batch = 128
steps = 10
buckets = ["1:1", "16:9", "9:16"]
"""


def test_dry_run_reports_every_bucket(tmp_path: Path):
    path = tmp_path / "buckets.toml"
    path.write_text(BUCKETS_TOML.format(max_windows=48))
    proc = ts_train("--config", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = report["stages"][0]["buckets"]
    # 16:9 at a 1024^2 budget in 64 px steps (16 px codes x grid multiple 4): 1344 x 768
    assert [(r["name"], r["size"], r["grid"]) for r in rows] == [
        ("1:1", "1024x1024", [64, 64]),
        ("16:9", "1344x768", [48, 84]),
        ("9:16", "768x1344", [84, 48]),
    ]
    assert [r["image_positions_per_sample"] for r in rows] == [1024, 1008, 1008]
    assert [r["sequence_length"] for r in rows] == [1152, 1136, 1136]
    shape = FLAVORS["2.7B"]
    for r in rows:
        want = sample_flops(shape, 48512, 126, tuple(r["grid"]), 2, 2, image_head_rows=16384)
        assert r["training_flops_per_sample"] == want.training
    # the four window-position tables: 4 x 48 x 3072
    assert report["parameters"]["window_positions"] == 589_824


def test_dry_run_refuses_buckets_wider_than_the_tables(tmp_path: Path):
    path = tmp_path / "buckets.toml"
    path.write_text(BUCKETS_TOML.format(max_windows=32))
    proc = ts_train("--config", str(path), "--dry-run")
    assert proc.returncode == 2
    assert "model.max_windows_per_side = 32, but curriculum.stages[0].buckets" in proc.stderr
    assert "42 windows on a side; set model.max_windows_per_side = 42" in proc.stderr
