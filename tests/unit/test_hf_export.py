"""Hugging Face export: layouts, logits parity with the training model, loading, round trips."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_ts.checkpoint.model_files import (
    load_full_state_dict,
    load_into_model,
    mark_complete,
    write_meta,
    write_model_files,
)
from megatron_ts.config import ModelConfig
from megatron_ts.hf.export import export_to_hf
from megatron_ts.hf.import_hf import import_from_hf
from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM, grid_to_windows
from megatron_ts.hf.weights import AttentionShape, fuse_qkv, split_qkv
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.testing import randomize_weights
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=64)  # 325 ids, padded to 384
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_distributed("gloo")
    init_model_parallel(1, 1)


def make_checkpoint(run: Path, window: int, seed: int = 11, **shape) -> TokenShuffleLM:
    """A randomised debug model saved as a complete TP = 1 checkpoint in `run`."""
    spec = ModelSpec.from_config(ModelConfig(flavor="debug", **shape), VOCAB, window)
    model = TokenShuffleLM(spec, seed=seed).eval()
    randomize_weights(model, seed)
    ckpt = run / "checkpoints" / "step_00000005"
    write_model_files(model, ckpt, 0, spec.shape.num_layers)
    stage = {"index": 0, "caption_len": 6, "resolution": 128, "shuffle_window": window}
    write_meta(ckpt, {"step": 5, "model_spec": spec.to_dict(), "stage": stage})
    mark_complete(ckpt)
    return model


def random_batch(window: int, b: int = 2, caption: int = 6, grid: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB.size, (b, caption + 2), generator=gen)
    text[:, 0], text[:, -1] = VOCAB.bos_id, VOCAB.boi_id
    codes = torch.randint(0, VOCAB.codebook_size, (b, grid, grid), generator=gen)
    return text, codes


def max_diffs(model: TokenShuffleLM, hf, window: int) -> tuple[float, float]:
    text, codes = random_batch(window)
    with torch.no_grad():
        text_logits, image_logits = model(text, codes)  # (T-1, B, V), (N, B, s^2, V)
        out = hf(input_ids=text, image_windows=grid_to_windows(codes, window))
    t, n = text_logits.shape[0], image_logits.shape[0]
    d_text = (out.logits[:, :t] - text_logits.transpose(0, 1)).abs().max().item()
    d_img = (out.image_logits[:, :n] - image_logits.transpose(0, 1)).abs().max().item()
    return d_text, d_img


def test_qkv_split_is_group_interleaved():
    attn = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=1)
    # rows of megatron's fused QKV for 2 groups x (2 q + k + v), head_dim 1
    fused = torch.tensor([[0.0], [1], [10], [20], [2], [3], [11], [21]])
    q, k, v = split_qkv(fused, attn)
    assert q.flatten().tolist() == [0, 1, 2, 3]
    assert k.flatten().tolist() == [10, 11]
    assert v.flatten().tolist() == [20, 21]
    assert torch.equal(fuse_qkv(q, k, v, attn), fused)


@pytest.mark.parametrize(("window", "shape"), [(1, {}), (2, {"num_kv_heads": 2})])
def test_export_logits_match_training_model(tmp_path: Path, window: int, shape: dict):
    model = make_checkpoint(tmp_path / "run", window, **shape)
    out = export_to_hf(tmp_path / "run", tmp_path / "hf")
    hf = TokenShuffleForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    d_text, d_img = max_diffs(model, hf, window)
    assert d_text < TOL and d_img < TOL, (d_text, d_img)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 384 and config["caption_len"] == 6
    assert config["resolutions"] == [128] and config["shuffle_window"] == window
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("TokenShuffleForCausalLM")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["cfg_schedule"] == "half-linear" and gen["resolution"] == 128


def test_wrong_layouts_are_caught(tmp_path: Path):
    """Negative controls: the two classic export bugs change the logits far beyond TOL."""
    model = make_checkpoint(tmp_path / "run", 2, num_kv_heads=2)
    export_to_hf(tmp_path / "run", tmp_path / "hf")
    hf = TokenShuffleForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    attn = hf.model.layers[0].self_attn
    with torch.no_grad():  # q/k rows in "interleaved" RoPE order instead of rotate-half
        for proj in (attn.q_proj, attn.k_proj):
            w = proj.weight.view(-1, 16, 64)
            proj.weight.copy_(torch.cat([w[:, 0::2], w[:, 1::2]], dim=1).view(-1, 64))
    assert max(max_diffs(model, hf, 2)) > 1e-2
    hf = TokenShuffleForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf.config.rope_theta = 500000.0
    assert max(max_diffs(model, hf, 2)) > 1e-2


def test_auto_model_trust_remote_code_and_shards(tmp_path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = make_checkpoint(tmp_path / "run", 2)
    export_to_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert AutoConfig.from_pretrained(tmp_path / "hf", trust_remote_code=True).model_type == (
        "token_shuffle"
    )
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert type(hf).__module__.startswith("transformers_modules")  # the copied code, not ours
    assert max(max_diffs(model, hf.eval(), 2)) < TOL


def test_export_code_imports_reach_every_file_without_a_cycle():
    """transformers 4.45 copies into its module cache only the relative imports of the modeling
    file itself, and its `get_relative_import_files` never ends on a cycle of relative imports:
    the files an export ships must import each other acyclically, and the modeling file must
    name every one it reaches."""
    import re

    from megatron_ts.hf.export import HF_DIR, MODELING_FILES

    pattern = re.compile(r"^\s*(?:from\s+\.(\S+)\s+import|import\s+\.(\S+)\s*$)", re.M)
    graph = {}
    for name in MODELING_FILES:
        text = (HF_DIR / name).read_text()
        graph[name.removesuffix(".py")] = {a or b for a, b in pattern.findall(text)}
    assert all(dep in graph for deps in graph.values() for dep in deps), graph  # all shipped

    def reach(node: str, path: tuple[str, ...]) -> set[str]:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        return set().union(*(reach(dep, (*path, node)) | {dep} for dep in graph[node]))

    modeling = "modeling_token_shuffle"
    reached = reach(modeling, ())
    for name in graph:
        reach(name, ())
    assert reached == graph[modeling] == set(graph) - {modeling}


_NO_MEGATRON = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron_ts", "megatron", "deepspeed"):
            raise ImportError(f"{name} is blocked: the export must not need it")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[257, 65, 66, 256, 256, 256, 256, 259]])
windows = torch.arange(16 * 4).reshape(1, 16, 4) % 64
with torch.no_grad():
    out = model(input_ids=ids, image_windows=windows)
print(repr(out.image_logits.double().sum().item()))
"""


