"""Run configuration: one dataclass per section, loaded from TOML and overridden from the CLI.

Precedence is CLI > TOML > dataclass defaults. A TOML file may `include = ["base.toml"]`
(paths relative to the including file); the including file wins over what it includes.
Every component receives only its own section; the cross-section rules live in `validate()`.

CLI overrides use `--section.key value` (or `--section.key=value`). Lists of stages are
addressed by index: `--curriculum.stages.1.steps 200`. Values are parsed with the field's type;
lists and tables accept TOML/JSON literals (`--data.sources '[{url="a/", weight=1.0}]'`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_ts.buckets import DEFAULT_GRID_MULTIPLE, Bucket, make_buckets
from megatron_ts.errors import EXIT_USAGE
from megatron_ts.models.flavors import FLAVORS, ModelShape
from megatron_ts.sequence import SequenceLayout

# Choice fields: the Literal is the one list of accepted values; loading and validate() read it.
AttentionBackend = Literal["auto", "sdpa", "flash_attn"]
VqFormat = Literal["native", "llamagen", "chameleon"]  # = hf/vq_token_shuffle.VQ_FORMATS
Recompute = Literal["none", "selective", "full"]
DistBackend = Literal["auto", "nccl", "gloo"]
LrSchedule = Literal["cosine", "linear", "constant", "wsd"]
Precision = Literal["auto", "bf16", "fp32"]
CarryOver = Literal["weights", "weights+optimizer"]
CfgSchedule = Literal["constant", "linear", "half-linear"]  # = hf/generation_token_shuffle's


class ConfigError(ValueError):
    """A malformed or inconsistent configuration; the message names the field and the fix."""

    exit_code = EXIT_USAGE


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    """Directory holding checkpoints, TensorBoard events, the resolved config and previews."""
    seed: int = 1234
    """Seed for weight init, data order and sampling; every rank derives its streams from it."""
    name: str = "megatron_ts"
    """Human-readable run name, shown in logs and TensorBoard."""


@dataclass
class ModelConfig:
    flavor: str = "debug"
    """Named size from `megatron_ts.models.flavors.FLAVORS` (debug, demo, 2.7B, 7B)."""
    shuffle_window: int = 1
    """Token-shuffle window s: s x s image tokens share one position. 1 disables shuffling.
    Used when no curriculum is given; each curriculum stage sets its own (stage default 1)."""
    shuffle_mlp_blocks: int = 2
    """Residual MLP blocks on each side of token-shuffle / token-unshuffle."""
    hidden_size: int | None = None
    """Overrides the flavor's hidden size."""
    num_layers: int | None = None
    """Overrides the flavor's number of transformer blocks."""
    num_heads: int | None = None
    """Overrides the flavor's attention heads."""
    num_kv_heads: int | None = None
    """Overrides the flavor's key/value heads (grouped-query attention when < num_heads)."""
    ffn_hidden_size: int | None = None
    """Overrides the flavor's SwiGLU inner width."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""
    vocab_multiple: int = 128
    """The vocabulary is padded to a multiple of this; every tensor-parallel size must divide it."""
    attention_backend: AttentionBackend = "auto"
    """Core attention: auto (flash-attn when importable on CUDA, else SDPA), sdpa, flash_attn."""
    max_windows_per_side: int = 0
    """Size of the window-position tables that tell the model an image's shape and where its rows
    end (docs/model.md "Aspect ratios"): the most shuffle windows down or across any image it
    trains on or draws. Required (>= the largest bucket's) when a stage lists aspect-ratio
    buckets; 0 builds no tables (square images only). Part of the checkpoint's shape."""

    def shape(self) -> ModelShape:
        """The flavor's shape with this section's explicit overrides applied.

        Raises:
            ConfigError: an unknown flavor, a size below 1 or heads that do not divide.
        """
        if self.flavor not in FLAVORS:
            raise ConfigError(f"model.flavor = {self.flavor!r}; choose one of {sorted(FLAVORS)}")
        overrides = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
        }
        for name, value in overrides.items():
            if value is not None and value < 1:  # checked before anything divides by it
                raise ConfigError(f"model.{name} = {value}; use 1 or more (or leave it unset)")
        shape = dataclasses.replace(
            FLAVORS[self.flavor], **{k: v for k, v in overrides.items() if v is not None}
        )
        if self.num_heads is not None and self.num_kv_heads is None:
            shape = dataclasses.replace(shape, num_kv_heads=shape.num_heads)
        if shape.hidden_size % shape.num_heads:
            raise ConfigError(
                f"model.hidden_size = {shape.hidden_size} is not divisible by model.num_heads = "
                f"{shape.num_heads}"
            )
        if shape.num_heads % shape.num_kv_heads:
            raise ConfigError(
                f"model.num_heads = {shape.num_heads} is not divisible by model.num_kv_heads = "
                f"{shape.num_kv_heads}"
            )
        if self.shuffle_mlp_blocks < 0:
            raise ConfigError(
                f"model.shuffle_mlp_blocks = {self.shuffle_mlp_blocks}; use 0 or more"
            )
        if self.vocab_multiple < 1:
            raise ConfigError(f"model.vocab_multiple = {self.vocab_multiple}; use 1 or more")
        return shape


