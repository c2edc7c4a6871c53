"""`ts-generate` end to end on an export: PNGs, metadata, determinism, broken model dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ts.checkpoint.model_files import mark_complete, write_meta, write_model_files
from megatron_ts.config import ModelConfig
from megatron_ts.hf.export import export_to_hf
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.sampling.cli import main
from megatron_ts.vocab import VocabLayout


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def export(root: Path, vq_checkpoint: str | None = None, codebook: int = 64) -> Path:
    """A randomised debug model (s = 2, 64 px at 16x -> 4x4 codes) exported to root/hf."""
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VocabLayout(256, codebook), 2)
    model = TokenShuffleLM(spec, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    write_model_files(model, ckpt, 0, 2)
    tok = {"text": "byte", "vq_format": "native", "vq_checkpoint": vq_checkpoint, "downsample": 16}
    write_meta(
        ckpt,
        {
            "step": 1,
            "model_spec": spec.to_dict(),
            "stage": {"caption_len": 8, "resolution": 64},
            "config": {"tokenizer": tok},
        },
    )
    mark_complete(ckpt)
    return export_to_hf(root / "run", root / "hf", max_shard_size="150KB")


def test_broken_model_dirs_fail_with_the_file_named(tmp_path: Path, capsys):
    good = export(tmp_path)

    def broken(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(good, target)
        return target

    cases = []
    d = broken("no-shard")
    next(d.glob("model-00002-*.safetensors")).unlink()
    cases.append((d, "weight shard model-00002-of-"))
    d = broken("no-config")
    (d / "config.json").unlink()
    cases.append((d, "config.json is missing"))
    d = broken("other-model")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    cases.append((d, r"mlp.gate_proj.weight has shape (176, 64) but config.json implies (128, 64)"))
    d = broken("no-tokenizer")
    (d / "text_tokenizer.json").unlink()
    cases.append((d, "text_tokenizer.json is missing"))
    d = broken("truncated")
    shard = next(d.glob("model-00001-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    cases.append((d, "model-00001-of-"))
    for model_dir, message in cases:
        code = main(["--model", str(model_dir), "--prompt", "x", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2, model_dir.name
        assert message in err, (model_dir.name, err)
    assert not (tmp_path / "o").exists()