def test_export_loads_without_megatron_ts(tmp_path: Path):
    import subprocess
    import sys

    make_checkpoint(tmp_path / "run", 2)
    export_to_hf(tmp_path / "run", tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MEGATRON, str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = TokenShuffleForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([[257, 65, 66, 256, 256, 256, 256, 259]])
    windows = torch.arange(16 * 4).reshape(1, 16, 4) % 64
    with torch.no_grad():
        expected = hf(input_ids=ids, image_windows=windows).image_logits.double().sum().item()
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-3)


def test_kv_cache_forward_equals_full_forward(tmp_path: Path):
    make_checkpoint(tmp_path / "run", 2)
    export_to_hf(tmp_path / "run", tmp_path / "hf")
    hf = TokenShuffleForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    text, codes = random_batch(2)
    windows = grid_to_windows(codes, 2)  # (B, 16, 4)
    with torch.no_grad():
        full = hf(input_ids=text, image_windows=windows).image_logits
        cache = hf.new_cache()
        steps = [hf(input_ids=text, past_key_values=cache, text_logits=False).image_logits]
        steps.append(hf(image_windows=windows[:, :5], past_key_values=cache).image_logits)
        for i in range(5, windows.shape[1]):
            steps.append(
                hf(image_windows=windows[:, i : i + 1], past_key_values=cache).image_logits
            )
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape == (2, 17, 4, 384)
    assert (cached - full).abs().max().item() < 1e-5


def test_round_trip_export_import(tmp_path: Path):
    model = make_checkpoint(tmp_path / "run", 2, num_kv_heads=2)
    export_to_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="200KB")
    ckpt = import_from_hf(tmp_path / "hf", tmp_path / "back")
    back = load_full_state_dict(ckpt)
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(back[name], tensor), name
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["stage"]["caption_len"] == 6 and meta["model_spec"]["shuffle_window"] == 2


@pytest.mark.parametrize("tied", [False, True])
def test_llama_import_keeps_text_logits(tmp_path: Path, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
    )
    llama = LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    ckpt = import_from_hf(tmp_path / "llama", tmp_path / "ckpt", codebook_size=64, shuffle_window=2)
    meta = json.loads((ckpt / "meta.json").read_text())
    spec = ModelSpec.from_dict(meta["model_spec"])
    assert spec.vocab.text_size == 300 and spec.padded_vocab == 384 and spec.rope_theta == 50000.0
    model = TokenShuffleLM(spec, seed=99).eval()
    load_into_model(model, ckpt, 0, 1)
    # token-shuffle starts as compress/concat (+ identity residual blocks)
    assert torch.count_nonzero(model.input_stage.shuffle.blocks[0].fc2.weight) == 0
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, 300, (2, 10), generator=gen)
    codes = torch.randint(0, 64, (2, 4, 4), generator=gen)
    with torch.no_grad():
        ours, _ = model(text, codes)  # (T-1, B, 384)
        ref = llama(input_ids=text).logits  # (B, T, 300)
    diff = (ours.transpose(0, 1)[..., :300] - ref[:, :9]).abs().max().item()
    assert diff < TOL, diff


