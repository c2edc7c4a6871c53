"""`ts-convert` end to end: to-hf with tokenizer/VQ files, from-hf back, clear failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ts.checkpoint.model_files import (
    load_full_state_dict,
    mark_complete,
    write_meta,
    write_model_files,
)
from megatron_ts.config import ModelConfig
from megatron_ts.convert.cli import main
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.vocab import VocabLayout


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def make_run(run: Path, tokenizer: dict) -> TokenShuffleLM:
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VocabLayout(256, 64), 2)
    model = TokenShuffleLM(spec, seed=21)
    ckpt = run / "checkpoints" / "step_00000003"
    write_model_files(model, ckpt, 0, 2)
    meta = {
        "step": 3,
        "model_spec": spec.to_dict(),
        "layout": {"tensor": 1, "pipeline": 1, "data": 1},
        "stage": {"index": 1, "caption_len": 12, "resolution": 256, "shuffle_window": 2},
        "config": {
            "tokenizer": tokenizer,
            "curriculum": {
                "stages": [
                    {"resolution": 128, "shuffle_window": 2},
                    {"resolution": 256, "shuffle_window": 2},
                ]
            },
        },
    }
    write_meta(ckpt, meta)
    mark_complete(ckpt)
    return model


def test_to_hf_and_back(tmp_path: Path, capsys):
    vq_file = tmp_path / "vq.safetensors"
    vq_file.write_bytes(b"not read by the converter")
    tok_file = tmp_path / "tok.json"
    tok_file.write_text('{"model": {"type": "BPE"}}')
    model = make_run(
        tmp_path / "run",
        {
            "text": str(tok_file),
            "vq_format": "native",
            "vq_checkpoint": str(vq_file),
            "downsample": 16,
        },
    )
    assert (
        main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--max-shard-size", "150KB"])
        == 0
    )
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["caption_len"] == 12 and config["resolutions"] == [256, 128]
    assert (out / "text_tokenizer/tok.json").read_text() == tok_file.read_text()
    assert json.loads((out / "text_tokenizer.json").read_text())["type"] == "tokenizers"
    vq = json.loads((out / "vq/config.json").read_text())
    assert vq == {
        "format": "native",
        "checkpoint": "vq.safetensors",
        "codebook_size": 64,
        "downsample": 16,
        "identity": "native",
    }
    assert (out / "vq/vq.safetensors").read_bytes() == vq_file.read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == 31

    assert main(["from-hf", str(out), str(tmp_path / "back")]) == 0
    back = load_full_state_dict(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(back[name], tensor), name
    meta = json.loads((tmp_path / "back/meta.json").read_text())
    assert meta["config"]["tokenizer"]["vq_checkpoint"] == str(out / "vq/vq.safetensors")
    capsys.readouterr()


def test_to_hf_exports_the_weight_average_when_the_run_kept_one(tmp_path: Path, capsys):
    run = tmp_path / "run"
    model = make_run(run, {"text": "byte"})
    assert main(["to-hf", str(run), str(tmp_path / "x"), "--weights", "ema"]) == 2
    assert "--weights raw" in capsys.readouterr().err

    ckpt = run / "checkpoints/step_00000003"
    average = TokenShuffleLM(model.spec, seed=22)  # any other weights stand in for the average
    write_model_files(average, ckpt, 0, 2)
    (ckpt / "model").rename(ckpt / "model_ema")
    write_model_files(model, ckpt, 0, 2)
    meta = json.loads((ckpt / "meta.json").read_text())
    write_meta(ckpt, {**meta, "ema": {"decay": 0.99, "updates": 3}})
    for weights, want in (("auto", average), ("raw", model)):
        out = tmp_path / weights
        assert main(["to-hf", str(run), str(out), "--weights", weights]) == 0
        assert main(["from-hf", str(out), str(tmp_path / f"{weights}-back")]) == 0
        back = load_full_state_dict(tmp_path / f"{weights}-back")
        for name, tensor in want.state_dict().items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(back[name], tensor), (weights, name)
        source = json.loads((out / "config.json").read_text())["source_checkpoint"]
        assert source["weights"] == ("ema" if weights == "auto" else "raw")
    assert "decay 0.99, 3 updates" in (tmp_path / "auto/README.md").read_text()
    capsys.readouterr()


def test_failures_are_named(tmp_path: Path, capsys):
    make_run(tmp_path / "run", {"text": "byte"})
    (tmp_path / "run/checkpoints/step_00000003/COMPLETE").unlink()
    assert main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert main(["from-hf", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/config.json").write_text('{"model_type": "gpt2"}')
    assert main(["from-hf", str(tmp_path / "cfg"), str(tmp_path / "x")]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_ts.convert.cli", "to-hf", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--max-shard-size" in out.stdout
