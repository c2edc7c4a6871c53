"""`ts-convert from-hf`: a Hugging Face directory -> a megatron_ts checkpoint to train from.

Two sources:

- an export of ours (`model_type` token_shuffle): weights map back exactly (round trip);
- a Llama checkpoint in HF layout (`model_type` llama) for the text backbone. Its blocks, norms,
  text embedding rows and text head rows are copied; everything Token-Shuffle adds starts as
  the training model would initialise it from scratch (`init_std` normal), namely
  the special-token rows, the VQ-code rows and the padding rows of the embedding and head,
  and token-shuffle / token-unshuffle (compress, expand and residual fc1: normal; residual fc2:
  zero, so each residual block starts as the identity). A tied Llama head (tie_word_embeddings)
  becomes an untied copy of the embedding.

The output is one checkpoint directory (meta.json, model/, COMPLETE) with TP = 1 layer files;
`load_into_model` splits it for any TP/PP layout, so point `checkpoint.load` at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_ts.checkpoint.model_files import (
    MODEL_DIR,
    layer_file_name,
    mark_complete,
    write_meta,
)
from megatron_ts.errors import EXIT_USAGE
from megatron_ts.hf.build import attention_shape
from megatron_ts.hf.weights import from_hf
from megatron_ts.logging import get_logger
from megatron_ts.models.flavors import ModelShape
from megatron_ts.models.model import ModelSpec
from megatron_ts.vocab import VocabLayout

log = get_logger(__name__)


class HFImportError(ValueError):
    """A source directory that cannot be imported; the message names the field or file."""

    exit_code = EXIT_USAGE


class _Weights:
    """Lazy access to the tensors of an HF directory (single file or sharded)."""

    def __init__(self, src: Path):
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (src / "model.safetensors").is_file():
            with safe_open(str(src / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise HFImportError(
                f"{src} has no model.safetensors(.index.json); save the model with "
                "safe_serialization=True (PyTorch .bin checkpoints are not read)"
            )
        for fname in set(weight_map.values()):
            if not (src / fname).is_file():
                raise HFImportError(f"{src / fname} (listed in the weight index) is missing")
        self.src = src
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise HFImportError(f"{self.src}: tensor {name} is missing")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.src / fname), "pt", device="cpu")
        return self._handles[fname].get_tensor(name).float()


def _layer_of(name: str, num_layers: int) -> tuple[int, str]:
    """TokenShuffleLM name -> (layer index, name inside the layer module)."""
    if name.startswith("input_stage."):
        return 0, name[len("input_stage.") :]
    if name.startswith("output_stage."):
        return num_layers + 1, name[len("output_stage.") :]
    head, idx, rest = name.split(".", 2)
    assert head == "blocks", name
    return int(idx) + 1, rest


class _LayerWriter:
    """Collects one layer's full tensors and writes its TP-rank-0 file when the layer changes."""

    def __init__(self, ckpt_dir: Path, num_layers: int):
        self.model_dir = ckpt_dir / MODEL_DIR
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.num_layers = num_layers
        self.pending: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        layer, key = _layer_of(name, self.num_layers)
        self.pending.setdefault(layer, {})[key] = tensor.float().contiguous()

    def flush(self, layer: int) -> None:
        tensors = self.pending.pop(layer, None)
        if tensors:
            save_file(
                tensors,
                str(self.model_dir / layer_file_name(layer, 0)),
                metadata={"format": "pt", "layer_index": str(layer)},
            )

    def close(self) -> None:
        for layer in sorted(self.pending):
            self.flush(layer)


