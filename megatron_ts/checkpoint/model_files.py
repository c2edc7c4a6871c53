"""Model weights of a checkpoint: one safetensors file per (layer, TP rank), full fp32 params.

Layout written by the training engine (this module writes the model files, the engine the rest):

    RUN_DIR/checkpoints/latest                 name of the newest complete checkpoint
    RUN_DIR/checkpoints/step_00000100/
        meta.json                              format, step, model_spec, layout, stage, config
        model/layer_000-tp00.safetensors       layer 0 = InputLayer, 1..L = blocks, L+1 = Output
        model_ema/layer_000-tp00.safetensors   the weights' moving average (train.ema_decay > 0)
        optimizer/{master,exp_avg,exp_avg_sq}/layer_000-tp00.safetensors
                                               AdamW state in the same layout (optimizer_state.py)
        COMPLETE                               written last

Layer files hold the parameters of one layer module as named in its `state_dict` (ZeRO-gathered,
TP-local). Readers merge TP shards with `sharding.merge_tp` and split them again with
`sharding.split_tp`, so a checkpoint loads into any TP size or pipeline layout, one layer at a
time: memory stays near one layer, never the whole model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from megatron_ts.errors import EXIT_CHECKPOINT
from megatron_ts.logging import get_logger
from megatron_ts.models.sharding import merge_tp, split_tp, tp_rule

log = get_logger(__name__)

FORMAT = "megatron_ts.ckpt/2"
READ_FORMATS = ("megatron_ts.ckpt/1", FORMAT)
"""/1 kept the optimizer in DeepSpeed's pickles (`deepspeed/`); its weights still load."""
META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
MODEL_DIR = "model"
EMA_DIR = "model_ema"
WEIGHTS = {"raw": MODEL_DIR, "ema": EMA_DIR}
"""Weight sets a checkpoint can hold: the trained weights and their moving average."""
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_SETS = {
    "master": f"{OPTIMIZER_DIR}/master",
    "exp_avg": f"{OPTIMIZER_DIR}/exp_avg",
    "exp_avg_sq": f"{OPTIMIZER_DIR}/exp_avg_sq",
}
"""Per-parameter AdamW state, stored exactly like a weight set (same files, names, TP rules)."""
_SET_DIRS = {**WEIGHTS, **OPTIMIZER_SETS}
_LAYER_RE = re.compile(r"layer_(\d{3,})-tp(\d{2,})\.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""

    exit_code = EXIT_CHECKPOINT


def layer_file_name(layer_index: int, tp_rank: int) -> str:
    """File name of one (layer, TP rank) weight file, e.g. `layer_003-tp01.safetensors`."""
    return f"layer_{layer_index:03d}-tp{tp_rank:02d}.safetensors"


def layer_prefix(layer_index: int, num_layers: int) -> str:
    """TokenShuffleLM name prefix of layer module `layer_index` for a model with L blocks."""
    if layer_index == 0:
        return "input_stage."
    if layer_index == num_layers + 1:
        return "output_stage."
    if 1 <= layer_index <= num_layers:
        return f"blocks.{layer_index - 1}."
    raise ValueError(f"layer index {layer_index} outside 0..{num_layers + 1}")


def _tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict without non-tensor entries (megatron's `_extra_state`)."""
    return {
        k: v
        for k, v in module.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def write_layer_file(module: nn.Module, layer_index: int, tp_rank: int, model_dir: Path) -> Path:
    """Writes one layer module's parameters as contiguous CPU fp32 tensors, atomically.

    Args:
        module: the layer module (InputLayer, BlockLayer or OutputLayer) with full (ZeRO-gathered)
            TP-local parameters.
        layer_index: 0 = InputLayer, 1..L = blocks, L+1 = OutputLayer.
        tp_rank: this rank's tensor-parallel rank.
        model_dir: the checkpoint's `model/` directory (created if missing).

    Returns:
        Path of the written file.
    """
    return write_tensor_file(_tensor_state(module), layer_index, tp_rank, model_dir)


def write_tensor_file(
    tensors: Mapping[str, torch.Tensor], layer_index: int, tp_rank: int, set_dir: Path
) -> Path:
    """Writes one (layer, TP rank) file of a weight or optimizer set as CPU fp32, atomically."""
    model_dir = Path(set_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in tensors.items()
    }
    path = model_dir / layer_file_name(layer_index, tp_rank)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", "layer_index": str(layer_index)})
    os.replace(tmp, path)
    return path


def write_model_files(model_or_layers, ckpt_dir: Path, tp_rank: int, num_layers: int) -> list[Path]:
    """Writes every local layer module's layer file (single-process saves, converters, tests).

    Args:
        model_or_layers: as for `load_into_model`.
        ckpt_dir: the step directory; files go to its `model/` subdirectory.
        tp_rank: the modules' tensor-parallel rank.
        num_layers: transformer blocks L of the model.
    """
    modules = _layer_modules(model_or_layers, num_layers)
    return [
        write_layer_file(m, i, tp_rank, Path(ckpt_dir) / MODEL_DIR)
        for i, m in sorted(modules.items())
    ]


def write_meta(ckpt_dir: Path, meta: dict) -> Path:
    """Writes meta.json atomically (the engine writes its own; used by converters and tests)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / META_FILE
    tmp = path.with_name(META_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    os.replace(tmp, path)
    return path


def mark_complete(ckpt_dir: Path, update_latest: bool = True) -> None:
    """Writes COMPLETE and, when the parent is a `checkpoints/` dir, points `latest` at it."""
    ckpt_dir = Path(ckpt_dir)
    (ckpt_dir / COMPLETE_FILE).write_text("")
    if update_latest:
        latest = ckpt_dir.parent / LATEST_FILE
        tmp = latest.with_name(LATEST_FILE + ".tmp")
        tmp.write_text(ckpt_dir.name + "\n")
        os.replace(tmp, latest)


def read_meta(ckpt_dir: Path) -> dict:
    """Reads a checkpoint's meta.json and checks its format tag."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {ckpt_dir} is not a megatron_ts checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}): the checkpoint is damaged; delete {ckpt_dir} (a "
            "run resumes from the previous one) or point checkpoint.load at another step"
        ) from None
    if meta.get("format") not in READ_FORMATS:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r}, this version reads {list(READ_FORMATS)}"
        )
    if "model_spec" not in meta:
        raise CheckpointError(f"{path} has no model_spec")
    return meta


