"""Loads an exported model directory for sampling, checking every file it needs first.

A directory with a missing or mismatched file fails here with a message naming the file and
what to do, instead of an index error deep inside decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig
from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM
from megatron_ts.logging import get_logger

log = get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ModelDirError(ValueError):
    """An exported model directory is missing a file or its files disagree."""


@dataclass
class LoadedModel:
    """Everything `generate` needs, from one export directory."""

    model: TokenShuffleForCausalLM
    text_tokenizer: Any
    vq: Any | None
    generation: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> TokenShuffleConfig:
        return self.model.config


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path} is missing ({what}); re-run `ts-convert to-hf` into this dir")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path} is not valid JSON ({err})") from None


def read_config(model_dir: Path) -> TokenShuffleConfig:
    data = _read_json(model_dir / "config.json", "the model config")
    if data.get("model_type") != "token_shuffle":
        raise ModelDirError(
            f"{model_dir / 'config.json'}: model_type {data.get('model_type')!r}, expected "
            "'token_shuffle' (a directory written by `ts-convert to-hf`)"
        )
    return TokenShuffleConfig.from_pretrained(str(model_dir))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an export, checked for presence."""
    if (model_dir / INDEX_FILE).is_file():
        index = _read_json(model_dir / INDEX_FILE, "the weight index")
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelDirError(
                f"{model_dir}: weight shard {missing[0]} listed in {INDEX_FILE} is missing "
                f"({len(missing)} of {len(names)} missing); copy the whole export directory"
            )
        return [model_dir / n for n in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise ModelDirError(f"{model_dir} has no {SINGLE_FILE} and no {INDEX_FILE}: no weights")


def load_weights_strict(model: TokenShuffleForCausalLM, files: list[Path]) -> None:
    """Loads safetensors files into the model; names the first missing/extra/misshapen tensor."""
    expected = model.state_dict()
    seen: set[str] = set()
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise ModelDirError(f"{path} is truncated or not a safetensors file ({err})") from None
        for key in keys:
            if key not in expected:
                raise ModelDirError(
                    f"{path.name}: tensor {key} is not a parameter of the model described by "
                    "config.json (weights and config come from different exports?)"
                )
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(expected[key].shape):
                raise ModelDirError(
                    f"{path.name}: {key} has shape {shape} but config.json implies "
                    f"{tuple(expected[key].shape)} (weights and config come from different "
                    "exports?)"
                )
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise ModelDirError(f"{path}: cannot read {key} ({err})") from None
            with torch.no_grad():
                expected[key].copy_(tensor)
            seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelDirError(
            f"weights lack {missing[0]} ({len(missing)} parameters missing) for the model in "
            "config.json; the export is incomplete"
        )


def load_text_tokenizer_dir(model_dir: Path, config: TokenShuffleConfig):
    """The text tokenizer stored in an export (byte or a `tokenizers` JSON)."""
    info = _read_json(model_dir / "text_tokenizer.json", "the text tokenizer description")
    kind = info.get("type")
    if kind == "byte":
        spec = "byte"
    elif kind == "tokenizers":
        path = model_dir / info.get("file", "")
        if not path.is_file():
            raise ModelDirError(
                f"{path} is missing (the text tokenizer named in text_tokenizer.json)"
            )
        spec = str(path)
    else:
        raise ModelDirError(f"{model_dir / 'text_tokenizer.json'}: unknown type {kind!r}")
    from megatron_ts.tokenizers.text import load_text_tokenizer

    tokenizer = load_text_tokenizer(spec)
    if tokenizer.identity != config.text_tokenizer:
        raise ModelDirError(
            f"text tokenizer {spec} has identity {tokenizer.identity!r} but the model was trained "
            f"with {config.text_tokenizer!r} (config.json text_tokenizer): wrong tokenizer file"
        )
    if tokenizer.vocab_size != config.text_vocab_size:
        raise ModelDirError(
            f"text tokenizer in {model_dir} has {tokenizer.vocab_size} ids but config.json "
            f"text_vocab_size is {config.text_vocab_size}: tokenizer from another model"
        )
    return tokenizer


def load_vq_dir(model_dir: Path, config: TokenShuffleConfig, device: str | torch.device = "cpu"):
    """The VQ tokenizer stored under `vq/` of an export."""
    vq_dir = model_dir / "vq"
    info = _read_json(vq_dir / "config.json", "the VQ tokenizer config")
    ckpt = vq_dir / info.get("checkpoint", "")
    if not info.get("checkpoint") or not ckpt.is_file():
        raise ModelDirError(f"VQ checkpoint {ckpt} named in {vq_dir / 'config.json'} is missing")
    for key, want in (
        ("codebook_size", config.codebook_size),
        ("downsample", config.vq_downsample),
    ):
        if key in info and int(info[key]) != int(want):
            raise ModelDirError(
                f"{vq_dir / 'config.json'}: {key} {info[key]} but config.json has {want}: the VQ "
                "tokenizer does not belong to this model"
            )
    from megatron_ts.tokenizers.vq import VQCheckpointError, load_vq

    try:
        vq = load_vq(info.get("format", "native"), str(ckpt), device=device)
    except VQCheckpointError as err:
        raise ModelDirError(str(err)) from None
    if int(vq.codebook_size) != config.codebook_size or int(vq.downsample) != config.vq_downsample:
        raise ModelDirError(
            f"VQ checkpoint {ckpt} has {vq.codebook_size} codes at {vq.downsample}x, the model "
            f"{config.codebook_size} codes at {config.vq_downsample}x"
        )
    # the vocabulary records `format:sha256-prefix` when training had the VQ file at hand
    if ":" in config.vq_tokenizer and vq.identity != config.vq_tokenizer:
        raise ModelDirError(
            f"VQ checkpoint {ckpt} has identity {vq.identity!r} but the model was trained with "
            f"{config.vq_tokenizer!r} (config.json vq_tokenizer): wrong VQ file"
        )
    return vq


def load_model_dir(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    need_vq: bool = True,
) -> LoadedModel:
    """Loads an export (written by `ts-convert to-hf`) with every file checked.

    Args:
        model_dir: the export directory.
        device: where the model runs.
        dtype: model dtype (float32, bfloat16, float16).
        need_vq: require the VQ tokenizer (needed to decode images).

    Returns:
        LoadedModel with the model in eval mode.

    Raises:
        ModelDirError: naming the missing or mismatched file.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    config = read_config(model_dir)
    files = weight_files(model_dir)
    model = TokenShuffleForCausalLM(config)
    load_weights_strict(model, files)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = load_text_tokenizer_dir(model_dir, config)
    vq = None
    if need_vq or (model_dir / "vq" / "config.json").exists():
        vq = load_vq_dir(model_dir, config, device)
    generation = {}
    if (model_dir / "generation_config.json").is_file():
        generation = _read_json(model_dir / "generation_config.json", "sampling defaults")
    log.info(
        "loaded %s (%d layers, s=%d)", model_dir, config.num_hidden_layers, config.shuffle_window
    )
    return LoadedModel(
        model=model, text_tokenizer=tokenizer, vq=vq, generation=generation, path=model_dir
    )