def _write_checkpoint(out: Path, spec: ModelSpec, items, meta_extra: dict) -> Path:
    """Writes (TokenShuffleLM name, tensor) items as a TP = 1 checkpoint with meta and COMPLETE."""
    out.mkdir(parents=True, exist_ok=True)
    n = spec.shape.num_layers
    writer = _LayerWriter(out, n)
    current = None
    for name, tensor in items:
        layer = _layer_of(name, n)[0]
        if current is not None and layer != current and current in writer.pending:
            writer.flush(current)  # layers arrive in order: keep about one layer in memory
        current = layer
        writer.add(name, tensor)
    writer.close()
    spec_dict = spec.to_dict()
    spec_dict["tensor_parallel"] = 1
    write_meta(
        out,
        {
            "step": 0,
            "model_spec": spec_dict,
            "layout": {"tensor": 1, "pipeline": 1, "data": 1},
            "train_state": {},  # a fresh start: the trainer's TrainState defaults
            **meta_extra,
        },
    )
    mark_complete(out, update_latest=False)
    return out


def _trained_stages(config: dict, window: int) -> tuple[dict, list[dict]]:
    """(meta stage, curriculum stages) that make an export of the import list what `config`
    lists: its resolutions (current first) and each one's buckets, sized as exported.

    One resolution is one stage and no curriculum. With several (the export of a curriculum
    whose earlier stages had the same shuffle window), each becomes a curriculum stage, oldest
    first, and the meta stage is the last of them, as the trainer writes a run's meta.
    """
    resolutions = [int(r) for r in config.get("resolutions") or [256]]
    caption_len = config.get("caption_len", 64)
    listed = config.get("buckets") or []
    stages = []
    for i, res in enumerate(resolutions):
        # exports before per-bucket resolutions named none: those are the current stage's
        unsized = (None, 0) if i == 0 else ()
        buckets = [
            {k: b[k] for k in ("name", "width", "height")}
            for b in listed
            if b.get("resolution") in (*unsized, res)
        ]
        stage = {"caption_len": caption_len, "resolution": res, "shuffle_window": window}
        if buckets:
            stage["buckets"] = buckets
        stages.append(stage)
    if len(stages) == 1:
        return stages[0], []
    stages.reverse()  # the current stage trained last
    return {**stages[-1], "index": len(stages) - 1}, stages


def _from_export(src: Path, config: dict, out: Path) -> Path:
    if not config.get("model_spec"):
        raise HFImportError(
            f"{src / 'config.json'} has no model_spec (written by ts-convert to-hf)"
        )
    spec = ModelSpec.from_dict(config["model_spec"])
    weights = _Weights(src)
    order = sorted(weights.names(), key=lambda k: _hf_sort_key(k))
    items = from_hf(weights.get, order, attention_shape(spec))
    tok: dict = {
        "downsample": config.get("vq_downsample", 16),
        "codebook_size": spec.vocab.codebook_size,
    }
    text_info = src / "text_tokenizer.json"
    if text_info.is_file():
        info = json.loads(text_info.read_text())
        tok["text"] = "byte" if info.get("type") == "byte" else str(src / info.get("file", ""))
    vq_info = src / "vq" / "config.json"
    if vq_info.is_file():
        info = json.loads(vq_info.read_text())
        tok["vq_format"] = info.get("format", "native")
        tok["vq_checkpoint"] = str(src / "vq" / info["checkpoint"])
    stage, stages = _trained_stages(config, spec.shuffle_window)
    return _write_checkpoint(
        out,
        spec,
        items,
        {
            "stage": stage,
            "config": {"tokenizer": tok, **({"curriculum": {"stages": stages}} if stages else {})},
            "source": {"hf": str(src), "kind": "export"},
        },
    )


def _hf_sort_key(name: str) -> tuple:
    """Orders HF names so layers arrive as InputLayer, blocks 0..L-1, OutputLayer."""
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    if name.startswith(("model.embed_tokens", "model.shuffle", "model.window_positions")):
        return (0, 0, name)
    return (2, 0, name)