def _complete_steps(ckpt_root: Path) -> list[Path]:
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and (p / COMPLETE_FILE).exists()]
    return sorted(dirs, key=lambda p: p.name)


HF_CONFIG_FILE = "config.json"


def is_hf_directory(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model directory (config.json) rather than a checkpoint."""
    path = Path(path)
    return (
        (path / HF_CONFIG_FILE).is_file()
        and not (path / META_FILE).exists()
        and not (path / LATEST_FILE).exists()
        and not (path / "checkpoints").is_dir()
    )


# model_spec fields a checkpoint must share with the model it initialises, and the config field
# a user changes to match; the layout fields (tensor_parallel, attention_backend,
# activation_checkpointing) and init_std (which loaded weights override) may differ.
_SPEC_FIELDS = (
    ("shape.hidden_size", "model.hidden_size"),
    ("shape.num_layers", "model.num_layers"),
    ("shape.num_heads", "model.num_heads"),
    ("shape.num_kv_heads", "model.num_kv_heads"),
    ("shape.ffn_hidden_size", "model.ffn_hidden_size"),
    ("vocab.text_size", "tokenizer.text_size"),
    ("vocab.codebook_size", "tokenizer.codebook_size"),
    ("vocab.specials", "the special tokens (vocab.specials)"),
    ("vocab.text_tokenizer", "tokenizer.text"),
    ("vocab.vq_tokenizer", "tokenizer.vq_format / tokenizer.vq_checkpoint"),
    ("vocab_multiple", "model.vocab_multiple"),
    ("rope_theta", "model.rope_theta"),
    ("norm_eps", "model.norm_eps"),
    ("shuffle_window", "model.shuffle_window"),
    ("shuffle_mlp_blocks", "model.shuffle_mlp_blocks"),
    ("max_windows_per_side", "model.max_windows_per_side"),
)


def check_spec(source_spec: dict, run_spec: dict, source: Path) -> None:
    """Checks that a checkpoint's model spec fits the model it initialises (`checkpoint.load`).

    A source without token-shuffle (window 1) fits a run with any window: the run's shuffle
    layers keep their initial values, as when a curriculum turns token-shuffle on. A source of
    square images only (no window-position tables) fits a run with any table size: the tables
    start at zero, so the loaded model computes what it did (models/model.py `WindowPositions`).

    Args:
        source_spec: the checkpoint's `model_spec` (meta.json, or an HF export's config.json).
        run_spec: `ModelSpec.to_dict()` of the model being trained.
        source: the checkpoint, named in the error.

    Raises:
        CheckpointError: one line naming the first field that differs and both values.
    """
    skip = set()
    if source_spec.get("shuffle_window") == 1:
        skip = {"shuffle_window", "shuffle_mlp_blocks"}
    if not source_spec.get("max_windows_per_side"):
        skip.add("max_windows_per_side")
    for key, field in _SPEC_FIELDS:
        if key in skip:
            continue
        theirs, ours = source_spec, run_spec
        for part in key.split("."):
            theirs = theirs.get(part) if isinstance(theirs, dict) else None
            ours = ours.get(part) if isinstance(ours, dict) else None
        if isinstance(theirs, list | tuple):
            theirs, ours = list(theirs), list(ours or [])
        if theirs != ours:
            raise CheckpointError(
                f"checkpoint.load {source} holds another model: {field} is {theirs!r} there and "
                f"{ours!r} in this run ({key} of the model spec); load a checkpoint of this "
                f"model or change {field} to match"
            )


def resolve_checkpoint(path: str | Path) -> Path:
    """Finds the checkpoint directory a user means.

    Args:
        path: a run directory, its `checkpoints/` directory or one step directory. Run and
            checkpoints directories follow `latest`.

    Returns:
        The step directory (holding meta.json, model/ and COMPLETE).

    Raises:
        CheckpointError: nothing found, or the checkpoint is incomplete.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        target = path / name
        if not target.is_dir():
            raise CheckpointError(
                f"{path / LATEST_FILE} names {name!r}, which does not exist in {path}"
            )
        path = target
    elif not (path / META_FILE).exists():
        steps = _complete_steps(path) if path.is_dir() else []
        if not steps and is_hf_directory(path):
            raise CheckpointError(
                f"{path} is a Hugging Face model directory, not a training checkpoint; "
                "`ts-convert from-hf` turns it into one (checkpoint.load reads it directly)"
            )
        if not steps:
            raise CheckpointError(
                f"{path} holds no checkpoint (no meta.json, no `latest`, no complete step_* dir)"
            )
        path = steps[-1]
    if not (path / COMPLETE_FILE).exists():
        siblings = [p.name for p in _complete_steps(path.parent) if p != path]
        hint = f"; complete ones: {siblings}" if siblings else ""
        raise CheckpointError(
            f"checkpoint {path} has no {COMPLETE_FILE} marker: it was interrupted while saving "
            f"and may be partial{hint}"
        )
    return path


