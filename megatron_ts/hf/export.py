"""`ts-convert to-hf`: a training checkpoint -> a self-contained Hugging Face directory.

Works on CPU for any training layout: TP shards are merged per tensor (`iter_full_state_dict`),
pipeline stages are just layer files, and ZeRO partitions were gathered by the engine at save
time. Tensors are streamed into safetensors shards planned from the checkpoint's headers, so
memory stays near the largest tensor.

Output directory:

    config.json                      TokenShuffleConfig + auto_map (trust_remote_code)
    configuration_token_shuffle.py   modeling code (imports torch/transformers only)
    modeling_token_shuffle.py
    model.safetensors                or model-0000i-of-0000n.safetensors + index.json
    generation_config.json           sampling defaults, caption_len, resolutions
    vocab_layout.json                the combined vocabulary (megatron_ts.vocab.VocabLayout)
    text_tokenizer.json              {"type": "byte"} or {"type": "tokenizers", "file": ...}
    text_tokenizer/<name>.json       the text tokenizer's JSON (tokenizers type only)
    vq/config.json, vq/<checkpoint>  the VQ tokenizer weights and config
    README.md                        a short model card
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ts.buckets import DEFAULT_GRID_MULTIPLE, Bucket, make_buckets
from megatron_ts.checkpoint.integrity import verify
from megatron_ts.checkpoint.model_files import (
    WEIGHTS,
    choose_weights,
    iter_full_shapes,
    iter_full_state_dict,
    read_meta,
    resolve_checkpoint,
)
from megatron_ts.config import SamplingDefaults
from megatron_ts.hf.build import attention_shape, hf_config_from_spec
from megatron_ts.hf.safetensors_stream import (
    ShardWriter,
    TensorPlan,
    parse_size,
    plan_shards,
    shard_names,
)
from megatron_ts.hf.weights import iter_to_hf, to_hf
from megatron_ts.logging import get_logger
from megatron_ts.models.model import ModelSpec

log = get_logger(__name__)

HF_DIR = Path(__file__).resolve().parent
# the code an export ships: torch + transformers (+ tokenizers, safetensors, Pillow) only
MODELING_FILES = (
    "configuration_token_shuffle.py",
    "modeling_token_shuffle.py",
    "generation_token_shuffle.py",
    "pipeline_token_shuffle.py",
    "tokenization_token_shuffle.py",
    "vq_token_shuffle.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_token_shuffle.TokenShuffleConfig",
    "AutoModel": "modeling_token_shuffle.TokenShuffleModel",
    "AutoModelForCausalLM": "modeling_token_shuffle.TokenShuffleForCausalLM",
}
INDEX_FILE = "model.safetensors.index.json"
TEXT_TOKENIZER_FILE = "text_tokenizer.json"
TEXT_TOKENIZER_DIR = "text_tokenizer"
VOCAB_FILE = "vocab_layout.json"
VQ_DIR = "vq"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generation_defaults(config: dict) -> dict:
    """generation_config.json's sampling fields from the run's [sampling] section (its defaults
    when the checkpoint predates the section: LlamaGen-style full-vocabulary sampling at
    temperature 1 with strong, half-linear guidance)."""
    sampling = {**dataclasses.asdict(SamplingDefaults()), **(config.get("sampling") or {})}
    if sampling["temperature"] <= 0:
        # greedy: transformers' own spelling, do_sample false; a temperature, top-k or top-p
        # beside it makes every GenerationConfig load warn that those flags are not valid
        for key in ("temperature", "top_k", "top_p"):
            sampling.pop(key)
        return {"do_sample": False, **sampling}
    return {"do_sample": True, **sampling}


@dataclass(frozen=True)
class StageInfo:
    """What an export needs to know of the stages that trained a checkpoint."""

    caption_len: int
    resolutions: list[int]
    """Square sides (pixel budgets with buckets) of the stages, current stage first."""
    buckets: list[dict]
    """Aspect-ratio buckets of those stages, each {"name", "width", "height", "resolution"};
    empty for a model of square images only."""
    tokenizer: dict


def _stage_buckets(stage: dict, config: dict, downsample: int) -> list[dict]:
    """A stage's buckets with their pixel sizes: as the stage meta lists them (dicts), else sized
    from their names as the config sizes them (megatron_ts.buckets.make_buckets)."""
    data = config.get("data") or {}
    listed = stage.get("buckets")
    if listed is None and not (config.get("curriculum") or {}).get("stages"):
        listed = data.get("buckets")  # a run without a curriculum: its one stage is [data]'s
    if not listed:
        return []
    resolution = int(stage.get("resolution") or data.get("resolution") or 256)
    if all(isinstance(b, dict) for b in listed):
        sized = [Bucket.from_dict(b) for b in listed]
    else:
        multiple = int(data.get("grid_multiple") or DEFAULT_GRID_MULTIPLE)
        sized = make_buckets(listed, resolution, downsample * multiple)
    return [{**b.to_dict(), "resolution": resolution} for b in sized]


def _stage_info(meta: dict) -> StageInfo:
    """Caption length, resolutions, buckets and tokenizer section from meta.json, with fallbacks.

    Earlier curriculum stages with the same shuffle window trained this model too: their sizes
    are offered after the current stage's.
    """
    stage = meta.get("stage") or {}
    config = meta.get("config") or {}
    data = config.get("data") or {}
    tok = dict(config.get("tokenizer") or {})
    downsample = int(tok.get("downsample") or 16)
    caption_len = int(stage.get("caption_len") or data.get("caption_len") or 64)
    window = meta["model_spec"]["shuffle_window"]
    stages = (config.get("curriculum") or {}).get("stages") or []
    index = stage.get("index")
    current = dict(stage)
    if isinstance(index, int) and index < len(stages) and "buckets" not in current:
        current["buckets"] = stages[index].get("buckets")  # the trainer's meta names none
    resolutions: list[int] = []
    sizes: list[dict] = []
    bucketed = False
    earlier = stages[: index if isinstance(index, int) else 0]
    fallback = {**current, "resolution": data.get("resolution") or 256}
    for st in [current, *earlier, fallback]:
        res = st.get("resolution")
        if not res or (st is not current and st.get("shuffle_window", 1) != window):
            continue
        if st is fallback and resolutions:
            break  # only when neither the stage nor an earlier one names a resolution
        res = int(res)
        if res not in resolutions:
            resolutions.append(res)
        stage_buckets = _stage_buckets(st, config, downsample)
        bucketed = bucketed or bool(stage_buckets)
        # a square stage beside bucketed ones trained its square too
        square = {"name": "1:1", "width": res, "height": res, "resolution": res}
        known = {(b["width"], b["height"]) for b in sizes}
        for b in stage_buckets or [square]:
            if (b["width"], b["height"]) not in known:
                sizes.append(b)
                known.add((b["width"], b["height"]))
    return StageInfo(caption_len, resolutions, sizes if bucketed else [], tok)


def _plan(ckpt_dir: Path, spec: ModelSpec, dtype: torch.dtype, weights: str) -> list[TensorPlan]:
    attn = attention_shape(spec)
    plan = []
    for name, shape in iter_full_shapes(ckpt_dir, weights):
        for hf_name, t in to_hf(name, torch.empty(shape, device="meta"), attn):
            plan.append(TensorPlan(hf_name, tuple(t.shape), dtype))
    return plan


def write_weights(
    ckpt_dir: Path,
    spec: ModelSpec,
    out_dir: Path,
    max_shard_size: str | int,
    dtype: torch.dtype = torch.float32,
    weights: str = "raw",
) -> list[str]:
    """Streams the checkpoint's weights (`raw` or `ema`) into HF safetensors shards; returns
    the file names."""
    plan = _plan(ckpt_dir, spec, dtype, weights)
    shards = plan_shards(plan, parse_size(max_shard_size))
    names = shard_names(len(shards))
    stream = iter_to_hf(iter_full_state_dict(ckpt_dir, weights), attention_shape(spec))
    for shard, fname in zip(shards, names, strict=True):
        writer = ShardWriter(out_dir / fname, shard)
        for _ in shard:
            writer.write(*next(stream))
        writer.close()
        log.info("wrote %s (%d tensors)", fname, len(shard))
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan)},
            "weight_map": {
                t.name: fname for shard, fname in zip(shards, names, strict=True) for t in shard
            },
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def write_text_tokenizer(spec_text: str, identity: str, text_size: int, out_dir: Path) -> None:
    """Byte tokenizer: a small JSON saying so; a `tokenizers` JSON: copied next to it.

    The JSON keeps its file name (under `text_tokenizer/`): a JSON tokenizer's identity is its
    name plus a hash of its bytes, and the identity recorded in the vocabulary must still match
    when the export is imported back for training.
    """
    if spec_text == "byte":
        info = {"type": "byte", "vocab_size": text_size, "identity": identity}
    else:
        src = Path(spec_text)
        if not src.is_file():
            raise FileNotFoundError(
                f"text tokenizer {src} (from the checkpoint's [tokenizer] text) does not exist; "
                "pass --text-tokenizer PATH"
            )
        (out_dir / TEXT_TOKENIZER_DIR).mkdir(exist_ok=True)
        shutil.copyfile(src, out_dir / TEXT_TOKENIZER_DIR / src.name)
        info = {
            "type": "tokenizers",
            "file": f"{TEXT_TOKENIZER_DIR}/{src.name}",
            "vocab_size": text_size,
            "identity": identity,
        }
    (out_dir / TEXT_TOKENIZER_FILE).write_text(json.dumps(info, indent=2))


def write_vq(
    vq_format: str, checkpoint: str | None, spec: ModelSpec, downsample: int, out_dir: Path
) -> bool:
    """Copies the VQ checkpoint (file or directory) and writes vq/config.json."""
    if not checkpoint:
        log.warning(
            "no VQ checkpoint in the checkpoint's config and no --vq-checkpoint: the export "
            "computes logits but cannot decode images"
        )
        return False
    src = Path(checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"VQ checkpoint {src} does not exist; pass --vq-checkpoint PATH")
    vq_dir = out_dir / VQ_DIR
    vq_dir.mkdir(exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, vq_dir / src.name, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, vq_dir / src.name)
    info = {
        "format": vq_format,
        "checkpoint": src.name,
        "codebook_size": spec.vocab.codebook_size,
        "downsample": downsample,
        "identity": spec.vocab.vq_tokenizer,
    }
    (vq_dir / "config.json").write_text(json.dumps(info, indent=2))
    return True


def _model_card(
    spec: ModelSpec,
    caption_len: int,
    resolutions: list[int],
    meta: dict,
    weights: str,
    buckets: list[dict] = (),
) -> str:
    shape = spec.shape
    trained = f"trained at {', '.join(f'{r} px' for r in resolutions)}"
    size_flag = cli_size = ""  # square models: the default size, no flag
    if buckets:
        listed = ", ".join(f"{b['width']}x{b['height']} ({b['name']})" for b in buckets)
        trained = f"trained on the image sizes (width x height) {listed}"
        example = next((b for b in buckets if b["width"] != b["height"]), buckets[0])
        size = f"{example['width']}x{example['height']}"
        size_flag, cli_size = f'size="{size}", ', f" --size {size}"
    if weights == "ema":
        ema = meta.get("ema") or {}
        source = (
            f"the moving average of its weights (decay {ema.get('decay')}, "
            f"{ema.get('updates')} updates)"
        )
    else:
        source = "its trained weights"
    return f"""# Token-Shuffle text-to-image model