@dataclass
class TokenizerConfig:
    text: str = "byte"
    """Text tokenizer: `byte` (built-in byte level, 256 ids) or a path to a `tokenizers` JSON."""
    text_size: int | None = None
    """Text ids of the tokenizer; None reads it from the tokenizer (byte = 256). Setting it lets
    `--dry-run` plan a recipe without the tokenizer file at hand."""
    vq_format: VqFormat = "native"
    """Visual tokenizer checkpoint layout: native, llamagen or chameleon."""
    vq_checkpoint: str | None = None
    """Path to the VQ checkpoint; required to tokenize or decode images."""
    codebook_size: int = 16384
    """Number of VQ codes appended to the vocabulary (LlamaGen VQ-16: 16384, Chameleon: 8192)."""
    downsample: int = 16
    """Pixels per code along each side (16 for LlamaGen VQ-16 and Chameleon)."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (megatron-core layers). Must divide heads, kv heads and ffn width."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed pipeline engine). Must divide the number of layers."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3. With pipeline > 1 only 0 or 1 are possible."""
    activation_checkpointing: Recompute = "none"
    """none, selective (core attention only) or full (every transformer block)."""
    backend: DistBackend = "auto"
    """torch.distributed backend: auto (nccl on CUDA, else gloo), nccl or gloo."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Floor of the decay."""
    schedule: LrSchedule = "cosine"
    """cosine, linear, constant or wsd (warmup-stable-decay)."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""
    decay_fraction: float = 0.2
    """wsd only: final fraction of the steps spent decaying to min_lr."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to norms, biases or embeddings."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps when no curriculum is given."""
    micro_batch: int = 1
    """Samples per rank per forward/backward."""
    global_batch: int = 8
    """Samples per optimizer step = micro_batch x grad-accumulation x data-parallel size."""
    precision: Precision = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."""
    z_loss: float = 0.0
    """z-loss coefficient on log(Z)^2 of every prediction (the paper adds it at 2048 px)."""
    text_loss_weight: float = 1.0
    """Weight of the caption next-token loss beside the image-code loss."""
    max_nonfinite_in_row: int = 5
    """Stop after this many consecutive steps with non-finite loss or gradients."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.99; 0 = off).
    Checkpoints store it in `model_ema/`, `ts-convert to-hf` exports it; each stage starts its
    own average from the weights it begins with. Not with parallel.zero_stage = 3."""


@dataclass
class SourceConfig:
    url: str = ""
    """Token-shard directory or manifest: a local path or an s3:// URL."""
    weight: float = 1.0
    """Mixing weight among the stage's sources."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Token-shard sources when no curriculum is given."""
    resolution: int = 256
    """Image side in pixels when no curriculum is given."""
    buckets: list[str] = field(default_factory=list)
    """Aspect-ratio buckets "W:H" when no curriculum is given (empty: square images only)."""
    grid_multiple: int = DEFAULT_GRID_MULTIPLE
    """Bucket sides are multiples of tokenizer.downsample x this (as `ts-data tokenize
    --grid-multiple`, which must have used the same value)."""
    caption_len: int = 64
    """Caption tokens per sample (padded or truncated) when no curriculum is given."""
    caption_dropout: float = 0.1
    """Probability of replacing the caption by an empty one (classifier-free guidance)."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Sample-level shuffle buffer per stream (changing it changes the sample order)."""
    max_error_rate: float = 0.01
    """Fraction of corrupt samples tolerated before the run stops, naming shard and key."""
    resample_shards: bool = False
    """Allow fewer shards than data.streams by resampling shards (no exact epochs)."""
    s3_endpoint: str | None = None
    """Endpoint URL for S3-compatible stores; None uses AWS."""
    streams: int = 0
    """Canonical streams (lanes) per source; 0: the largest power of two <= min(64, shards of
    any source). The sample order depends on it (like the seed), never on the DP size or
    workers; a multiple of the DP size avoids reading a stream on several ranks (docs/loader.md)."""
    synthetic: bool = False
    """Train on random codes and captions (throughput runs without data)."""


