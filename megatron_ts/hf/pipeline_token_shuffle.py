"""Prompts in, PIL images out, from an export directory: `TokenShufflePipeline`.

This file is copied into every export and imports only torch, transformers, safetensors and (to
return images) Pillow, so a directory written by `ts-convert to-hf` samples images without
megatron_ts installed:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exports/demo", trust_remote_code=True)
    images = model.pipeline()(["a red circle on the left"], num_images_per_prompt=2).images

`ts-generate`, `ts-eval` and the trainer's previews sample through the same class. Loading checks
every file it needs first: a missing or mismatched file fails with a message naming it and what to
do, instead of an index error deep inside decoding.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import GenerationConfig

from .configuration_token_shuffle import TokenShuffleConfig
from .generation_token_shuffle import SamplingConfig, caption_ids, resolve_size
from .tokenization_token_shuffle import load_text_tokenizer
from .vq_token_shuffle import VQCheckpointError, load_vq

try:  # only needed to return PIL images (output_type="pil")
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow ships with every install of megatron_ts
    Image = None

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_class():
    """TokenShuffleForCausalLM of this package. Imported by name, not with a relative import:
    transformers 4.45 follows relative imports between remote-code files in a loop that never
    ends on a cycle, and the modeling file imports this one (for `model.pipeline()`)."""
    return importlib.import_module(f"{__package__}.modeling_token_shuffle").TokenShuffleForCausalLM


class ModelDirError(ValueError):
    """An exported model directory is missing a file or its files disagree."""

    exit_code = 2  # megatron_ts.errors.EXIT_USAGE (this file ships standalone)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path} is missing ({what}); re-run `ts-convert to-hf` into this dir")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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


def load_weights_strict(model: torch.nn.Module, files: list[Path]) -> None:
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


def load_export_model(
    model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The model of an export (TokenShuffleForCausalLM) with every weight checked by name and
    shape, in eval mode."""
    config = read_config(model_dir)
    model = _model_class()(config)
    load_weights_strict(model, weight_files(model_dir))
    generation_file = model_dir / "generation_config.json"
    if generation_file.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.to(device=device, dtype=dtype).eval()


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    if Image is None:
        raise ImportError("images need Pillow: pip install pillow (or output_type='codes')")
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a.copy(order="C")) for a in arr]


def resolve_device(device, dtype) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA with bfloat16 when present, else CPU with float32."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


@dataclass
class TokenShufflePipelineOutput:
    """One entry per image: prompts repeated num_images_per_prompt times, in order."""

    images: list | None
    """PIL images (None for output_type='codes')."""
    codes: torch.Tensor
    """(n, H, W) codebook-local codes (H = image height / vq_downsample, W likewise)."""
    prompts: list[str]
    seeds: list[int]
    settings: dict
    """The sampling settings used (size "WxH", resolution of a square image, num_images)."""
    steps: int = 0
    """Decoding steps per image ((H/s)(W/s))."""
    timings: dict = field(default_factory=dict)
    """decode_s (the transformer) and vq_s (the VQ decoder), summed over batches."""