Exported by megatron_ts `ts-convert to-hf` from step {meta.get("step")}: {source}.

- Llama decoder: hidden {shape.hidden_size}, {shape.num_layers} blocks, {shape.num_heads} heads
  ({shape.num_kv_heads} kv), SwiGLU {shape.ffn_hidden_size}, RoPE theta {spec.rope_theta}
- token-shuffle window s = {spec.shuffle_window}: {spec.shuffle_window**2} VQ codes per position
- vocabulary: {spec.vocab.text_size} text ids ({spec.vocab.text_tokenizer}), 5 special tokens,
  {spec.vocab.codebook_size} VQ codes ({spec.vocab.vq_tokenizer}), padded to {spec.padded_vocab}
- {trained}, captions of {caption_len} tokens

Images with torch and transformers alone (the sampler and the VQ decoder ship in this directory):

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("THIS_DIR", trust_remote_code=True)
images = model.pipeline()(["a photo of a red bicycle"], {size_flag}num_images_per_prompt=4).images
```

`model.generate(input_ids)` returns code grids (guidance_scale, cfg_schedule, temperature, top_k,
top_p, seed; defaults from generation_config.json). With megatron_ts installed, the same images
as PNGs with their settings:

```bash
ts-generate --model THIS_DIR --prompt "a photo of a red bicycle"{cli_size} --out samples/
```
"""


def export_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    text_tokenizer: str | None = None,
    vq_checkpoint: str | None = None,
    vq_format: str | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str = "float32",
    weights: str = "auto",
) -> Path:
    """Converts a training checkpoint into a Hugging Face model directory.

    Args:
        checkpoint: run dir, checkpoints dir or step dir.
        out_dir: output directory (created; existing files are overwritten).
        text_tokenizer: overrides the checkpoint's text tokenizer (`byte` or a JSON path).
        vq_checkpoint: overrides the checkpoint's VQ checkpoint path.
        vq_format: overrides the VQ checkpoint layout (native, llamagen, chameleon).
        max_shard_size: safetensors shard size limit, e.g. "5GB".
        dtype: float32 (exact), bfloat16 or float16.
        weights: `auto` (the moving average when the checkpoint has one, else the trained
            weights), `ema` or `raw`.

    Returns:
        The output directory.
    """
    ckpt_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt_dir)
    spec = ModelSpec.from_dict(meta["model_spec"])
    info = _stage_info(meta)
    tok, buckets = info.tokenizer, info.buckets
    downsample = int(tok.get("downsample") or 16)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    weights = choose_weights(ckpt_dir, weights)
    verify(ckpt_dir, under=WEIGHTS[weights])  # before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (step %s, %s weights) to %s", ckpt_dir, meta.get("step"), weights, out)

    weight_files = write_weights(ckpt_dir, spec, out, max_shard_size, DTYPES[dtype], weights)

    config = hf_config_from_spec(spec, info.caption_len, info.resolutions, downsample, buckets)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["TokenShuffleForCausalLM"]
    config.dtype = dtype
    config.source_checkpoint = {
        "path": str(ckpt_dir),
        "step": meta.get("step"),
        "weights": weights,
        **({"ema": meta.get("ema")} if weights == "ema" else {}),
    }
    config.save_pretrained(out)
    for name in MODELING_FILES:
        shutil.copyfile(HF_DIR / name, out / name)

    generation = {
        **generation_defaults(meta.get("config") or {}),
        "caption_len": info.caption_len,
        "resolution": info.resolutions[0],
        "resolutions": info.resolutions,
    }
    if buckets:  # the default image: the first square bucket, else the first bucket
        default = next((b for b in buckets if b["width"] == b["height"]), buckets[0])
        del generation["resolution"]
        generation["size"] = f"{default['width']}x{default['height']}"
        generation["sizes"] = [f"{b['width']}x{b['height']}" for b in buckets]
    generation = {
        **generation,
        "bos_token_id": spec.vocab.bos_id,
        "pad_token_id": spec.vocab.pad_id,
        "eos_token_id": spec.vocab.eos_id,
        "boi_token_id": spec.vocab.boi_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / VOCAB_FILE).write_text(json.dumps(spec.vocab.to_dict(), indent=2))
    write_text_tokenizer(
        text_tokenizer or tok.get("text") or "byte",
        spec.vocab.text_tokenizer,
        spec.vocab.text_size,
        out,
    )
    write_vq(
        vq_format or tok.get("vq_format") or "native",
        vq_checkpoint or tok.get("vq_checkpoint"),
        spec,
        downsample,
        out,
    )
    (out / "README.md").write_text(
        _model_card(spec, info.caption_len, info.resolutions, meta, weights, buckets)
    )
    log.info("export done: %s", ", ".join(weight_files))
    return out