@dataclass
class StageConfig:
    name: str = "stage"
    """Stage name, used in logs and checkpoints."""
    resolution: int = 256
    """Image side in pixels; with buckets, the pixel budget is its square."""
    buckets: list[str] = field(default_factory=list)
    """Aspect-ratio buckets "W:H" of this stage, for example ["1:1", "4:3", "3:4", "2:1"], each
    at about resolution^2 pixels (megatron_ts/buckets.py); empty: square images only."""
    shuffle_window: int = 1
    """Token-shuffle window for this stage."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Token-shard sources read by this stage only."""
    global_batch: int = 8
    """Samples per optimizer step."""
    micro_batch: int = 1
    """Samples per rank per forward/backward."""
    caption_len: int = 64
    """Caption tokens per sample."""
    steps: int = 0
    """Stage length in optimizer steps (0: derive from `tokens`)."""
    tokens: int = 0
    """Stage length in training tokens (sequence positions x samples); used when steps == 0."""
    lr: float | None = None
    """Peak learning rate of this stage (None: optim.lr)."""
    min_lr: float | None = None
    """Decay floor of this stage (None: optim.min_lr)."""
    warmup_steps: int | None = None
    """Warmup of this stage (None: optim.warmup_steps)."""
    schedule: LrSchedule | None = None
    """Schedule of this stage (None: optim.schedule)."""
    z_loss: float | None = None
    """z-loss coefficient of this stage (None: train.z_loss)."""
    carry_over: CarryOver = "weights+optimizer"
    """What the stage takes from the one before: weights or weights+optimizer."""
    tensor: int | None = None
    """Tensor-parallel size for this stage (None: parallel.tensor)."""
    pipeline: int | None = None
    """Pipeline stages for this stage (None: parallel.pipeline)."""


@dataclass
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=list)
    """Ordered stages; empty means one stage built from train, data and model sections."""


@dataclass
class CheckpointConfig:
    interval_steps: int = 1000
    """Save every N optimizer steps (0 disables step-based saves)."""
    interval_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0 disables)."""
    keep_last: int = 3
    """Checkpoints kept in the run directory; older ones are deleted after a good save."""
    load: str | None = None
    """Initialise from this checkpoint or HF directory when the run directory has none: weights
    only (docs/checkpoint.md)."""
    load_optimizer: bool = False
    """With checkpoint.load: also load the optimizer state (same layout and model only)."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when one exists."""
    save_on_exit: bool = True
    """Save a final checkpoint at the end and on SIGTERM / SIGUSR1."""


@dataclass
class LoggingConfig:
    interval: int = 10
    """Log metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tensorboard."""
    level: str = "INFO"
    """Console log level."""
    preview_interval: int = 0
    """Sample preview images every N steps (0 disables)."""
    preview_prompts: list[str] = field(default_factory=list)
    """Prompts for preview images."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; None looks the GPU up in the built-in table
    (docs/metrics.md). CPU runs report TFLOP/s but no MFU unless this is set."""
    sample_keys: bool = False
    """Append the keys of the samples each step trained on to run_dir/samples/dp_RRRRR.jsonl
    (one JSON line {"step", "keys"} per step and data-parallel rank), to audit the data order.
    A resume after a crash writes the replayed steps again: the last line of a step counts."""