class TokenShufflePipeline:
    """Text-to-image sampling with an exported Token-Shuffle model.

    Args:
        model: a `TokenShuffleForCausalLM`.
        text_tokenizer: object with `encode(str) -> list[int]` (the export's text tokenizer).
        vq: VQ tokenizer with `decode(codes (B, h, w)) -> (B, 3, H, W)` in [-1, 1]; None
            samples codes only.
        model_dir: the export directory, when loaded from one (for messages).
    """

    def __init__(self, model, text_tokenizer, vq=None, model_dir: str | Path | None = None):
        self.model = model
        self.text_tokenizer = text_tokenizer
        self.vq = vq
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.progress_bar = True

    @property
    def config(self) -> TokenShuffleConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        need_vq: bool = True,
    ) -> TokenShufflePipeline:
        """Loads an export (written by `ts-convert to-hf`) with every file checked.

        Args:
            model_dir: the export directory.
            device: where the model and VQ decoder run (default CUDA when present, else CPU).
            dtype: model dtype: float32, bfloat16 or float16 (default bfloat16 on CUDA, else
                float32); the VQ decoder stays float32.
            need_vq: require the VQ tokenizer (needed to decode images).

        Raises:
            ModelDirError: naming the missing or mismatched file.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelDirError(f"model directory {model_dir} does not exist")
        device, dtype = resolve_device(device, dtype)
        model = load_export_model(model_dir, device, dtype)
        log.info(
            "loaded %s (%d layers, s=%d)",
            model_dir,
            model.config.num_hidden_layers,
            model.config.shuffle_window,
        )
        return cls.from_model(model, model_dir, need_vq)

    @classmethod
    def from_model(
        cls, model, model_dir: str | Path | None = None, need_vq: bool = True
    ) -> TokenShufflePipeline:
        """Wraps a loaded model with the text tokenizer and VQ decoder of its export.

        Args:
            model: a `TokenShuffleForCausalLM` (e.g. from `AutoModelForCausalLM`).
            model_dir: the export directory (default: the one the model was loaded from).
            need_vq: require the VQ tokenizer.
        """
        model_dir = model_dir or getattr(model, "name_or_path", None)
        if not model_dir or not Path(model_dir).is_dir():
            raise ModelDirError(
                f"model_dir {model_dir!r}: pass the export directory the model came from (a "
                "directory written by `ts-convert to-hf`)"
            )
        model_dir = Path(model_dir)
        tokenizer = load_text_tokenizer_dir(model_dir, model.config)
        vq = None
        if need_vq or (model_dir / "vq" / "config.json").exists():
            vq = load_vq_dir(model_dir, model.config, next(model.parameters()).device)
        return cls(model.eval(), tokenizer, vq, model_dir)

    def to(self, device=None, dtype: torch.dtype | str | None = None) -> TokenShufflePipeline:
        """Moves the model (device, dtype) and the VQ decoder (device; it stays float32)."""
        if isinstance(dtype, str):
            dtype = resolve_device(self.device, dtype)[1]
        self.model.to(device=device, dtype=dtype)
        if self.vq is not None and device is not None:
            self.vq.to(device)
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Turns the decoding progress bar off (disable=True) or on for later calls."""
        self.progress_bar = not disable

    def prompt_ids(self, prompts: list[str], caption_len: int | None = None) -> torch.Tensor:
        """(B, T) ids `<bos> caption <pad>... <boi>` for `model.generate(input_ids=...)`."""
        caption_len = caption_len or self.config.caption_len
        rows = [caption_ids(self.text_tokenizer, p, caption_len, self.config) for p in prompts]
        return torch.tensor(rows, device=self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        *,
        resolution: int | None = None,
        size: str | None = None,
        guidance_scale: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
        batch_size: int | None = None,
        output_type: str = "pil",
        progress: bool | None = None,
        caption_len: int | None = None,
    ) -> TokenShufflePipelineOutput:
        """Samples `num_images_per_prompt` images per prompt.

        Unset sampling arguments take the export's generation_config.json. Image k of the call
        (prompts in order, each repeated num_images_per_prompt times) is sampled with seed + k,
        whatever the batch size. Every image of a batch decodes in one forward per step, its
        conditional and unconditional rows together.

        Args:
            prompt: one caption or a list.
            num_images_per_prompt: images per caption.
            resolution: side in pixels of a square image, one the model was trained at.
            size: "WxH" pixels (width first: "96x48" is landscape) or a bucket's ratio "W:H",
                one the model was trained at (`config.trained_sizes()`); default: the export's
                generation_config.json, else the first trained square.
            guidance_scale: classifier-free guidance target (1 = none).
            cfg_schedule: constant, linear or half-linear.
            temperature: 0 = greedy.
            top_k: 0 = all codes.
            top_p: 1 = all codes.
            seed: image k uses seed + k.
            use_cache: decode with the KV cache (False recomputes the prefix: a check).
            batch_size: images decoded together (default all of them).
            output_type: "pil" (images and codes) or "codes".
            progress: show a progress bar over decoding steps (default: on unless
                `set_progress_bar_config(disable=True)`).
            caption_len: caption length (default the model's).

        Returns:
            TokenShufflePipelineOutput.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: the list of prompts is empty; pass at least one caption")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: pass a string or a list of strings")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt {num_images_per_prompt}: use 1 or more")
        if output_type not in ("pil", "codes"):
            raise ValueError(f"output_type {output_type!r}: choose 'pil' or 'codes'")
        if output_type == "pil" and self.vq is None:
            raise ModelDirError(
                f"{self.model_dir or 'this pipeline'} has no VQ decoder (vq/config.json): pass "
                "output_type='codes' or export with --vq-checkpoint"
            )
        sampling = SamplingConfig.from_generation_config(
            self.model.generation_config,
            guidance_scale=guidance_scale,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            resolution=resolution,
            size=size,
            use_kv_cache=use_cache,
        )
        cfg = self.config
        width, height = resolve_size(cfg, sampling.size, sampling.resolution)
        # settings name the image exactly: "WxH", and the side of a square one as before
        sampling.size = f"{width}x{height}"
        sampling.resolution = width if width == height else None
        rows, cols = cfg.window_grid((width, height))
        jobs = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch_size = int(batch_size or len(jobs))
        steps = rows * cols
        bar = None
        if self.progress_bar if progress is None else progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps * -(-len(jobs) // batch_size), unit="step", desc="decoding")
        codes, images = [], []
        t_decode = t_vq = 0.0
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            t0 = time.perf_counter()
            grids = self.model.generate(
                self.prompt_ids(batch, caption_len),  # (B, T)
                generation_config=asdict(sampling),  # the settings merged above, complete
                seed=sampling.seed + start,
                progress=False if bar is None else bar,
            )  # (B, H, W)
            t1 = time.perf_counter()
            codes.append(grids.cpu())
            if output_type == "pil":
                images.extend(to_pil(self.vq.decode(grids)))
            t_decode += t1 - t0
            t_vq += time.perf_counter() - t1
        if bar is not None:
            bar.close()
        settings = {**asdict(sampling), "num_images": num_images_per_prompt}
        return TokenShufflePipelineOutput(
            images=images if output_type == "pil" else None,
            codes=torch.cat(codes),
            prompts=jobs,
            seeds=[sampling.seed + k for k in range(len(jobs))],
            settings=settings,
            steps=steps,
            timings={"decode_s": t_decode, "vq_s": t_vq},
        )
