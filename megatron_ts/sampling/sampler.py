"""Prompt in, image out: KV-cached decoding with classifier-free guidance.

One decoding step feeds one image position and samples the s^2 codes of the next window
(s = 1: one code). Conditional and unconditional streams run in one batch (rows [cond; uncond]);
the unconditional prompt is the empty caption `<bos> <pad> x caption_len <boi>`, which is how
caption dropout trains it. Guidance mixes logits, restricted to the codebook, as
uncond + w * (cond - uncond) with w from a schedule (`schedules.py`); then temperature, top-k
and top-p, and one sample per code from a per-image generator seeded with seed + image index,
so an image depends only on its seed and settings.

The trainer's preview images and `ts-generate` both call `generate`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM, windows_to_grid
from megatron_ts.logging import get_logger
from megatron_ts.sampling.schedules import DEFAULT_SCHEDULE, guidance_scale, needs_uncond

log = get_logger(__name__)


@dataclass
class SamplingConfig:
    """Sampling settings; every field is stored in the PNG metadata."""

    cfg: float = 7.5
    """Target classifier-free guidance scale (1 = plain conditional sampling)."""
    cfg_schedule: str = DEFAULT_SCHEDULE
    """constant, linear or half-linear (the paper's choice)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely codes (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of codes with this probability mass (1 = all)."""
    seed: int = 0
    """Image i of a call is sampled with seed + i."""
    resolution: int | None = None
    """Image side in pixels; None = the model's first trained resolution."""
    use_kv_cache: bool = True
    """Decode with the KV cache; False recomputes the whole prefix every step (slow, a check)."""


def sampling_from_flags(generation: dict, **flags) -> SamplingConfig:
    """SamplingConfig from an export's generation_config.json with CLI flags on top.

    Args:
        generation: generation_config.json's contents (cfg_scale, cfg_schedule, temperature,
            top_k, top_p); a missing field takes SamplingConfig's default.
        flags: cfg, cfg_schedule, temperature, top_k, top_p (None = from `generation`) and any
            other SamplingConfig field, taken as given.
    """
    stored = {
        "cfg": generation.get("cfg_scale"),
        **{k: generation.get(k) for k in ("cfg_schedule", "temperature", "top_k", "top_p")},
    }
    values = {k: v for k, v in stored.items() if v is not None}
    values.update({k: v for k, v in flags.items() if v is not None or k not in stored})
    return SamplingConfig(**values)


@dataclass
class GenerationResult:
    """Output of `generate`: one entry per image, prompts repeated num_images times."""

    codes: torch.Tensor  # (n, G, G) codebook-local codes
    prompts: list[str]
    seeds: list[int]
    settings: dict
    images: list[Image.Image] | None = None
    steps: int = 0
    timings: dict = field(default_factory=dict)


def caption_ids(tokenizer, prompt: str, caption_len: int, config) -> list[int]:
    """`<bos>`, caption ids truncated/padded with `<pad>` to caption_len, `<boi>`."""
    ids = list(tokenizer.encode(prompt))[:caption_len] if prompt else []
    pad = config.special_id("<pad>")
    return [
        config.special_id("<bos>"),
        *ids,
        *([pad] * (caption_len - len(ids))),
        config.boi_token_id,
    ]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering over the last dim (masked entries -> -inf)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a code when the mass before it already reaches top_p (the top code always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_step(
    logits: torch.Tensor,
    scale: float | None,
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Samples one window's codes.

    Args:
        logits: (R, s^2, K) codebook logits; R = B, or 2B rows [cond; uncond] when `scale`.
        scale: guidance scale, or None without an unconditional stream.
        sampling: temperature / top-k / top-p.
        generators: one CPU generator per image.

    Returns:
        (B, s^2) codebook-local codes.
    """
    logits = logits.float()
    if scale is not None:
        cond, uncond = logits.chunk(2, dim=0)
        logits = uncond + scale * (cond - uncond)
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = _filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(-1).cpu()  # (B, s^2, K); sampled on CPU for device-independent seeds
    codes = [
        torch.multinomial(p, 1, generator=g).squeeze(-1)
        for p, g in zip(probs, generators, strict=True)
    ]
    return torch.stack(codes).to(logits.device)


@torch.no_grad()
def sample_codes(
    model: TokenShuffleForCausalLM,
    text_ids: torch.Tensor,
    grid: int,
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
    uncond_ids: torch.Tensor | None = None,
    progress: Any = None,
) -> torch.Tensor:
    """Decodes the code grids of a batch of prompts.

    Args:
        model: the HF model (any device/dtype).
        text_ids: (B, T) prompts in the model's sequence format, ending with `<boi>`.
        grid: codes per image side.
        sampling: settings.
        generators: one per image.
        uncond_ids: (B, T) unconditional prompts; None disables guidance.
        progress: an object with `update(n)` (a tqdm bar) or None.

    Returns:
        (B, G, G) codebook-local codes.
    """
    cfg = model.config
    s = cfg.shuffle_window
    if grid % s:
        raise ValueError(f"code grid {grid} is not divisible by the shuffle window {s}")
    steps = (grid // s) ** 2
    lo, hi = cfg.code_offset, cfg.code_offset + cfg.codebook_size
    guided = uncond_ids is not None
    prompt = torch.cat([text_ids, uncond_ids]) if guided else text_ids  # (R, T)
    windows: list[torch.Tensor] = []  # each (B, s^2)

    def rows(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w]) if guided else w  # the same codes feed both streams

    cache = model.new_cache(prompt.shape[1] + steps) if sampling.use_kv_cache else None
    out = model(input_ids=prompt, past_key_values=cache, text_logits=False, image_logits=True)
    logits = out.image_logits[:, -1]  # (R, s^2, V)
    for step in range(steps):
        scale = guidance_scale(sampling.cfg_schedule, sampling.cfg, step, steps) if guided else None
        window = sample_step(logits[..., lo:hi], scale, sampling, generators)  # (B, s^2)
        windows.append(window)
        if progress is not None:
            progress.update(1)
        if step == steps - 1:
            break
        if cache is not None:
            out = model(image_windows=rows(window)[:, None], past_key_values=cache)
        else:
            so_far = torch.stack(windows, dim=1)  # (B, k, s^2)
            out = model(
                input_ids=prompt,
                image_windows=rows(so_far),
                text_logits=False,
                image_logits_to_keep=1,
            )
        logits = out.image_logits[:, -1]
    codes = torch.stack(windows, dim=1)  # (B, N, s^2)
    return windows_to_grid(codes, s, grid)  # (B, G, G)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]  # RGB from (H, W, 3) uint8


def resolve_resolution(config, resolution: int | None) -> int:
    """Checks a requested resolution against what the model was trained at."""
    trained = list(config.resolutions)
    if resolution is None:
        return trained[0]
    if resolution not in trained:
        raise ValueError(
            f"resolution {resolution} px: this model was trained at {trained}; pass one of them"
        )
    step = config.vq_downsample * config.shuffle_window
    if resolution % step:
        raise ValueError(
            f"resolution {resolution} is not a multiple of downsample x window = {step}"
        )
    return resolution


def generate(
    model: TokenShuffleForCausalLM,
    vq,
    text_tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig | None = None,
    num_images: int = 1,
    batch_size: int = 4,
    progress: bool = False,
    caption_len: int | None = None,
) -> GenerationResult:
    """Samples `num_images` images per prompt.

    Args:
        model: a `TokenShuffleForCausalLM` (from an export or `build_plain_model`).
        vq: VQ tokenizer with `.decode(codes (B, h, w)) -> (B, 3, H, W)` in [-1, 1]; None
            returns codes only.
        text_tokenizer: object with `.encode(str) -> list[int]`.
        prompts: captions.
        sampling: settings (defaults: `SamplingConfig()`).
        num_images: images per prompt.
        batch_size: images decoded together (x2 rows with guidance).
        progress: show a progress bar over decoding steps.
        caption_len: overrides the model's caption length.

    Returns:
        GenerationResult with codes (n, G, G) and, with a VQ, PIL images.
    """
    import time

    sampling = sampling or SamplingConfig()
    cfg = model.config
    resolution = resolve_resolution(cfg, sampling.resolution)
    grid = cfg.grid(resolution)
    caption_len = caption_len or cfg.caption_len
    device = next(model.parameters()).device
    jobs = [(p, i) for p in prompts for i in range(num_images)]
    guided = needs_uncond(sampling.cfg_schedule, sampling.cfg)
    steps = (grid // cfg.shuffle_window) ** 2
    bar = None
    if progress:
        from tqdm.auto import tqdm

        batches = -(-len(jobs) // batch_size)
        bar = tqdm(total=steps * batches, unit="step", desc="decoding")
    all_codes, images = [], []
    t_decode = t_vq = 0.0
    uncond_row = caption_ids(text_tokenizer, "", caption_len, cfg)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        ids = torch.tensor(
            [caption_ids(text_tokenizer, p, caption_len, cfg) for p, _ in batch], device=device
        )
        uncond = torch.tensor([uncond_row] * len(batch), device=device) if guided else None
        gens = [torch.Generator().manual_seed(sampling.seed + start + k) for k in range(len(batch))]
        t0 = time.perf_counter()
        codes = sample_codes(model, ids, grid, sampling, gens, uncond, bar)
        t1 = time.perf_counter()
        all_codes.append(codes.cpu())
        if vq is not None:
            with torch.no_grad():
                images.extend(to_pil(vq.decode(codes)))
        t_decode += t1 - t0
        t_vq += time.perf_counter() - t1
    if bar is not None:
        bar.close()
    settings = {**asdict(sampling), "resolution": resolution, "num_images": num_images}
    return GenerationResult(
        codes=torch.cat(all_codes),
        prompts=[p for p, _ in jobs],
        seeds=[sampling.seed + k for k in range(len(jobs))],
        settings=settings,
        images=images if vq is not None else None,
        steps=steps,
        timings={"decode_s": t_decode, "vq_s": t_vq},
    )


def save_png(image: Image.Image, path: str | Path, prompt: str, settings: dict) -> Path:
    """Writes a PNG with the prompt and the settings (JSON) as text chunks; deterministic bytes."""
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("settings", json.dumps(settings, sort_keys=True))
    info.add_text("Software", "megatron_ts ts-generate")
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path