@dataclass
class SamplingDefaults:
    """Sampling defaults of this model: `ts-convert to-hf` writes them into the export's
    generation_config.json (what ts-generate and ts-eval use unless told otherwise), and the
    trainer's preview images use them."""

    cfg_scale: float = 7.5
    """Classifier-free guidance scale (1 = no guidance)."""
    cfg_schedule: CfgSchedule = "half-linear"
    """Guidance over the decoding steps: constant, linear or half-linear (the paper's)."""
    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily."""
    top_k: int = 0
    """Sample from the k most likely codes (0 = all)."""
    top_p: float = 1.0
    """Nucleus mass (1 = all)."""


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with typo detection
# ----------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Converts plain TOML/JSON data to the annotated type, naming `where` on failure."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(
            f"{where}: null is not allowed here; give a {getattr(tp, '__name__', tp)}"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options:
            raise ConfigError(f"{where} = {value!r}; choose one of {list(options)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float) if not isinstance(value, int) else value
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        # Full dotted names, so a typo deep in a stage list is found at once.
        names = [f"{where}.{k}" if where else k for k in unknown]
        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise ConfigError(
            f"unknown key(s) {names}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; valid keys{' of ' + where if where else ''} are {sorted(known)} "
            "(a typo would otherwise be silently ignored)"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a TOML config, resolving `include = [...]` relative to the file."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in _seen]}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing --config path")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = _merge(merged, load_toml(path.parent / inc, _seen + (path,)))
    return _merge(merged, data)


def _parse_cli_value(raw: str) -> Any:
    """Parses a CLI value as a TOML literal when possible, else keeps the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_overrides(argv: list[str]) -> list[tuple[list[str], Any]]:
    """Turns `--a.b value` / `--a.b=value` pairs into (path, value) overrides."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --section.key value"
            )
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        out.append((key.split("."), _parse_cli_value(raw)))
    return out


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--{'.'.join(path)}: {where} is not a valid list index")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--{'.'.join(path)}: {where} is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--{'.'.join(path)}: {last} is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def build_config(data: dict[str, Any]) -> Config:
    """Builds a Config from nested plain data (TOML/JSON), rejecting unknown keys."""
    return _build(Config, data, "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Loads defaults <- TOML file <- CLI overrides and returns the typed config.

    Args:
        path: TOML file, or None for defaults only.
        overrides: CLI tokens such as ["--train.steps", "10", "--job.seed=3"].

    Returns:
        The merged, typed configuration (not yet validated; call `validate`).
    """
    data = load_toml(path) if path is not None else {}
    # Materialise the stage list before index overrides so `--curriculum.stages.0.x` works.
    for keys, value in parse_overrides(overrides or []):
        _apply_override(data, keys, value)
    return build_config(data)


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Writes the resolved config as JSON into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(cfg.to_json())
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------------
# Stages and validation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedStage:
    """A curriculum stage with every inherited value filled in."""

    index: int
    name: str
    resolution: int
    shuffle_window: int
    sources: tuple[SourceConfig, ...]
    global_batch: int
    micro_batch: int
    caption_len: int
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    schedule: LrSchedule
    z_loss: float
    carry_over: CarryOver
    tensor: int
    pipeline: int
    buckets: tuple[str, ...] = ()
    """Aspect-ratio bucket names; empty for square images only."""
    grid_multiple: int = DEFAULT_GRID_MULTIPLE
    """Bucket sides are multiples of downsample x this (data.grid_multiple)."""

    def layout(self, downsample: int) -> SequenceLayout:
        """The sequence layout of this stage's samples (grid, positions, prompt format).

        Args:
            downsample: pixels per code along each side (tokenizer.downsample).
        """
        return SequenceLayout.from_resolution(
            self.resolution,
            downsample,
            caption_len=self.caption_len,
            shuffle_window=self.shuffle_window,
        )

    def grid(self, downsample: int) -> int:
        """Codes per side of the square image (resolution / downsample): the pixel budget's."""
        return self.resolution // downsample

    def bucket_sizes(self, downsample: int) -> tuple[Bucket, ...]:
        """The stage's aspect-ratio buckets with their pixel sizes; () without buckets.

        Raises:
            ValueError: a malformed or repeated ratio.
        """
        if not self.buckets:
            return ()
        return make_buckets(self.buckets, self.resolution, downsample * self.grid_multiple)

    def layouts(self, downsample: int) -> dict[str, SequenceLayout]:
        """{bucket name: its sequence layout}; {"1:1": `layout`} for a stage without buckets."""
        if not self.buckets:
            return {"1:1": self.layout(downsample)}
        return {
            b.name: SequenceLayout.from_resolution(
                (b.height, b.width),
                downsample,
                caption_len=self.caption_len,
                shuffle_window=self.shuffle_window,
            )
            for b in self.bucket_sizes(downsample)
        }

    def seq_len(self, downsample: int) -> int:
        """Transformer positions per sample (`layout(downsample).seq_len`)."""
        return self.layout(downsample).seq_len


