"""Checkpoint model files: atomic writes, resolving run/step dirs, TP merge/split, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_ts.checkpoint.model_files import (
    CheckpointError,
    iter_full_shapes,
    iter_full_state_dict,
    layer_file_name,
    load_full_state_dict,
    load_into_model,
    mark_complete,
    read_meta,
    resolve_checkpoint,
    write_layer_file,
    write_meta,
    write_model_files,
)
from megatron_ts.config import ModelConfig
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.models.sharding import shard_state_dict
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=64)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def spec_of(window: int = 2, **shape) -> ModelSpec:
    return ModelSpec.from_config(ModelConfig(flavor="debug", **shape), VOCAB, window)


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def save(model: TokenShuffleLM, run: Path, step: int) -> Path:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    write_model_files(model, ckpt, 0, model.spec.shape.num_layers)
    write_meta(ckpt, {"step": step, "model_spec": model.spec.to_dict(), "layout": {"tensor": 1}})
    mark_complete(ckpt)
    return ckpt


def save_tp2(model: TokenShuffleLM, ckpt: Path) -> None:
    """Writes a TP = 2 checkpoint of `model` by splitting its full weights per layer."""
    stages = [model.input_stage, *model.blocks, model.output_stage]
    for idx, stage in enumerate(stages):
        full = {k: v for k, v in stage.state_dict().items() if isinstance(v, torch.Tensor)}
        for rank in range(2):
            (ckpt / "model").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in shard_state_dict(full, rank, 2).items()},
                str(ckpt / "model" / layer_file_name(idx, rank)),
            )
    write_meta(ckpt, {"step": 1, "model_spec": model.spec.to_dict(), "layout": {"tensor": 2}})
    mark_complete(ckpt)


def test_write_layer_file_is_fp32_contiguous_and_atomic(tmp_path: Path):
    model = TokenShuffleLM(spec_of())
    path = write_layer_file(model.blocks[1], 2, 1, tmp_path / "model")
    assert path.name == "layer_002-tp01.safetensors"
    assert [p.name for p in (tmp_path / "model").iterdir()] == [path.name]  # no tmp left
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert "layer.self_attention.linear_qkv.weight" in loaded
    assert not any(k.endswith("_extra_state") for k in loaded)
    assert all(t.dtype == torch.float32 for t in loaded.values())
    assert len(loaded) == 6  # 2 norms, qkv, proj, fc1, fc2


def test_round_trip_and_resolve(tmp_path: Path):
    model = TokenShuffleLM(spec_of(), seed=7)
    save(model, tmp_path, 10)
    ckpt = save(model, tmp_path, 20)
    assert resolve_checkpoint(tmp_path) == ckpt  # run dir -> latest
    assert resolve_checkpoint(tmp_path / "checkpoints") == ckpt
    assert resolve_checkpoint(ckpt) == ckpt
    assert read_meta(ckpt)["step"] == 20
    full = load_full_state_dict(ckpt)
    expected = tensors(model)
    assert set(full) == {k for k in expected if not k.endswith("_extra_state")}
    for k, v in full.items():
        assert torch.equal(v, expected[k]), k
    shapes = dict(iter_full_shapes(ckpt))
    assert shapes == {k: tuple(v.shape) for k, v in full.items()}

    other = TokenShuffleLM(spec_of(), seed=8)
    assert load_into_model(other, tmp_path, 0, 1) == []
    for k, v in tensors(other).items():
        assert torch.equal(v, expected[k]), k


def test_refuses_incomplete_and_missing(tmp_path: Path):
    model = TokenShuffleLM(spec_of())
    good = save(model, tmp_path, 1)
    partial = tmp_path / "checkpoints" / "step_00000002"
    write_model_files(model, partial, 0, 2)
    write_meta(partial, {"step": 2, "model_spec": model.spec.to_dict()})
    with pytest.raises(CheckpointError, match="no COMPLETE marker.*step_00000001"):
        resolve_checkpoint(partial)
    # without `latest`, a checkpoints dir picks the newest complete step
    (tmp_path / "checkpoints" / "latest").unlink()
    assert resolve_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (good / "model" / layer_file_name(3, 0)).unlink()
    with pytest.raises(CheckpointError, match=r"missing for layer indices \[3\]"):
        load_full_state_dict(good)


def test_tp2_files_merge_and_reshard(tmp_path: Path):
    model = TokenShuffleLM(spec_of(window=2, num_kv_heads=2), seed=3)
    ckpt = tmp_path / "step_00000001"
    save_tp2(model, ckpt)
    full = load_full_state_dict(ckpt)
    for k, v in tensors(model).items():
        if not k.endswith("_extra_state"):
            assert torch.equal(full[k], v), k  # merge_tp undoes the split (stride-2 fc1 too)
    other = TokenShuffleLM(spec_of(window=2, num_kv_heads=2), seed=4)
    load_into_model([other.input_stage, *other.blocks, other.output_stage], ckpt, 0, 1)
    for k, v in tensors(other).items():
        assert torch.equal(v, full[k]), k
    # a pipeline slice given as {layer index: module} loads only its layers
    third = TokenShuffleLM(spec_of(window=2, num_kv_heads=2), seed=5)
    load_into_model({3: third.output_stage}, ckpt, 0, 1)
    assert torch.equal(third.output_stage.head.weight, full["output_stage.head.weight"])
    assert not torch.equal(
        third.blocks[0].layer.mlp.linear_fc1.weight, full["blocks.0.layer.mlp.linear_fc1.weight"]
    )


def test_mismatches_name_the_parameter(tmp_path: Path):
    model = TokenShuffleLM(spec_of(window=1))
    save(model, tmp_path, 1)
    wider = TokenShuffleLM(spec_of(window=1, ffn_hidden_size=128))
    with pytest.raises(
        CheckpointError,
        match=r"blocks\.0\.layer\.mlp\.linear_fc1\.weight.*\(352, 64\).*\(256, 64\)",
    ):
        load_into_model(wider, tmp_path, 0, 1)
    shuffled = TokenShuffleLM(spec_of(window=2))
    with pytest.raises(CheckpointError, match=r"input_stage\.shuffle\.compress\.weight.*missing"):
        load_into_model(shuffled, tmp_path, 0, 1)
    left = load_into_model(shuffled, tmp_path, 0, 1, allow_missing=("shuffle.",))
    assert "input_stage.shuffle.compress.weight" in left
    assert "output_stage.unshuffle.expand.weight" in left
    assert torch.equal(shuffled.output_stage.head.weight, model.output_stage.head.weight)
    with pytest.raises(
        CheckpointError, match=r"shuffle\..* is in the checkpoint but not in the model"
    ):
        load_into_model(TokenShuffleLM(spec_of(window=1)), save(shuffled, tmp_path / "s2", 1), 0, 1)


def test_truncated_file_names_file_and_previous_checkpoint(tmp_path: Path):
    model = TokenShuffleLM(spec_of())
    save(model, tmp_path, 1)
    ckpt = save(model, tmp_path, 2)
    victim = ckpt / "model" / layer_file_name(1, 0)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"layer_001-tp00\.safetensors is truncated or corrupt.*step_00000001"
    ):
        load_into_model(TokenShuffleLM(spec_of()), tmp_path, 0, 1)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        list(iter_full_state_dict(ckpt))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["format"] = "other/9"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        read_meta(ckpt)
