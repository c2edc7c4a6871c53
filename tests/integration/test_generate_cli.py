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


def make_vq(path: Path, codebook: int = 64, seed: int = 0) -> Path:
    """A small random native VQ (16x downsampling), saved as `ts-data train-vq` saves one."""
    from megatron_ts.hf.vq_token_shuffle import NativeVQ, NativeVQConfig, save_native

    torch.manual_seed(seed)
    vq = NativeVQ(NativeVQConfig(codebook_size=codebook, downsample=16, channels=[8, 8, 8, 8]))
    save_native(vq, path)
    return path


def export(
    root: Path,
    vq_checkpoint: str | None = None,
    vq_identity: str = "native",
    data: dict | None = None,
    max_windows_per_side: int = 0,
) -> Path:
    """A randomised debug model (s = 2, 64 px at 16x -> 4x4 codes) exported to root/hf; `data`
    is the run's [data] section (buckets), its window tables random too."""
    vocab = VocabLayout(256, 64, vq_tokenizer=vq_identity)
    model_config = ModelConfig(flavor="debug", max_windows_per_side=max_windows_per_side)
    spec = ModelSpec.from_config(model_config, vocab, 2)
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
            "stage": {"caption_len": 8, "resolution": (data or {}).get("resolution", 64)},
            "config": {"tokenizer": tok, **({"data": data} if data else {})},
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
    # a prompts file that is not UTF-8: one line naming it, no traceback
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 on the left\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(good), "--prompts-file", str(tmp_path / "latin1.txt"), "--out", "o"])
    assert "latin1.txt is not UTF-8 text (byte 5): save it as UTF-8" in str(exit_.value.code)


_WITHOUT_MEGATRON = r"""
import hashlib, json, shutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron_ts", "megatron", "deepspeed"):
            raise ImportError(f"{name} is blocked: the export must not need it")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM

model_dir, no_vq_dir = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
pipe = model.pipeline()
pipe.set_progress_bar_config(disable=True)
prompts = ["a red square", "blue sky"]
out = pipe(prompts, num_images_per_prompt=2, seed=5)  # one batch: 4 images x [cond; uncond]
result = {
    "pixels": [hashlib.sha256(im.tobytes()).hexdigest() for im in out.images],
    "sizes": [list(im.size) for im in out.images],
    "seeds": out.seeds,
    "settings": out.settings,
}
ids = pipe.prompt_ids(prompts)
grids = model.generate(ids, seed=[5, 7])  # generation_config.json defaults
result["generate_equals_pipeline"] = bool(torch.equal(grids, out.codes[::2]))
errors = {}
for name, call in {
    "empty": lambda: pipe([]),
    "resolution": lambda: pipe("x", resolution=128),
    "guidance": lambda: pipe("x", guidance_scale=0.5),
    "generate_guidance": lambda: model.generate(ids, guidance_scale=0.5),
    "no_vq": lambda: type(pipe).from_pretrained(no_vq_dir, device="cpu"),
}.items():
    try:
        call()
        errors[name] = None
    except ValueError as err:
        errors[name] = f"{type(err).__name__}: {err}"
result["errors"] = errors
result["loaded"] = sorted(
    m for m in sys.modules if m.split(".")[0] in ("megatron_ts", "megatron", "deepspeed")
)
print(json.dumps(result))
"""