def _llama_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = (
        rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    if rope_type != "default":
        raise HFImportError(
            f"Llama rope type {rope_type!r} (rope scaling) is not supported: megatron_ts uses "
            "plain RoPE; import a checkpoint without rope_scaling"
        )
    return float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _from_llama(
    src: Path,
    config: dict,
    out: Path,
    codebook_size: int,
    shuffle_window: int,
    shuffle_mlp_blocks: int,
    vocab_multiple: int,
    seed: int,
    text_tokenizer: str | None,
    text_identity: str | None,
) -> Path:
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise HFImportError(
                f"{src / 'config.json'}: {key} = true; megatron_ts blocks have no biases"
            )
    if config.get("hidden_act", "silu") != "silu":
        raise HFImportError(
            f"{src / 'config.json'}: hidden_act {config['hidden_act']!r}, expected silu"
        )
    heads = config["num_attention_heads"]
    d = config["hidden_size"]
    if config.get("head_dim") not in (None, d // heads):
        raise HFImportError(f"{src / 'config.json'}: head_dim {config['head_dim']} != hidden/heads")
    shape = ModelShape(
        hidden_size=d,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden_size=config["intermediate_size"],
    )
    text_size = int(config["vocab_size"])
    if text_tokenizer is None and (src / "tokenizer.json").is_file():
        text_tokenizer = str(src / "tokenizer.json")
    vocab = VocabLayout(
        text_size=text_size, codebook_size=codebook_size, text_tokenizer=text_identity or "llama"
    )
    std = float(config.get("initializer_range", 0.02))
    spec = ModelSpec(
        shape=shape,
        vocab=vocab,
        shuffle_window=shuffle_window,
        shuffle_mlp_blocks=shuffle_mlp_blocks,
        rope_theta=_llama_theta(config),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        init_std=std,
        vocab_multiple=vocab_multiple,
    )
    weights = _Weights(src)
    gen = torch.Generator().manual_seed(seed)
    padded = spec.padded_vocab

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * std

    def extend_rows(text_rows: torch.Tensor) -> torch.Tensor:
        if text_rows.shape != (text_size, d):
            raise HFImportError(
                f"text rows have shape {tuple(text_rows.shape)}, expected {(text_size, d)}"
            )
        return torch.cat([text_rows, normal(padded - text_size, d)])  # specials, codes, padding

    def items():
        yield "input_stage.embedding.weight", extend_rows(weights.get("model.embed_tokens.weight"))
        d_small = d // shuffle_window**2
        if shuffle_window > 1:
            yield "input_stage.shuffle.compress.weight", normal(d_small, d)
            for j in range(shuffle_mlp_blocks):
                yield f"input_stage.shuffle.blocks.{j}.fc1.weight", normal(d, d)
                yield f"input_stage.shuffle.blocks.{j}.fc2.weight", torch.zeros(d, d)
        layer_names = [n for n in weights.names() if n.startswith("model.layers.")]
        layer_names.sort(key=_hf_sort_key)
        yield from from_hf(weights.get, layer_names, attention_shape(spec))
        yield "output_stage.final_norm.weight", weights.get("model.norm.weight")
        if shuffle_window > 1:
            for j in range(shuffle_mlp_blocks):
                yield f"output_stage.unshuffle.blocks.{j}.fc1.weight", normal(d, d)
                yield f"output_stage.unshuffle.blocks.{j}.fc2.weight", torch.zeros(d, d)
            yield "output_stage.unshuffle.expand.weight", normal(d, d_small)
        tied = (
            config.get("tie_word_embeddings", False) or "lm_head.weight" not in weights.weight_map
        )
        head = weights.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        yield "output_stage.head.weight", extend_rows(head)

    tok = {"text": text_tokenizer or "byte", "codebook_size": codebook_size}
    return _write_checkpoint(
        out,
        spec,
        items(),
        {
            "stage": {"caption_len": 64},
            "config": {"tokenizer": tok},
            "source": {"hf": str(src), "kind": "llama", "seed": seed},
        },
    )


def _read_config(src: Path) -> dict:
    """config.json of an HF directory, with a missing or damaged one named (HFImportError)."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise HFImportError(f"{cfg_path} is missing: {src} is not a Hugging Face model directory")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFImportError(f"{cfg_path} cannot be read ({type(err).__name__}: {err})") from None


def _export_config(src: Path) -> dict:
    """config.json of an export of ours (`model_type` token_shuffle), checked."""
    cfg_path = src / "config.json"
    config = _read_config(src)
    if config.get("model_type") != "token_shuffle":
        raise HFImportError(
            f"{cfg_path}: model_type {config.get('model_type')!r}; checkpoint.load reads "
            "token_shuffle exports (ts-convert to-hf) directly; turn other models into a "
            "checkpoint with `ts-convert from-hf` first and load that"
        )
    if not config.get("model_spec"):
        raise HFImportError(f"{cfg_path} has no model_spec (written by ts-convert to-hf)")
    return config


def export_model_spec(src: str | Path) -> dict:
    """The model spec (`ModelSpec.to_dict()` form) of an export of ours, from its config.json.

    Raises:
        HFImportError: not an export of ours (another model_type, no model_spec).
    """
    return ModelSpec.from_dict(_export_config(Path(src))["model_spec"]).to_dict()


def checkpoint_from_export(src: str | Path, out: str | Path) -> Path:
    """An export of ours as a checkpoint (`checkpoint.load` of an HF directory).

    The same conversion as `ts-convert from-hf` (safetensors and JSON only, nothing unpickled),
    plus checksums.json so the load verifies the files like any other checkpoint.

    Raises:
        HFImportError: not an export of ours, or a weight file missing.
    """
    from megatron_ts.checkpoint.integrity import file_digest, list_files, write_checksums

    src, out = Path(src), Path(out)
    ckpt = _from_export(src, _export_config(src), out)
    write_checksums(ckpt, {rel: file_digest(ckpt / rel) for rel in list_files(ckpt)})
    return ckpt


def import_from_hf(
    src: str | Path,
    out: str | Path,
    codebook_size: int = 16384,
    shuffle_window: int = 1,
    shuffle_mlp_blocks: int = 2,
    vocab_multiple: int = 128,
    seed: int = 1234,
    text_tokenizer: str | None = None,
) -> Path:
    """Writes a megatron_ts checkpoint from an export of ours or an HF Llama directory.

    Args:
        src: HF directory with config.json and safetensors weights.
        out: checkpoint directory to create (meta.json, model/, COMPLETE).
        codebook_size: VQ codes appended after the Llama vocabulary (Llama source only).
        shuffle_window: token-shuffle window of the new model (Llama source only).
        shuffle_mlp_blocks: residual blocks each side of token-(un)shuffle (Llama source only).
        vocab_multiple: vocabulary padding multiple (Llama source only).
        seed: seed of the new rows and layers (Llama source only).
        text_tokenizer: text tokenizer JSON (Llama source; default src/tokenizer.json).

    Returns:
        The checkpoint directory.
    """
    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    config = _read_config(src)
    kind = config.get("model_type")
    if kind == "token_shuffle":
        return _from_export(src, config, out)
    if kind == "llama":
        identity = None
        tok_path = text_tokenizer or (
            str(src / "tokenizer.json") if (src / "tokenizer.json").is_file() else None
        )
        if tok_path:
            try:
                from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer

                identity = load_text_tokenizer(tok_path).identity
            except ImportError:  # pragma: no cover - the tokenizer module is part of the package
                identity = None
        return _from_llama(
            src,
            config,
            out,
            codebook_size,
            shuffle_window,
            shuffle_mlp_blocks,
            vocab_multiple,
            seed,
            tok_path,
            identity,
        )
    raise HFImportError(
        f"{cfg_path}: model_type {kind!r}; from-hf reads token_shuffle exports and llama "
        "checkpoints"
    )
