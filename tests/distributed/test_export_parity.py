"""Exports of TP = 2 and PP = 2 checkpoints give the logits of the training model that wrote them.

One spawned 2-rank gloo world writes four checkpoints with the engine's writer
(`write_layer_file`): {TP = 2, PP = 2} x {s = 1, s = 2}, with random weights everywhere (the
zero-initialised residual branches too) and grouped-query attention, and returns the logits the
distributed model computed: TP = 2 gathers the vocabulary-parallel logits, PP = 2 sends the
hidden states from stage 0 to stage 1 as the pipeline does. The parent exports each checkpoint on
CPU without the world, loads it with transformers, and compares in fp32 (max abs diff 1e-4).

`check_export_parity(run_dir)` takes any run directory, so a run trained by `ts-train` is checked
the same way (set TS_PARITY_RUN_DIR to check an existing one).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from megatron_ts.hf.weights import AttentionShape
from tests.distributed.launcher import run_distributed

TOL = 1e-4
SEED = 77
CAPTION, GRID = 6, 8
CASES = [("tp2", 1), ("tp2", 2), ("pp2", 1), ("pp2", 2)]


def _spec(window: int, tp: int):
    from megatron_ts.config import ModelConfig
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.vocab import VocabLayout

    vocab = VocabLayout(text_size=256, codebook_size=64)
    model_cfg = ModelConfig(flavor="debug", num_kv_heads=2)
    return ModelSpec.from_config(model_cfg, vocab, window, tensor_parallel=tp)


def _batch(window: int):
    gen = torch.Generator().manual_seed(window)
    text = torch.randint(0, 325, (2, CAPTION + 2), generator=gen)
    text[:, 0], text[:, -1] = 257, 259  # <bos>, <boi>
    codes = torch.randint(0, 64, (2, GRID, GRID), generator=gen)
    return text, codes


def _randomize(stages: dict, num_layers: int, tp_rank: int, tp_world: int) -> None:
    """Random full weights per parameter name (same on every rank), then this rank's TP shard."""
    from megatron_ts.checkpoint.model_files import layer_prefix
    from megatron_ts.models.sharding import split_tp, tp_rule

    with torch.no_grad():
        for idx, module in stages.items():
            for key, p in module.named_parameters():
                name = layer_prefix(idx, num_layers) + key
                shape = list(p.shape)
                rule = tp_rule(key)
                if rule is not None:
                    shape[rule[0]] *= tp_world
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + SEED)
                if p.dim() == 1:
                    full = 1.0 + 0.1 * torch.randn(shape, generator=gen)
                else:
                    full = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
                p.copy_(split_tp(key, full, tp_rank, tp_world))


def _save(stages: dict, ckpt: Path, tp_rank: int, spec, layout: dict, rank: int) -> None:
    import torch.distributed as dist

    from megatron_ts.checkpoint.model_files import mark_complete, write_layer_file, write_meta

    for idx, module in stages.items():
        write_layer_file(module, idx, tp_rank, ckpt / "model")
    dist.barrier()
    if rank == 0:
        stage = {"index": 0, "caption_len": CAPTION, "resolution": GRID * 16}
        write_meta(
            ckpt, {"step": 2, "model_spec": spec.to_dict(), "layout": layout, "stage": stage}
        )
        mark_complete(ckpt)
    dist.barrier()