def test_export_pipeline_without_megatron_ts_matches_ts_generate(tmp_path: Path):
    """The export's pipeline and generate() in a process that cannot import megatron_ts,
    megatron or deepspeed: the same pixels as ts-generate, bad input named."""
    import hashlib
    import os
    import subprocess
    import sys

    from PIL import Image

    from megatron_ts.hf.vq_token_shuffle import vq_identity

    vq_path = make_vq(tmp_path / "vq.safetensors")
    model_dir = export(tmp_path, str(vq_path), vq_identity("native", vq_path))
    no_vq = tmp_path / "no-vq"
    shutil.copytree(model_dir, no_vq)
    shutil.rmtree(no_vq / "vq")
    args = ["--model", str(model_dir), "--prompt", "a red square", "--prompt", "blue sky"]
    args += ["--num-images", "2", "--seed", "5", "--batch-size", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    cli = [Image.open(p) for p in sorted((tmp_path / "cli").glob("*.png"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MEGATRON, str(model_dir), str(no_vq)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    # ts-generate decoded one image per batch, the pipeline all four in one: same pixels
    assert got["pixels"] == [hashlib.sha256(im.tobytes()).hexdigest() for im in cli]
    assert got["sizes"] == [[64, 64]] * 4 and got["seeds"] == [5, 6, 7, 8]
    assert got["settings"]["cfg_scale"] == 7.5 and got["settings"]["resolution"] == 64
    assert got["generate_equals_pipeline"]
    errors = got["errors"]
    assert "prompt: the list of prompts is empty" in errors["empty"]
    assert "resolution 128 px: this model was trained at [64]" in errors["resolution"]
    assert "guidance_scale 0.5" in errors["guidance"]
    assert "guidance_scale 0.5" in errors["generate_guidance"]
    assert "ModelDirError" in errors["no_vq"] and "vq/config.json is missing" in errors["no_vq"]


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_generate_writes_reproducible_pngs(tmp_path: Path, capsys):
    import numpy as np
    from PIL import Image

    from megatron_ts.hf.vq_token_shuffle import vq_identity

    vq_path = make_vq(tmp_path / "vq.safetensors")
    model_dir = export(tmp_path, str(vq_path), vq_identity("native", vq_path))
    base = ["--model", str(model_dir), "--prompt", "a red square", "--prompt", "blue sky"]
    base += ["--num-images", "2", "--seed", "5", "--batch-size", "3", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert list(a) == [
        "0000-00-a-red-square.png",
        "0000-01-a-red-square.png",
        "0001-00-blue-sky.png",
        "0001-01-blue-sky.png",
    ]
    assert a == b  # same seed and settings -> the same bytes
    assert len(set(a.values())) == 4  # every image has its own seed
    image = Image.open(tmp_path / "a" / "0001-01-blue-sky.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    settings = json.loads(image.text["settings"])
    assert image.text["prompt"] == "blue sky"
    assert settings["seed"] == 8 and settings["resolution"] == 64  # seed 5 + image index 3
    assert settings["cfg_scale"] == 7.5 and settings["cfg_schedule"] == "half-linear"
    # greedy: KV-cache decoding and full recomputation give the same PNG bytes
    greedy = ["--model", str(model_dir), "--prompt", "x", "--temperature", "0", "--no-progress"]
    assert main([*greedy, "--out", str(tmp_path / "kv")]) == 0
    assert main([*greedy, "--no-kv-cache", "--out", str(tmp_path / "nokv")]) == 0
    pixels = [np.asarray(Image.open(tmp_path / d / "0000-00-x.png")) for d in ("kv", "nokv")]
    assert np.array_equal(*pixels)  # (the settings chunk differs: use_kv_cache)
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog  \n")
    assert (
        main(
            [
                *greedy[:2],
                "--prompts-file",
                str(tmp_path / "prompts.txt"),
                "--cfg",
                "1",
                "--cfg-schedule",
                "constant",
                "--top-k",
                "5",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    assert list(_pngs(tmp_path / "f")) == ["0000-00-a-cat.png", "0001-00-a-dog.png"]
    capsys.readouterr()

    # a VQ file that is not the one the model was trained with, or has another codebook
    make_vq(model_dir / "vq" / "vq.safetensors", seed=1)
    assert main([*greedy, "--out", str(tmp_path / "c")]) == 2
    assert "wrong VQ file" in capsys.readouterr().err
    make_vq(model_dir / "vq" / "vq.safetensors", codebook=128)
    assert main([*greedy, "--out", str(tmp_path / "c")]) == 2
    assert "128 codes at 16x, the model 64 codes" in capsys.readouterr().err
    (model_dir / "vq" / "config.json").unlink()
    assert main([*greedy, "--out", str(tmp_path / "c")]) == 2
    assert "vq/config.json is missing" in capsys.readouterr().err


def test_generation_config_json_gives_the_defaults(tmp_path: Path):
    """generate() and the pipeline take unset settings from the export's
    generation_config.json, not transformers' own defaults (top-k 50)."""
    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline

    model_dir = export(tmp_path)
    pipe = TokenShufflePipeline.from_pretrained(model_dir, device="cpu", need_vq=False)
    ids = pipe.prompt_ids(["a red square", "blue sky"])
    stored = json.loads((model_dir / "generation_config.json").read_text())
    assert (stored["cfg_scale"], stored["top_k"], stored["temperature"]) == (7.5, 0, 1.0)
    explicit = dict(guidance_scale=7.5, cfg_schedule="half-linear", temperature=1.0, top_k=0)
    assert torch.equal(
        pipe.model.generate(ids, seed=3), pipe.model.generate(ids, seed=3, **explicit)
    )
    assert not torch.equal(
        pipe.model.generate(ids, seed=3), pipe.model.generate(ids, seed=3, top_k=50)
    )
    stored.update(cfg_scale=2.0, temperature=0.0, do_sample=False)
    (model_dir / "generation_config.json").write_text(json.dumps(stored))
    greedy = TokenShufflePipeline.from_pretrained(model_dir, device="cpu", need_vq=False)
    expected = greedy.model.generate(ids, guidance_scale=2.0, temperature=0.0, seed=99)
    assert torch.equal(greedy.model.generate(ids, seed=3), expected)  # greedy: seeds do not matter
    codes = greedy(["a red square", "blue sky"], output_type="codes", progress=False)
    assert torch.equal(codes.codes, expected) and codes.settings["cfg_scale"] == 2.0


def preview_stage(resolution: int, buckets: tuple[str, ...] = ()):
    """The ResolvedStage of a one-stage s = 2 run at `resolution` px, 8-byte captions, 16x VQ."""
    from megatron_ts.config import Config, validate

    cfg = Config()
    cfg.model.flavor, cfg.model.shuffle_window = "debug", 2
    cfg.tokenizer.codebook_size, cfg.tokenizer.downsample = 64, 16
    cfg.data.resolution, cfg.data.caption_len = resolution, 8
    cfg.data.buckets, cfg.data.grid_multiple = list(buckets), 2
    cfg.model.max_windows_per_side = 6 if buckets else 0
    return validate(cfg, 1)[0]


def test_training_previews_are_ts_generate_images(tmp_path: Path):
    """The trainer's previews (a model built from the checkpoint in process) and ts-generate
    (the export) sample through one pipeline: the same seed gives the same pixels."""
    from PIL import Image

    from megatron_ts.config import SamplingDefaults, TokenizerConfig
    from megatron_ts.hf.vq_token_shuffle import vq_identity
    from megatron_ts.training.preview import write_previews

    vq_path = make_vq(tmp_path / "vq.safetensors")
    model_dir = export(tmp_path, str(vq_path), vq_identity("native", vq_path))
    prompts = ["a red square", "blue sky"]
    tokenizer = TokenizerConfig(text="byte", vq_checkpoint=str(vq_path), codebook_size=64)
    stage = preview_stage(64)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    paths = write_previews(ckpt, tokenizer, SamplingDefaults(), prompts, stage, tmp_path / "p", 1)
    args = ["--model", str(model_dir), "--prompt", prompts[0], "--prompt", prompts[1]]
    assert main([*args, "--seed", "1", "--no-progress", "--out", str(tmp_path / "g")]) == 0
    generated = sorted((tmp_path / "g").glob("*.png"))
    assert len(paths) == len(generated) == 2
    for preview, png in zip(paths, generated, strict=True):
        assert Image.open(preview).tobytes() == Image.open(png).tobytes()


def test_previews_of_a_bucketed_stage_draw_every_bucket(tmp_path: Path):
    """A stage with buckets previews each prompt in each of its sizes, the same pixels as
    ts-generate --size of the export."""
    from PIL import Image

    from megatron_ts.config import SamplingDefaults, TokenizerConfig
    from megatron_ts.hf.vq_token_shuffle import vq_identity
    from megatron_ts.training.preview import write_previews

    vq_path = make_vq(tmp_path / "vq.safetensors")
    buckets = ("1:1", "2:1", "1:2")
    data = {"resolution": 128, "buckets": list(buckets), "grid_multiple": 2}
    model_dir = export(
        tmp_path, str(vq_path), vq_identity("native", vq_path), data, max_windows_per_side=6
    )
    tokenizer = TokenizerConfig(text="byte", vq_checkpoint=str(vq_path), codebook_size=64)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    stage = preview_stage(128, buckets)
    paths = write_previews(
        ckpt, tokenizer, SamplingDefaults(), ["a red square"], stage, tmp_path / "p", 1
    )
    assert [p.name for p in paths] == ["00-128x128.png", "00-192x96.png", "00-96x192.png"]
    assert [Image.open(p).size for p in paths] == [(128, 128), (192, 96), (96, 192)]
    base = ["--model", str(model_dir), "--prompt", "a red square", "--seed", "1", "--no-progress"]
    assert main([*base, "--size", "192x96", "--out", str(tmp_path / "g")]) == 0
    generated = next((tmp_path / "g").glob("*.png"))
    assert Image.open(paths[1]).tobytes() == Image.open(generated).tobytes()


def test_generate_non_square_sizes_of_a_bucketed_export(tmp_path: Path, capsys):
    """A model trained on buckets draws its trained sizes: PNGs of the asked width and height,
    the pipeline's codes decoded by the VQ, untrained sizes refused with the trained listed."""
    import numpy as np
    from PIL import Image

    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline, to_pil
    from megatron_ts.hf.vq_token_shuffle import vq_identity

    vq_path = make_vq(tmp_path / "vq.safetensors")
    data = {"resolution": 128, "buckets": ["1:1", "2:1", "1:2"], "grid_multiple": 2}
    model_dir = export(
        tmp_path, str(vq_path), vq_identity("native", vq_path), data, max_windows_per_side=6
    )
    sizes = json.loads((model_dir / "generation_config.json").read_text())["sizes"]
    assert sizes == ["128x128", "192x96", "96x192"]  # about 128^2 pixels, sides of 32 px
    base = ["--model", str(model_dir), "--prompt", "a red square", "--no-progress"]
    assert main([*base, "--size", "192x96", "--num-images", "2", "--out", str(tmp_path / "w")]) == 0
    assert main([*base, "--size", "1:2", "--out", str(tmp_path / "t")]) == 0
    assert main([*base, "--out", str(tmp_path / "d")]) == 0
    wide = [Image.open(p) for p in sorted((tmp_path / "w").glob("*.png"))]
    assert [im.size for im in wide] == [(192, 96)] * 2
    assert json.loads(wide[0].text["settings"])["size"] == "192x96"
    assert Image.open(next((tmp_path / "t").glob("*.png"))).size == (96, 192)
    assert Image.open(next((tmp_path / "d").glob("*.png"))).size == (128, 128)
    capsys.readouterr()
    assert main([*base, "--size", "96x48", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "size '96x48' is not one this model trained on; use one of: 128x128 (1:1), " in err
    assert "192x96 (2:1), 96x192 (1:2)" in err and not (tmp_path / "x").exists()

    pipe = TokenShufflePipeline.from_pretrained(model_dir, device="cpu")
    out = pipe(["a red square"], 2, size="192x96", seed=0, temperature=0.0, progress=False)
    assert out.codes.shape == (2, 6, 12) and out.steps == 18  # (96/16/2) x (192/16/2) windows
    decoded = to_pil(pipe.vq.decode(out.codes))  # rows are the height: the image is not turned
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(decoded, out.images)] == [
        True,
        True,
    ]
    no_cache = pipe(["a red square"], 2, size="2:1", temperature=0.0, use_cache=False)
    assert torch.equal(no_cache.codes, out.codes)  # the KV cache keeps the window grid


def test_old_square_export_without_bucket_fields_still_samples(tmp_path: Path):
    """An export written before buckets (no buckets, no max_windows_per_side in config.json)
    loads and samples the codes it did; a size there is checked against its squares."""
    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline

    model_dir = export(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["buckets"] == [] and config["max_windows_per_side"] == 0
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    del config["buckets"], config["max_windows_per_side"]
    (old / "config.json").write_text(json.dumps(config))
    runs = {}
    for name, path in (("new", model_dir), ("old", old)):
        pipe = TokenShufflePipeline.from_pretrained(path, device="cpu", need_vq=False)
        runs[name] = pipe(["a cat", "blue"], seed=2, output_type="codes", progress=False)
    assert runs["old"].codes.shape == (2, 4, 4)
    assert torch.equal(runs["old"].codes, runs["new"].codes)
    assert runs["old"].settings["resolution"] == 64 and runs["old"].settings["size"] == "64x64"
    with pytest.raises(ValueError, match=r"'64x32' is not one .* use one of: 64x64 \(1:1\)$"):
        pipe(["a cat"], size="64x32", output_type="codes")