def test_generation_config_takes_the_runs_sampling_section():
    from megatron_ts.hf.export import generation_defaults

    default = generation_defaults({})
    assert default["do_sample"] and default["cfg_scale"] == 7.5
    assert default["cfg_schedule"] == "half-linear"
    greedy = generation_defaults({"sampling": {"cfg_scale": 2.0, "temperature": 0.0}})
    assert not greedy["do_sample"] and greedy["cfg_scale"] == 2.0
    # transformers warns on load about sampling flags beside do_sample = false
    assert not {"temperature", "top_k", "top_p"} & set(greedy)
    from transformers import GenerationConfig

    from megatron_ts.hf.generation_token_shuffle import SamplingConfig

    for fields in (default, greedy):
        GenerationConfig(**fields).validate(strict=True)  # raises on what it would warn about
    settings = SamplingConfig.from_generation_config(GenerationConfig(**greedy))
    assert (settings.temperature, settings.cfg_scale) == (0.0, 2.0)

    class Transformers4Config:  # do_sample = False is 4.x's default, so its diff leaves it out
        do_sample = False

        def to_diff_dict(self):
            return {k: v for k, v in greedy.items() if k != "do_sample"}

    assert SamplingConfig.from_generation_config(Transformers4Config()).temperature == 0.0


def test_config_sampling_defaults_are_the_export_samplers_defaults():
    """`[sampling]` (SamplingDefaults) and the export's SamplingConfig name the same settings
    with the same defaults; the export's class adds the per-call ones (seed, size, cache)."""
    from megatron_ts.config import SamplingDefaults
    from megatron_ts.hf.generation_token_shuffle import SamplingConfig

    defaults = dataclasses.asdict(SamplingDefaults())
    call = dataclasses.asdict(SamplingConfig())
    assert defaults == {k: call[k] for k in defaults}
    assert set(call) - set(defaults) == {"seed", "resolution", "size", "use_kv_cache"}


# -- window positions and non-square images (issue 21) -----------------------------------------

BUCKET_CONFIG = {  # a run without a curriculum trained on three buckets at 128 px (16x VQ)
    "tokenizer": {"downsample": 16},
    "data": {"resolution": 128, "buckets": ["1:1", "2:1", "1:2"], "grid_multiple": 2},
}


def make_bucketed_checkpoint(run: Path, seed: int = 11) -> TokenShuffleLM:
    """A randomised s = 2 debug model with window tables, its tables random too (not zero)."""
    spec = ModelSpec.from_config(ModelConfig(flavor="debug", max_windows_per_side=6), VOCAB, 2)
    model = TokenShuffleLM(spec, seed=seed).eval()
    randomize_weights(model, seed)
    assert model.input_stage.window_positions.row.abs().min() > 0
    ckpt = run / "checkpoints" / "step_00000005"
    write_model_files(model, ckpt, 0, spec.shape.num_layers)
    stage = {"caption_len": 6, "resolution": 128, "shuffle_window": 2}
    meta = {"step": 5, "model_spec": spec.to_dict(), "stage": stage, "config": BUCKET_CONFIG}
    write_meta(ckpt, meta)
    mark_complete(ckpt)
    return model


def test_window_positions_logits_match_full_and_cached_on_a_non_square_sample(tmp_path: Path):
    """4 x 8 codes at s = 2 (2 x 4 windows): the export adds the window tables where the
    training model does, in one forward and in KV-cached decoding one window at a time."""
    model = make_bucketed_checkpoint(tmp_path / "run")
    export_to_hf(tmp_path / "run", tmp_path / "hf")
    hf = TokenShuffleForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.max_windows_per_side == 6
    assert torch.equal(
        hf.model.window_positions.cols, model.input_stage.window_positions.cols.detach()
    )
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(0, VOCAB.size, (2, 8), generator=gen)
    text[:, 0], text[:, -1] = VOCAB.bos_id, VOCAB.boi_id
    codes = torch.randint(0, VOCAB.codebook_size, (2, 4, 8), generator=gen)
    windows = grid_to_windows(codes, 2)  # (B, 8, 4)
    with torch.no_grad():
        text_ref, img_ref = model(text, codes)  # (T-1, B, V), (8, B, 4, V)
        full = hf(input_ids=text, image_windows=windows, window_grid=(2, 4))
        cache = hf.new_cache()
        steps = [hf(input_ids=text, past_key_values=cache, window_grid=(2, 4)).image_logits]
        for i in range(7):
            out = hf(image_windows=windows[:, i : i + 1], past_key_values=cache)
            steps.append(out.image_logits)
        transposed = hf(input_ids=text, image_windows=windows, window_grid=(4, 2))
    ref = img_ref.transpose(0, 1)  # (B, 8, 4, V)
    assert (full.logits[:, :7] - text_ref.transpose(0, 1)).abs().max().item() < TOL
    assert (full.image_logits[:, :8] - ref).abs().max().item() < TOL
    cached = torch.cat(steps, dim=1)
    assert cached.shape == ref.shape == (2, 8, 4, 384)
    assert (cached - ref).abs().max().item() < TOL
    assert (cached - full.image_logits[:, :8]).abs().max().item() < 1e-5
    # negative control: the same codes read as 4 x 2 windows are another image
    assert (transposed.image_logits[:, :8] - ref).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match=r"pass window_grid=\(rows, cols\)"):
        hf(input_ids=text, image_windows=windows)
    with pytest.raises(ValueError, match="exceeds max_windows_per_side = 6"):
        hf(input_ids=text, image_windows=windows, window_grid=(1, 8))
    assert hf(input_ids=text[:, :-1]).image_logits is None  # text only: no grid needed