def previous_hint(ckpt_dir: Path) -> str:
    """What to fall back to from a damaged step directory: the previous complete one, named."""
    earlier = [p for p in _complete_steps(ckpt_dir.parent) if p.name < ckpt_dir.name]
    if earlier:
        return f"use the previous checkpoint {earlier[-1]}"
    return "re-save the checkpoint or use an earlier one"


def has_ema(ckpt_dir: Path) -> bool:
    """Whether a step directory holds the weights' moving average (`model_ema/`)."""
    return (Path(ckpt_dir) / EMA_DIR).is_dir()


def choose_weights(ckpt_dir: Path, weights: str) -> str:
    """The weight set to read: `raw`, `ema`, or `auto` (the average when the checkpoint has one).

    Raises:
        CheckpointError: `ema` asked of a checkpoint without an average, or an unknown name.
    """
    if weights == "auto":
        return "ema" if has_ema(ckpt_dir) else "raw"
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights {weights!r}; choose auto, raw or ema")
    if weights == "ema" and not has_ema(ckpt_dir):
        raise CheckpointError(
            f"{ckpt_dir} holds no {EMA_DIR}/ (the run had train.ema_decay = 0); export the trained "
            "weights with --weights raw, or train with train.ema_decay > 0"
        )
    return weights