def resolve_stages(cfg: Config) -> list[ResolvedStage]:
    """Returns the curriculum stages with defaults from optim/train/model/parallel filled in.

    With no `[[curriculum.stages]]`, one stage is made from the train, data and model sections.
    Stage lengths given in tokens are converted to steps (rounded up).
    """
    downsample = cfg.tokenizer.downsample
    stages = cfg.curriculum.stages or [
        StageConfig(
            name="main",
            resolution=cfg.data.resolution,
            buckets=list(cfg.data.buckets),
            shuffle_window=cfg.model.shuffle_window,
            sources=list(cfg.data.sources),
            global_batch=cfg.train.global_batch,
            micro_batch=cfg.train.micro_batch,
            caption_len=cfg.data.caption_len,
            steps=cfg.train.steps,
        )
    ]
    out = []
    for i, st in enumerate(stages):
        steps = st.steps
        if steps <= 0 and st.tokens > 0:
            try:
                seq_len = SequenceLayout.from_resolution(
                    st.resolution,
                    downsample,
                    caption_len=st.caption_len,
                    shuffle_window=st.shuffle_window,
                ).seq_len
            except ValueError:
                seq_len = 1  # a bad geometry: validate() names the field after resolving
            steps = -(-st.tokens // (st.global_batch * seq_len))
        out.append(
            ResolvedStage(
                index=i,
                name=st.name,
                resolution=st.resolution,
                shuffle_window=st.shuffle_window,
                buckets=tuple(st.buckets),
                grid_multiple=cfg.data.grid_multiple,
                sources=tuple(st.sources),
                global_batch=st.global_batch,
                micro_batch=st.micro_batch,
                caption_len=st.caption_len,
                steps=steps,
                lr=cfg.optim.lr if st.lr is None else st.lr,
                min_lr=cfg.optim.min_lr if st.min_lr is None else st.min_lr,
                warmup_steps=cfg.optim.warmup_steps if st.warmup_steps is None else st.warmup_steps,
                schedule=cfg.optim.schedule if st.schedule is None else st.schedule,
                z_loss=cfg.train.z_loss if st.z_loss is None else st.z_loss,
                carry_over=st.carry_over,
                tensor=cfg.parallel.tensor if st.tensor is None else st.tensor,
                pipeline=cfg.parallel.pipeline if st.pipeline is None else st.pipeline,
            )
        )
    return out


# Range rules: (accepts the value, what to use instead). None values (unset optionals) pass.
_AT_LEAST_1 = (lambda v: v >= 1, "use 1 or more")
_AT_LEAST_0 = (lambda v: v >= 0, "use 0 or more")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "use a finite number > 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "use a finite number >= 0")
_BETA = (lambda v: 0 <= v < 1, "use 0 <= beta < 1")
_NOT_EMPTY = (lambda v: bool(v.strip()), "give a non-empty value")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Every field whose value can be out of range, by section; choice (Literal) fields are checked by
# _check_choices, stage-level values on the resolved stages below. Fields not listed take any
# value of their type (names, paths checked where they are opened, flags).
_FIELD_RULES = {
    "job.run_dir": _NOT_EMPTY,
    "job.seed": (lambda v: 0 <= v < 2**63, "use 0 <= seed < 2^63"),
    "model.rope_theta": _POSITIVE,
    "model.norm_eps": _POSITIVE,
    "model.init_std": _POSITIVE,
    "tokenizer.text": _NOT_EMPTY,
    "tokenizer.text_size": _AT_LEAST_1,
    "tokenizer.codebook_size": _AT_LEAST_1,
    "tokenizer.downsample": _AT_LEAST_1,
    "model.max_windows_per_side": _AT_LEAST_0,
    "data.grid_multiple": _AT_LEAST_1,
    "optim.lr": _POSITIVE,
    "optim.min_lr": _NON_NEGATIVE,
    "optim.warmup_steps": _AT_LEAST_0,
    "optim.decay_fraction": (lambda v: 0 < v <= 1, "use 0 < fraction <= 1"),
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.beta1": _BETA,
    "optim.beta2": _BETA,
    "optim.eps": _POSITIVE,
    "optim.grad_clip": (_NON_NEGATIVE[0], "use a finite number >= 0 (0 = no clipping)"),
    "train.z_loss": _NON_NEGATIVE,
    "train.text_loss_weight": _NON_NEGATIVE,
    "train.max_nonfinite_in_row": _AT_LEAST_1,
    "data.resolution": _AT_LEAST_1,
    "data.caption_len": _AT_LEAST_0,
    "data.num_workers": (_AT_LEAST_0[0], "use 0 (load in the training process) or more"),
    "data.shuffle_buffer": (_AT_LEAST_0[0], "use 0 (no shuffling) or more"),
    "data.streams": (_AT_LEAST_0[0], "use 0 (auto: from the shard counts) or more"),
    "data.max_error_rate": (lambda v: 0 <= v <= 1, "use a fraction 0 <= rate <= 1"),
    "checkpoint.interval_steps": (_AT_LEAST_0[0], "use 0 (no step-based saves) or more"),
    "checkpoint.interval_minutes": (_NON_NEGATIVE[0], "use a finite number >= 0 (0 = off)"),
    "checkpoint.load": _NOT_EMPTY,
    "logging.interval": _AT_LEAST_1,
    "logging.level": (lambda v: v.upper() in _LOG_LEVELS, f"choose one of {list(_LOG_LEVELS)}"),
    "logging.preview_interval": (_AT_LEAST_0[0], "use 0 (no previews) or more"),
    "logging.peak_tflops": _POSITIVE,
    "sampling.cfg_scale": (lambda v: v >= 1, "use 1 (no guidance) or more"),
    "sampling.temperature": (lambda v: v >= 0, "use 0 (greedy) or more"),
    "sampling.top_k": (_AT_LEAST_0[0], "use 0 (all codes) or more"),
    "sampling.top_p": (lambda v: 0 < v <= 1, "use 0 < top_p <= 1"),
}
# Fields of one curriculum stage (curriculum.stages[i].*) and of one data source.
_STAGE_RULES = {
    "resolution": _AT_LEAST_1,
    "caption_len": _AT_LEAST_0,
    "tokens": _AT_LEAST_0,
    "lr": _POSITIVE,
    "min_lr": _NON_NEGATIVE,
    "warmup_steps": _AT_LEAST_0,
    "z_loss": _NON_NEGATIVE,
}
_SOURCE_RULES = {"url": _NOT_EMPTY, "weight": _POSITIVE}


def _check_rules(obj: Any, prefix: str, rules: dict) -> None:
    """Raises ConfigError for the first field of `obj` a rule rejects, e.g. `optim.lr = nan`."""
    for name, (accepts, fix) in rules.items():
        value = getattr(obj, name.rpartition(".")[2])
        if value is not None and not accepts(value):
            raise ConfigError(f"{prefix}{name} = {value!r}; {fix}")


def _check_ranges(cfg: Config) -> None:
    """Range checks of every section, stage and source (before anything divides by them)."""
    for section in {name.partition(".")[0] for name in _FIELD_RULES}:
        rules = {k: v for k, v in _FIELD_RULES.items() if k.startswith(section + ".")}
        _check_rules(getattr(cfg, section), "", rules)
    for i, source in enumerate(cfg.data.sources):
        _check_rules(source, f"data.sources[{i}].", _SOURCE_RULES)
    for i, stage in enumerate(cfg.curriculum.stages):
        _check_rules(stage, f"curriculum.stages[{i}].", _STAGE_RULES)
        for j, source in enumerate(stage.sources):
            _check_rules(source, f"curriculum.stages[{i}].sources[{j}].", _SOURCE_RULES)


def _literal_options(tp: Any) -> tuple | None:
    """The accepted values of a `Literal[...]` (or `Literal[...] | None`) hint, else None."""
    tp, _ = _unwrap_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _check_choices(cfg: Config) -> None:
    """Every choice field of every section holds one of its Literal's values (a config built in
    code skips the check at load time)."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for name, hint in typing.get_type_hints(type(obj)).items():
            options, value = _literal_options(hint), getattr(obj, name)
            if options is not None and value is not None and value not in options:
                raise ConfigError(
                    f"{section.name}.{name} = {value!r}; choose one of {list(options)}"
                )


# The field each value of the implicit single stage (no [[curriculum.stages]]) comes from.
_IMPLICIT_STAGE_FIELDS = {
    "resolution": "data.resolution",
    "buckets": "data.buckets",
    "caption_len": "data.caption_len",
    "shuffle_window": "model.shuffle_window",
    "global_batch": "train.global_batch",
    "micro_batch": "train.micro_batch",
    "steps": "train.steps",
    "tokens": "train.steps",
    "schedule": "optim.schedule",
    "carry_over": "curriculum.stages",
    "tensor": "parallel.tensor",
    "pipeline": "parallel.pipeline",
}
# Stage keys that fall back to another section when a curriculum stage leaves them unset.
_INHERITED_STAGE_FIELDS = {
    "schedule": "optim.schedule",
    "tensor": "parallel.tensor",
    "pipeline": "parallel.pipeline",
}


def stage_field(cfg: Config, index: int, key: str) -> str:
    """The config field a resolved stage value came from, for error messages.

    Args:
        cfg: the merged configuration.
        index: stage index.
        key: StageConfig field name.

    Returns:
        `curriculum.stages[i].key` for an explicit stage value, else the section field the value
        was inherited from (`parallel.tensor`, `train.global_batch`, ...).
    """
    if not cfg.curriculum.stages:
        return _IMPLICIT_STAGE_FIELDS[key]
    if key in _INHERITED_STAGE_FIELDS and getattr(cfg.curriculum.stages[index], key) is None:
        return _INHERITED_STAGE_FIELDS[key]
    return f"curriculum.stages[{index}].{key}"


def _check_sections(cfg: Config) -> None:
    """Cross-field rules inside and between sections (stage-independent)."""
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage = {cfg.parallel.zero_stage}; use 0, 1, 2 or 3")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(
            f"train.ema_decay = {cfg.train.ema_decay}; use 0 (off) or a decay in (0, 1), e.g. 0.99"
        )
    if cfg.train.ema_decay and cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "train.ema_decay with parallel.zero_stage = 3: the weight average is not supported "
            "with partitioned parameters; use parallel.zero_stage = 1 or 2, or train.ema_decay = 0"
        )
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last = {cfg.checkpoint.keep_last}; keep at least 1")
    if cfg.checkpoint.load_optimizer and cfg.checkpoint.load is None:
        raise ConfigError(
            "checkpoint.load_optimizer = true without checkpoint.load; set checkpoint.load to the "
            "checkpoint whose optimizer state to load, or drop checkpoint.load_optimizer"
        )
    if not 0.0 <= cfg.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout = {cfg.data.caption_dropout}; use 0 <= p < 1")


@dataclasses.dataclass(frozen=True)
class _StageCheck:
    """What a stage check needs to name the offending field: `at(key)` is the config field a
    resolved value came from, `of` the stage's name for messages (empty for the implicit stage)."""

    cfg: Config
    stage: ResolvedStage

    def at(self, key: str) -> str:
        return stage_field(self.cfg, self.stage.index, key)

    @property
    def of(self) -> str:
        return f" (stage {self.stage.name!r})" if self.cfg.curriculum.stages else ""


def _check_stage_plan(c: _StageCheck) -> None:
    """The stage's schedule, carry-over and length."""
    st, at, of = c.stage, c.at, c.of
    for key, options in (("schedule", LrSchedule), ("carry_over", CarryOver)):
        value = getattr(st, key)
        if value not in typing.get_args(options):
            raise ConfigError(
                f"{at(key)} = {value!r}{of}; choose one of {list(typing.get_args(options))}"
            )
    if st.steps <= 0:
        fix = f"set {at('steps')} or {at('tokens')}" if c.cfg.curriculum.stages else "use 1 or more"
        raise ConfigError(f"{at('steps')} = {st.steps}{of}: the stage has no length; {fix}")


def _check_stage_image(c: _StageCheck, hidden_size: int) -> None:
    """Resolution, tokenizer downsampling and shuffle window fit together (the grid sides divide
    by the window, the hidden size by s^2). `SequenceLayout` asserts the same; these messages
    name the config fields."""
    st, at, of = c.stage, c.at, c.of
    if st.shuffle_window < 1:
        raise ConfigError(f"{at('shuffle_window')} = {st.shuffle_window}{of}; use 1 or more")
    downsample = c.cfg.tokenizer.downsample
    if st.resolution % downsample:
        raise ConfigError(
            f"{at('resolution')} = {st.resolution}{of} is not a multiple of "
            f"tokenizer.downsample = {downsample}"
        )
    grid = st.resolution // downsample
    if grid % st.shuffle_window:
        raise ConfigError(
            f"{at('shuffle_window')} = {st.shuffle_window}{of}: the image grid "
            f"{grid}x{grid} ({at('resolution')} {st.resolution} / tokenizer.downsample {downsample}) "
            f"is not divisible by it; pick a window dividing {grid} or change the resolution"
        )
    if hidden_size % (st.shuffle_window**2):
        raise ConfigError(
            f"{at('shuffle_window')} = {st.shuffle_window}{of}: hidden size "
            f"{hidden_size} is not divisible by s^2 = {st.shuffle_window**2}"
        )
    _check_stage_buckets(c)


def _check_stage_buckets(c: _StageCheck) -> None:
    """Aspect-ratio buckets parse, tile by the shuffle window and fit the window-position tables."""
    st, at, of = c.stage, c.at, c.of
    if not st.buckets:
        return
    downsample, limit = c.cfg.tokenizer.downsample, c.cfg.model.max_windows_per_side
    try:
        layouts = st.layouts(downsample)
    except ValueError as exc:
        raise ConfigError(f"{at('buckets')}{of}: {exc}") from None
    widest = max(max(layout.window_grid) for layout in layouts.values())
    if widest > limit:
        raise ConfigError(
            f"model.max_windows_per_side = {limit}, but {at('buckets')}{of} has images of "
            f"{widest} windows on a side; set model.max_windows_per_side = {widest} or more "
            "(it fixes the model's shape, so cover the largest stage from the start)"
        )


def _check_stage_parallel(c: _StageCheck, shape: ModelShape) -> None:
    """Tensor and pipeline sizes divide the model's dimensions; ZeRO fits the pipeline."""
    cfg, st, at, of = c.cfg, c.stage, c.at, c.of
    tp, pp = st.tensor, st.pipeline
    if tp < 1:
        raise ConfigError(f"{at('tensor')} = {tp}{of}; use 1 or more")
    if pp < 1:
        raise ConfigError(f"{at('pipeline')} = {pp}{of}; use 1 or more")
    for label, value in (
        ("model.num_heads", shape.num_heads),
        ("model.num_kv_heads", shape.num_kv_heads),
        ("model.ffn_hidden_size", shape.ffn_hidden_size),
    ):
        if value % tp:
            raise ConfigError(
                f"{at('tensor')} = {tp}{of} does not divide {label} = {value} "
                f"(flavor {cfg.model.flavor!r}); pick a tensor-parallel size dividing it"
            )
    if cfg.model.vocab_multiple % tp:
        raise ConfigError(
            f"{at('tensor')} = {tp}{of} does not divide model.vocab_multiple = "
            f"{cfg.model.vocab_multiple}, so the padded vocabulary cannot be split evenly; "
            f"set model.vocab_multiple to a multiple of {tp}"
        )
    if shape.num_layers % pp:
        raise ConfigError(
            f"{at('pipeline')} = {pp}{of} does not divide model.num_layers = "
            f"{shape.num_layers}; pick a pipeline size dividing it"
        )
    if pp > 1 and cfg.parallel.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage = {cfg.parallel.zero_stage} with {at('pipeline')} = "
            f"{pp}{of}: DeepSpeed's pipeline engine supports ZeRO 0 or 1 only; set "
            "parallel.zero_stage = 1"
        )