def test_bucketed_export_lists_its_sizes_and_round_trips(tmp_path: Path):
    model = make_bucketed_checkpoint(tmp_path / "run")
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="200KB")
    config = json.loads((out / "config.json").read_text())
    assert config["resolutions"] == [128] and config["max_windows_per_side"] == 6
    assert config["buckets"] == [
        {"name": "1:1", "width": 128, "height": 128, "resolution": 128},
        {"name": "2:1", "width": 192, "height": 96, "resolution": 128},
        {"name": "1:2", "width": 96, "height": 192, "resolution": 128},
    ]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["size"] == "128x128" and gen["sizes"] == ["128x128", "192x96", "96x192"]
    assert "resolution" not in gen
    card = (out / "README.md").read_text()
    assert "192x96 (2:1), 96x192 (1:2)" in card and "--size 192x96" in card
    ckpt = import_from_hf(out, tmp_path / "back")
    back = load_full_state_dict(ckpt)
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(back[name], tensor), name
    assert "input_stage.window_positions.rows" in back
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["model_spec"]["max_windows_per_side"] == 6
    again = export_to_hf(ckpt, tmp_path / "hf2")
    assert json.loads((again / "config.json").read_text())["buckets"] == config["buckets"]


def test_old_square_config_without_bucket_fields_loads():
    """config.json files written before buckets have neither field: square, no tables."""
    from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig

    old = TokenShuffleConfig.from_dict({"resolutions": [64], "vq_downsample": 16})
    assert old.max_windows_per_side == 0 and old.buckets == []
    assert old.trained_sizes() == [("1:1", 64, 64)]
    assert TokenShuffleForCausalLM(old).model.window_positions is None


def test_import_of_a_curriculum_export_keeps_every_stage_size(tmp_path: Path):
    """An export of a two-stage curriculum (64 px then 128 px, both s = 2 with buckets) lists
    both stages' sizes; importing it and exporting again lists the same resolutions and sizes."""
    spec = ModelSpec.from_config(ModelConfig(flavor="debug", max_windows_per_side=6), VOCAB, 2)
    model = TokenShuffleLM(spec, seed=5).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000009"
    write_model_files(model, ckpt, 0, spec.shape.num_layers)
    stages = [
        {"resolution": 64, "shuffle_window": 2, "caption_len": 6, "buckets": ["1:1", "2:1"]},
        {"resolution": 128, "shuffle_window": 2, "caption_len": 6, "buckets": ["1:1", "1:2"]},
    ]
    config = {
        "tokenizer": {"downsample": 16},
        "data": {"grid_multiple": 2},
        "curriculum": {"stages": stages},
    }
    stage = {"index": 1, "caption_len": 6, "resolution": 128}
    write_meta(ckpt, {"step": 9, "model_spec": spec.to_dict(), "stage": stage, "config": config})
    mark_complete(ckpt)
    first = json.loads(
        (export_to_hf(tmp_path / "run", tmp_path / "hf") / "config.json").read_text()
    )
    assert first["resolutions"] == [128, 64]
    assert [(b["name"], b["resolution"]) for b in first["buckets"]] == [
        ("1:1", 128),
        ("1:2", 128),
        ("1:1", 64),
        ("2:1", 64),
    ]
    back = import_from_hf(tmp_path / "hf", tmp_path / "back")
    again = json.loads((export_to_hf(back, tmp_path / "hf2") / "config.json").read_text())
    assert again["resolutions"] == first["resolutions"]
    assert again["buckets"] == first["buckets"]