def layer_files(
    ckpt_dir: Path, num_layers: int | None = None, weights: str = "raw"
) -> dict[int, list[Path]]:
    """{layer index: [file of TP rank 0, 1, ...]} of a checkpoint, checked for gaps.

    Args:
        ckpt_dir: the step directory.
        num_layers: transformer blocks L; when given, layers 0..L+1 must all be present.
        weights: `raw` (model/), `ema` (model_ema/) or an optimizer set (`OPTIMIZER_SETS`).
    """
    model_dir = Path(ckpt_dir) / _SET_DIRS[weights]
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is missing: the checkpoint holds no {weights} set")
    found: dict[int, dict[int, Path]] = {}
    for p in model_dir.iterdir():
        m = _LAYER_RE.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    if not found:
        raise CheckpointError(f"{model_dir} holds no layer_XXX-tpYY.safetensors files")
    last = max(found) if num_layers is None else num_layers + 1
    missing = sorted(set(range(last + 1)) - set(found))
    if missing:
        raise CheckpointError(
            f"{model_dir}: layer files missing for layer indices {missing} "
            f"(e.g. {layer_file_name(missing[0], 0)}); the checkpoint is incomplete"
        )
    extra = sorted(set(found) - set(range(last + 1)))
    if extra:
        raise CheckpointError(
            f"{model_dir}: layer indices {extra} beyond the model's {last + 1} (0..{last}); "
            "meta.json and the layer files disagree"
        )
    tp = max(len(v) for v in found.values())
    out = {}
    for layer, ranks in found.items():
        if sorted(ranks) != list(range(tp)):
            missing = sorted(set(range(tp)) - set(ranks))
            raise CheckpointError(
                f"{model_dir}: layer {layer} lacks TP rank file(s) {missing} "
                f"({layer_file_name(layer, missing[0])})"
            )
        out[layer] = [ranks[r] for r in range(tp)]
    return out


class _LayerReader:
    """Opens the TP shard files of one layer with clear errors for corrupt files."""

    def __init__(self, files: list[Path], ckpt_dir: Path):
        self.files = files
        self.ckpt_dir = ckpt_dir
        self.handles = [self._open(f) for f in files]
        keys = [list(h.keys()) for h in self.handles]
        for f, k in zip(files[1:], keys[1:], strict=True):
            if set(k) != set(keys[0]):
                diff = sorted(set(k) ^ set(keys[0]))
                raise CheckpointError(f"{f}: parameters differ from {files[0].name}: {diff[:3]}")
        self.keys = keys[0]

    def _fail(self, path: Path, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}); "
            f"{previous_hint(self.ckpt_dir)}"
        )

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise self._fail(path, err) from None

    def shapes(self, key: str) -> list[list[int]]:
        return [list(h.get_slice(key).get_shape()) for h in self.handles]

    def get(self, key: str, rank: int) -> torch.Tensor:
        try:
            return self.handles[rank].get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise self._fail(self.files[rank], err) from None

    def full(self, key: str) -> torch.Tensor:
        return merge_tp(key, [self.get(key, r) for r in range(len(self.handles))])


def num_model_layers(ckpt_dir: Path) -> int:
    """Transformer blocks L of a checkpoint (from meta.json's model_spec)."""
    return int(read_meta(ckpt_dir)["model_spec"]["shape"]["num_layers"])