def _forward(kind: str, stages: dict, text, codes, spec, rank: int):
    """Logits of the distributed model: TP = 2 gathers the vocabulary, PP = 2 sends hidden."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with torch.no_grad():
        if kind == "tp2":
            x = (text, codes)
            for idx in sorted(stages):
                x = stages[idx].eval()(x)
            logits = []
            for part in x:  # vocabulary-parallel -> full vocabulary
                pieces = [torch.empty_like(part) for _ in range(2)]
                group = parallel_state.get_tensor_model_parallel_group()
                dist.all_gather(pieces, part.contiguous(), group=group)
                logits.append(torch.cat(pieces, dim=-1))
        elif rank == 0:
            x = (text, codes)
            for idx in sorted(stages):
                x = stages[idx].eval()(x)
            dist.send(x[0].contiguous(), dst=1)  # (S, B, d) to the next stage
            logits = None
        else:
            s = text.shape[1] + (codes.shape[1] // spec.shuffle_window) ** 2
            hidden = torch.empty(s, text.shape[0], spec.shape.hidden_size)
            dist.recv(hidden, src=0)
            x = (hidden, torch.tensor([text.shape[1]]))
            for idx in sorted(stages):
                x = stages[idx].eval()(x)
            logits = list(x)
    gathered = [None, None]
    dist.all_gather_object(gathered, logits)
    return gathered[0] if gathered[0] is not None else gathered[1]


def _local_stages(kind: str, spec, rank: int) -> tuple[dict, int]:
    """This rank's layer modules for the layout, and its TP rank."""
    from megatron_ts.distributed.init import init_model_parallel
    from megatron_ts.models.model import build_layers

    if kind == "tp2":
        init_model_parallel(2, 1)
        return dict(enumerate(build_layers(spec, SEED))), rank
    init_model_parallel(1, 2)
    n = spec.shape.num_layers
    everything = build_layers(spec, SEED)
    mine = range(0, 1 + n // 2) if rank == 0 else range(1 + n // 2, n + 2)
    return {i: everything[i] for i in mine}, 0


def _worker(rank: int, world: int, root: str, trained: list) -> dict:
    import dataclasses

    from megatron_ts.checkpoint.model_files import load_into_model, read_meta, resolve_checkpoint
    from megatron_ts.distributed.init import init_distributed
    from megatron_ts.models.model import ModelSpec

    init_distributed("gloo")
    out = {}
    for kind, window in CASES:
        text, codes = _batch(window)
        ckpt = Path(root) / f"{kind}-s{window}" / "checkpoints" / "step_00000002"
        tp = 2 if kind == "tp2" else 1
        spec = _spec(window, tp=tp)
        stages, tp_rank = _local_stages(kind, spec, rank)
        _randomize(stages, spec.shape.num_layers, tp_rank, tp)
        out[f"{kind}-s{window}"] = _forward(kind, stages, text, codes, spec, rank)
        layout = {"tensor": tp, "pipeline": 2 // tp, "data": 1}
        _save(stages, ckpt, tp_rank, spec, layout, rank)

    # runs trained by ts-train (its `main` on every rank), then reloaded into the same layout
    for kind, run_dir, overrides in trained:
        from pretrain.train import main as ts_train  # the `ts-train` console script

        config = Path(__file__).resolve().parents[2] / "pretrain/configs/debug.toml"
        argv = ["--config", str(config), "--job.run_dir", run_dir, "--data.num_workers", "0"]
        if ts_train([*argv, *overrides]) != 0:
            raise RuntimeError(f"ts-train {run_dir} failed")
        ckpt = resolve_checkpoint(run_dir)
        meta = read_meta(ckpt)
        spec = ModelSpec.from_dict(meta["model_spec"])
        spec = dataclasses.replace(spec, tensor_parallel=2 if kind == "tp2" else 1)
        stages, tp_rank = _local_stages(kind, spec, rank)
        load_into_model(stages, ckpt, tp_rank, spec.tensor_parallel)
        text, codes = _trained_batch(spec, meta["stage"])
        out[Path(run_dir).name] = _forward(kind, stages, text, codes, spec, rank)
    return out


def _trained_batch(spec, stage: dict):
    gen = torch.Generator().manual_seed(5)
    text = torch.randint(0, spec.vocab.size, (2, stage["caption_len"] + 2), generator=gen)
    text[:, 0], text[:, -1] = spec.vocab.bos_id, spec.vocab.boi_id
    codes = torch.randint(
        0, spec.vocab.codebook_size, (2, stage["grid"], stage["grid"]), generator=gen
    )
    return text, codes


def hf_logits(export_dir: Path, text: torch.Tensor, codes: torch.Tensor):
    """(text logits (B, T-1, V), image logits (B, N, s^2, V)) of an export via transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True).eval()
    s = hf.config.shuffle_window
    from megatron_ts.hf.modeling_token_shuffle import grid_to_windows

    with torch.no_grad():
        out = hf(input_ids=text, image_windows=grid_to_windows(codes, s))
    n = (codes.shape[1] // s) ** 2
    return out.logits[:, : text.shape[1] - 1], out.image_logits[:, :n]


def check_export_parity(run_dir: Path, out_dir: Path, reference=None, batch=None) -> float:
    """Exports `run_dir` and compares HF logits with the training model's; returns max diff.

    Args:
        run_dir: run, checkpoints or step directory.
        out_dir: where to export.
        reference: (text logits (T-1, B, V), image logits (N, B, s^2, V)) the training model
            computed on `batch`; None computes them with a TP = 1 TokenShuffleLM loaded from the
            checkpoint (needs a 1-rank parallel state in this process).
        batch: (text, codes); None builds one from the checkpoint's stage (`_trained_batch`).
    """
    import dataclasses

    from megatron_ts.checkpoint.model_files import load_into_model, read_meta, resolve_checkpoint
    from megatron_ts.hf.export import export_to_hf
    from megatron_ts.models.model import ModelSpec, TokenShuffleLM

    ckpt = resolve_checkpoint(run_dir)
    meta = read_meta(ckpt)
    spec = ModelSpec.from_dict(meta["model_spec"])
    export_to_hf(ckpt, out_dir)
    text, codes = batch if batch is not None else _trained_batch(spec, meta["stage"])
    if reference is None:
        model = TokenShuffleLM(dataclasses.replace(spec, tensor_parallel=1)).eval()
        load_into_model(model, ckpt, 0, 1)
        with torch.no_grad():
            reference = model(text, codes)
    text_ref, img_ref = reference
    text_hf, img_hf = hf_logits(out_dir, text, codes)
    d_text = (text_hf - text_ref.transpose(0, 1)).abs().max().item()
    d_img = (img_hf - img_ref.transpose(0, 1)).abs().max().item()
    return max(d_text, d_img)


def _debug_export(out: Path) -> dict[str, torch.Tensor]:
    """A random HF export shaped like pretrain/configs/debug.toml's model; returns its weights."""
    from megatron_ts.config import ModelConfig
    from megatron_ts.hf.build import hf_config_from_spec
    from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.vocab import VocabLayout

    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VocabLayout(256, 512), 2)
    torch.manual_seed(0)
    model = TokenShuffleForCausalLM(hf_config_from_spec(spec, 16, [64], 8))
    model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tp2_and_pp2_checkpoints_export_with_exact_logits(tmp_path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    trained = [
        (
            "tp2",
            str(tmp_path / "trained-tp2-s2"),
            ["--train.steps", "2", "--parallel.tensor", "2", "--train.global_batch", "2"],
        ),
        (
            "pp2",
            str(tmp_path / "trained-pp2-s1"),
            ["--train.steps", "2", "--parallel.pipeline", "2", "--model.shuffle_window", "1"],
        ),
    ]
    # initialise training from an HF export: ts-convert from-hf, then checkpoint.load at TP = 2
    reference_hf = _debug_export(tmp_path / "hf-init")
    from megatron_ts.convert.cli import main as convert

    assert convert(["from-hf", str(tmp_path / "hf-init"), str(tmp_path / "imported")]) == 0
    load = ["--checkpoint.load", str(tmp_path / "imported"), "--optim.lr", "1e-12"]
    load += ["--optim.min_lr", "1e-13", "--train.steps", "1", "--parallel.tensor", "2"]
    trained.append(("tp2", str(tmp_path / "trained-from-hf"), load + ["--train.global_batch", "2"]))
    results = run_distributed(_worker, 2, str(tmp_path), trained)[0]
    diffs = {}
    for name, reference in results.items():
        if name.startswith("trained"):
            from megatron_ts.checkpoint.model_files import read_meta, resolve_checkpoint
            from megatron_ts.models.model import ModelSpec

            meta = read_meta(resolve_checkpoint(tmp_path / name))
            batch = _trained_batch(ModelSpec.from_dict(meta["model_spec"]), meta["stage"])
        else:
            batch = _batch(int(name[-1]))
        diffs[name] = check_export_parity(
            tmp_path / name, tmp_path / f"hf-{name}", reference, batch
        )
    print("max abs diff per case:", diffs)
    assert all(d < TOL for d in diffs.values()), diffs
    # the layouts really were sharded: two TP files per layer, one per layer for PP
    assert len(list((tmp_path / "tp2-s2/checkpoints/step_00000002/model").iterdir())) == 2 * 4
    assert len(list((tmp_path / "pp2-s2/checkpoints/step_00000002/model").iterdir())) == 4
    # the run that started from the export holds the export's weights (lr 1e-12, one step)
    from megatron_ts.checkpoint.model_files import load_full_state_dict
    from megatron_ts.hf.weights import to_hf

    after = load_full_state_dict(tmp_path / "trained-from-hf")
    attn = AttentionShape(num_heads=4, num_kv_heads=4, head_dim=16)
    worst = 0.0
    for name, tensor in after.items():
        for hf_name, part in to_hf(name, tensor, attn):
            worst = max(worst, (part - reference_hf[hf_name]).abs().max().item())
    assert worst < 1e-6, worst
    trained = json.loads(
        (tmp_path / "trained-pp2-s1/checkpoints/step_00000002/meta.json").read_text()
    )
    assert trained["layout"]["pipeline"] == 2 and trained["train_state"]["global_step"] == 2


@pytest.mark.skipif(not os.environ.get("TS_PARITY_RUN_DIR"), reason="set TS_PARITY_RUN_DIR=RUN")
def test_existing_run_exports_with_exact_logits(tmp_path: Path):
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    diff = check_export_parity(Path(os.environ["TS_PARITY_RUN_DIR"]), tmp_path / "hf")
    assert diff < TOL, diff
