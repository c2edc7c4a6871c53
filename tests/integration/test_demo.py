"""The README's first command, scripts/demo.sh, end to end with tiny sizes.

The same script a user runs: make-demo -> train-vq -> tokenize x3 -> ts-train (3 stages) ->
ts-convert to-hf -> ts-generate -> ts-eval shapes, with 64 images (a quarter 2:1, trained in
aspect-ratio buckets) and a couple of steps per stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SMALL = " ".join(
    f"--curriculum.stages.{i}.steps 2 --curriculum.stages.{i}.global_batch 4 "
    f"--curriculum.stages.{i}.micro_batch 4"
    for i in range(3)
)


@pytest.mark.slow
def test_demo_script_end_to_end(tmp_path):
    out, run = tmp_path / "demo_out", tmp_path / "run"
    env = {
        **os.environ,
        "DEMO_SKIP_INSTALL": "1",
        "DEMO_OUT": str(out),
        "DEMO_RUN": str(run),
        "DEMO_IMAGES": "64",
        "DEMO_VQ_STEPS": "4",
        "DEMO_EVAL_LIMIT": "3",
        "DEMO_TRAIN_ARGS": f"{SMALL} --data.shuffle_buffer 8 --logging.interval 1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # every stage trained, in order, and the run finished at its last step
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/stage"]) for r in steps] == [
        (1, 0),
        (2, 0),
        (3, 1),
        (4, 1),
        (5, 2),
        (6, 2),
    ]
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("00000006")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # the export lists both buckets; four generated 128 px PNGs and one 2:1 of 192 x 96
    config = json.loads((out / "export" / "config.json").read_text())
    assert {(b["name"], b["width"], b["height"]) for b in config["buckets"]} >= {
        ("1:1", 128, 128),
        ("2:1", 192, 96),
    }
    pngs = sorted((out / "images").glob("*.png"))
    sizes = sorted(Image.open(p).size for p in pngs)
    assert sizes == [(128, 128)] * 4 + [(192, 96)], sizes

    # the report scored the first three prompts of each aspect's default set
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [r["aspect"] for r in report["prompts"]] == ["1:1"] * 3 + ["2:1"] * 3
    assert set(report["summary"]["seen"]) >= {"color", "shape", "position"}
    assert set(report["summary"]["by_aspect"]["2:1"]["seen"]) >= {"color", "position"}
    assert (out / "eval" / "report.html").is_file()
    assert f"report:       {out}/eval/report.json" in proc.stdout

    # a second run redoes nothing but training's resume check, export, generation and eval
    again = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train-vq: PSNR" not in again.stderr