def _check_stage_batch(c: _StageCheck, world_size: int | None) -> None:
    """Micro and global batch sizes, and (given the world size) the data-parallel split."""
    st, at, of = c.stage, c.at, c.of
    if st.micro_batch < 1:
        raise ConfigError(f"{at('micro_batch')} = {st.micro_batch}{of}; use 1 or more")
    if st.global_batch < 1:
        raise ConfigError(f"{at('global_batch')} = {st.global_batch}{of}; use 1 or more")
    if world_size is None:
        return
    model_parallel = st.tensor * st.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by {at('tensor')} x "
            f"{at('pipeline')} = {model_parallel}{of}"
        )
    dp = world_size // model_parallel
    if st.global_batch % (st.micro_batch * dp):
        raise ConfigError(
            f"{at('global_batch')} = {st.global_batch}{of} is not divisible by "
            f"{at('micro_batch')} = {st.micro_batch} x data-parallel size {dp}; "
            f"use a multiple of {st.micro_batch * dp}"
        )


def validate(cfg: Config, world_size: int | None = 1) -> list[ResolvedStage]:
    """Checks cross-section consistency and returns the resolved stages.

    Args:
        cfg: the merged configuration.
        world_size: number of ranks the run will use; None skips the layout checks that need it
            (the dry run plans for any cluster size).

    Raises:
        ConfigError: naming the first offending field, its value and how to fix it.
    """
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_sections(cfg)
    shape = cfg.model.shape()
    stages = resolve_stages(cfg)
    if not stages:
        raise ConfigError("curriculum.stages is empty; give at least one stage")
    for stage in stages:
        check = _StageCheck(cfg, stage)
        _check_stage_plan(check)
        _check_stage_image(check, shape.hidden_size)
        _check_stage_parallel(check, shape)
        _check_stage_batch(check, world_size)
    return stages