def iter_full_state_dict(
    ckpt_dir: Path, weights: str = "raw"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (TokenShuffleLM name, full tensor), one layer at a time, TP shards merged.

    Only one parameter's shards and its merged copy are in memory at a time.

    Args:
        ckpt_dir: a run, checkpoints or step directory (see `resolve_checkpoint`).
        weights: `raw`, `ema` or `auto` (see `choose_weights`), or an optimizer set
            (`master`, `exp_avg`, `exp_avg_sq`).
    """
    for prefix, reader in _layer_readers(ckpt_dir, weights):
        for key in reader.keys:
            yield prefix + key, reader.full(key)


def _layer_readers(ckpt_dir: Path, weights: str) -> Iterator[tuple[str, _LayerReader]]:
    """(name prefix, reader) of each layer file of a checkpoint, in model order."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    num_layers = num_model_layers(ckpt_dir)
    name = weights if weights in OPTIMIZER_SETS else choose_weights(ckpt_dir, weights)
    files = layer_files(ckpt_dir, num_layers, name)
    for layer in range(num_layers + 2):
        yield layer_prefix(layer, num_layers), _LayerReader(files[layer], ckpt_dir)


def iter_full_shapes(ckpt_dir: Path, weights: str = "raw") -> Iterator[tuple[str, tuple[int, ...]]]:
    """Yields (TokenShuffleLM name, full shape) in `iter_full_state_dict` order, headers only."""
    for prefix, reader in _layer_readers(ckpt_dir, weights):
        for key in reader.keys:
            shapes = reader.shapes(key)
            rule = tp_rule(key)
            full = list(shapes[0])
            if rule is not None and len(shapes) > 1:
                full[rule[0]] = sum(s[rule[0]] for s in shapes)
            yield prefix + key, tuple(full)


def load_full_state_dict(ckpt_dir: Path, weights: str = "raw") -> dict[str, torch.Tensor]:
    """The whole TP-merged state dict in TokenShuffleLM names (small models, tests, previews)."""
    return dict(iter_full_state_dict(ckpt_dir, weights))


def _layer_modules(model_or_layers, num_layers: int) -> dict[int, nn.Module]:
    """{layer index: layer module} from a TokenShuffleLM, a list of all layer modules or a mapping."""
    obj = model_or_layers
    if isinstance(obj, Mapping):
        return {int(k): v for k, v in obj.items()}
    if hasattr(obj, "input_stage") and hasattr(obj, "blocks") and hasattr(obj, "output_stage"):
        stages = [obj.input_stage, *obj.blocks, obj.output_stage]
        return dict(enumerate(stages))
    if isinstance(obj, nn.Module) and isinstance(getattr(obj, "layers", None), nn.ModuleList):
        obj = list(obj.layers)
    if isinstance(obj, Sequence):
        if len(obj) != num_layers + 2:
            raise CheckpointError(
                f"got {len(obj)} layer modules; a list must hold all {num_layers + 2} "
                "(pass a {layer index: module} dict for a pipeline slice)"
            )
        return dict(enumerate(obj))
    raise TypeError(
        "load_into_model takes a TokenShuffleLM, a list of all layer modules or a "
        f"{{layer index: module}} dict, got {type(obj).__name__}"
    )


def load_into_model(
    model_or_layers,
    ckpt_dir: Path,
    tp_rank: int,
    tp_world: int,
    allow_missing: tuple[str, ...] = (),
    weights: str = "raw",
) -> list[str]:
    """Loads a checkpoint into a model of any TP size and pipeline layout.

    Each local layer module reads only its own layer's files: shards are merged to the full
    tensor and split for (tp_rank, tp_world), or read directly when the layouts agree.

    Args:
        model_or_layers: a TokenShuffleLM, the list of all layer modules, or a
            {layer index: layer module} dict (a pipeline stage's local layers).
        ckpt_dir: a run, checkpoints or step directory (resolved with `resolve_checkpoint`).
        tp_rank: this rank's tensor-parallel rank.
        tp_world: the model's tensor-parallel size.
        allow_missing: name substrings of parameters the checkpoint may lack (they keep their
            initial values), e.g. ("shuffle.",) when a stage turns token-shuffle on.
        weights: `raw`, `ema` or `auto` (see `choose_weights`).

    Returns:
        Names (TokenShuffleLM style) of parameters left at their initial values.

    Raises:
        CheckpointError: a missing/unexpected parameter or a shape mismatch (naming the first),
            or a truncated/corrupt file (naming it and the previous checkpoint).
    """
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    num_layers = num_model_layers(ckpt_dir)
    modules = _layer_modules(model_or_layers, num_layers)
    left: list[str] = []
    sets = iter_resharded(
        modules, ckpt_dir, tp_rank, tp_world, choose_weights(ckpt_dir, weights), allow_missing
    )
    for full_name, target, tensor in sets:
        if tensor is None:
            left.append(full_name)
            continue
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    if left:
        log.info("left %d parameters at init (allow_missing): %s", len(left), left[:4])
    return left


def iter_resharded(
    modules: Mapping[int, nn.Module],
    ckpt_dir: Path,
    tp_rank: int,
    tp_world: int,
    weights: str,
    allow_missing: tuple[str, ...] = (),
    targets=_tensor_state,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yields (TokenShuffleLM name, model tensor, checkpoint tensor for this TP rank) per tensor.

    Each local layer module reads only its own layer's files: shards are merged to the full
    tensor and split for (tp_rank, tp_world), or read directly when the layouts agree. The
    checkpoint tensor is None for a name matched by `allow_missing` that the files lack.

    Args:
        modules: {layer index: layer module} of this rank.
        ckpt_dir: a step directory (already resolved).
        tp_rank: this rank's tensor-parallel rank.
        tp_world: the model's tensor-parallel size.
        weights: the set to read (`WEIGHTS` or `OPTIMIZER_SETS` key).
        allow_missing: name substrings the checkpoint may lack.
        targets: module -> {name: tensor} the set holds (default: its tensor state dict).

    Raises:
        CheckpointError: a missing/unexpected tensor or a shape mismatch (naming the first),
            or a truncated/corrupt file (naming it and the previous checkpoint).
    """
    num_layers = num_model_layers(ckpt_dir)
    files = layer_files(ckpt_dir, num_layers, weights)
    ckpt_tp = len(files[0])
    for layer, module in sorted(modules.items()):
        if layer not in files:
            raise CheckpointError(
                f"the model has layer index {layer}; {ckpt_dir} has only 0..{len(files) - 1} "
                f"(checkpoint has {num_layers} blocks)"
            )
        prefix = layer_prefix(layer, num_layers)
        reader = _LayerReader(files[layer], ckpt_dir)
        params = targets(module)
        unexpected = sorted(set(reader.keys) - set(params))
        if unexpected:
            raise CheckpointError(
                f"{files[layer][0]}: parameter {prefix + unexpected[0]} is in the checkpoint "
                f"but not in the model ({len(unexpected)} such); the model spec differs from "
                f"{ckpt_dir / META_FILE}"
            )
        for key, target in params.items():
            full_name = prefix + key
            if key not in reader.keys:
                if any(p in full_name for p in allow_missing):
                    yield full_name, target, None
                    continue
                raise CheckpointError(
                    f"parameter {full_name} of the model is missing from {files[layer][0]} "
                    f"(pass allow_missing to keep its initial value)"
                )
            if ckpt_tp == tp_world:
                tensor = reader.get(key, tp_rank)
            else:
                tensor = split_tp(key, reader.full(key), tp_rank, tp_world)
            shape = tuple(getattr(target, "ds_shape", target.shape))  # ZeRO-3: the full one
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"parameter {full_name}: checkpoint shape {tuple(tensor.shape)} (TP "
                    f"{ckpt_tp} -> {tp_world}) != model shape {shape}; the model "
                    f"spec differs from {ckpt_dir / META_FILE}"
                )
            yield full_name, target, tensor
