"""Image-code sampling for Token-Shuffle models: guidance schedules, filtering, KV-cached decoding.

This file is copied into every export and imports only torch: `TokenShuffleForCausalLM.generate`,
the export's `TokenShufflePipeline`, `ts-generate`, `ts-eval` and the trainer's previews all decode
through `sample_codes` here, so there is one sampler to maintain.

One decoding step feeds one image position and samples the s^2 codes of the next window
(s = 1: one code). Conditional and unconditional streams run in one batch (rows [cond; uncond]);
the unconditional prompt is the empty caption `<bos> <pad> x caption_len <boi>`, which is how
caption dropout trains it. Guidance mixes logits, restricted to the codebook, as
uncond + w * (cond - uncond) with w from a schedule; then temperature, top-k and top-p, and one
sample per code from a per-image CPU generator seeded with seed + image index, so an image depends
only on its seed and settings, not on the device or the batch it was decoded in.

Sampling never leaves the device: `torch.multinomial(p, 1)` is argmax(p / q) with q ~ Exp(1) drawn
by the generator (PyTorch's own one-sample algorithm), and q does not depend on p, so the CPU
generator draws q on the host and the device takes the argmax. The codes and the generators' states
are those of `torch.multinomial` on the CPU probabilities, bit for bit, without the per-step
device-to-host copy of the probabilities that stalled a GPU at every decoding step.

Schedules: the paper guides with a scale that changes over the image tokens and adopts a
"half-linear" schedule. Our reading: the scale rises linearly from 1 (no guidance) to the target
over the first half of the image tokens and stays at the target for the second half. `linear`
rises over the whole image; `constant` is the usual fixed scale. Progress is measured in image
tokens already generated, so s = 1 and s = 2 models follow the same curve over the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

CFG_SCHEDULES = ("constant", "linear", "half-linear")
DEFAULT_CFG_SCHEDULE = "half-linear"


# The window order and the prompt format below are the export's copies of megatron_ts.sequence
# (this file cannot import megatron_ts); tests/unit/test_sequence_layout.py checks they agree.
def grid_to_windows(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, H, W, *rest) raster grid -> (B, (H/s)(W/s), s^2, *rest) windows in raster order."""
    b, gh, gw = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, gh // s, s, gw // s, s, *rest)  # (B, H/s, s, W/s, s, ...)
    x = x.transpose(2, 3)  # (B, H/s, W/s, s, s, ...)
    return x.reshape(b, (gh // s) * (gw // s), s * s, *rest)


def windows_to_grid(x: torch.Tensor, s: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """Inverse of `grid_to_windows`: (B, N, s^2, *rest) -> (B, H, W, *rest); `grid` is (H, W)
    codes down and across, an int G the square G x G."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    b = x.shape[0]
    rest = x.shape[3:]
    x = x.reshape(b, gh // s, gw // s, s, s, *rest)  # (B, H/s, W/s, s, s, ...)
    x = x.transpose(2, 3)  # (B, H/s, s, W/s, s, ...)
    return x.reshape(b, gh, gw, *rest)


# The export's copy of megatron_ts.buckets.find's refusal (see the note on grid_to_windows).
def find_size(sizes: Sequence[tuple[str, int, int]], size: str) -> tuple[int, int]:
    """(width, height) of the trained size given as "WxH" pixels or by its "W:H" ratio name.

    Args:
        sizes: (name, width, height) of every trained size (`config.trained_sizes()`).
        size: "WxH", for example "96x48", or a ratio name such as "2:1".

    Raises:
        ValueError: no trained size matches; the message lists the ones there are.
    """
    text = str(size).strip().lower()
    for name, width, height in sizes:
        if text in (f"{width}x{height}", name):
            return width, height
    listed = ", ".join(f"{w}x{h} ({name})" for name, w, h in sizes)
    raise ValueError(f"size {size!r} is not one this model trained on; use one of: {listed}")


def scheduled_guidance(schedule: str, target: float, step: int, steps: int) -> float:
    """Guidance scale at decoding step `step` of `steps`.

    Args:
        schedule: constant, linear or half-linear.
        target: the final (constant: the only) guidance scale.
        step: 0-based decoding step; step k emits codes k*s^2 .. (k+1)*s^2 - 1.
        steps: decoding steps of the image (positions, not codes).

    Returns:
        The scale w in logits = uncond + w * (cond - uncond).
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule {schedule!r}; choose one of {list(CFG_SCHEDULES)}")
    if schedule == "constant" or steps <= 1:
        return float(target)
    progress = step / steps  # fraction of the image tokens generated before this step
    if schedule == "half-linear":
        progress = min(1.0, 2.0 * progress)
    return 1.0 + (target - 1.0) * progress


@dataclass
class SamplingConfig:
    """Sampling settings; `ts-generate` stores every field in the PNG metadata."""

    cfg_scale: float = 7.5
    """Target classifier-free guidance scale (1 = plain conditional sampling)."""
    cfg_schedule: str = DEFAULT_CFG_SCHEDULE
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
    """Image side in pixels of a square image; None = `size`, else the model's default."""
    size: str | None = None
    """Image size "WxH" in pixels (width first, "96x48" is landscape) or a trained bucket's
    ratio "W:H"; None = `resolution`, else the model's default. Set in a call, either of the two
    replaces the other from generation_config.json."""
    use_kv_cache: bool = True
    """Decode with the KV cache; False recomputes the whole prefix every step (slow, a check)."""

    def check(self) -> SamplingConfig:
        """Raises ValueError naming the first setting that cannot be sampled with."""
        if not self.cfg_scale >= 1:  # also NaN
            raise ValueError(
                f"guidance_scale {self.cfg_scale}: use 1 (no guidance) or more (7.5 is typical)"
            )
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(
                f"cfg_schedule {self.cfg_schedule!r}: choose one of {list(CFG_SCHEDULES)}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature {self.temperature}: use 0 (greedy) or more")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k}: use 0 (all codes) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p}: use a value in (0, 1]")
        return self

    @classmethod
    def from_generation_config(cls, generation: Any = None, **overrides) -> SamplingConfig:
        """Settings from an export's generation_config.json with explicit values on top.

        Args:
            generation: generation_config.json as a dict or a transformers GenerationConfig
                (cfg_scale, cfg_schedule, temperature, top_k, top_p, do_sample); a missing field
                takes the class default.
            overrides: any field; None means "from `generation`". `guidance_scale` is accepted
                for cfg_scale (the name transformers and diffusers use) and `do_sample=False`
                means greedy (temperature 0).
        """
        if generation is not None and not isinstance(generation, dict):
            # only what the file set: GenerationConfig's own defaults (top_k 50) are not ours
            diff = generation.to_diff_dict()
            if "cfg_schedule" in diff:
                # an export's file: its do_sample counts even where it equals transformers'
                # default (False up to 4.x, so a greedy export's flag is not in the diff there)
                diff["do_sample"] = generation.do_sample
            generation = diff
        generation = generation or {}
        names = {f.name for f in fields(cls)}
        values = {k: generation[k] for k in names if generation.get(k) is not None}
        if generation.get("cfg_scale") is None and generation.get("guidance_scale") is not None:
            values["cfg_scale"] = generation["guidance_scale"]
        if generation.get("do_sample") is False:
            values["temperature"] = 0.0
        if overrides.get("guidance_scale") is not None:
            overrides["cfg_scale"] = overrides["guidance_scale"]
        do_sample = overrides.pop("do_sample", None)
        overrides.pop("guidance_scale", None)
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown sampling argument {unknown[0]!r}; known: {sorted(names)}")
        if overrides.get("size") is not None or overrides.get("resolution") is not None:
            values.pop("size", None)  # an image size asked for in the call replaces the file's
            values.pop("resolution", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if do_sample is False:
            values["temperature"] = 0.0
        elif do_sample and not values.get("temperature", cls.temperature) > 0:
            raise ValueError("do_sample=True with temperature 0: pass a temperature > 0")
        return cls(**values).check()


# The export's copy of megatron_ts.sequence.build_prompts (see the note on grid_to_windows).
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


def unconditional_ids(config, batch: int, length: int, device=None) -> torch.Tensor:
    """(batch, length) empty-caption prompts `<bos> <pad>... <boi>` (the guidance stream)."""
    row = [config.special_id("<bos>")] + [config.special_id("<pad>")] * (length - 2)
    return torch.tensor([row + [config.boi_token_id]] * batch, device=device)


def resolve_resolution(config, resolution: int | None) -> int:
    """Checks a requested square resolution against what the model was trained at."""
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


def resolve_size(config, size: str | None = None, resolution: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the image asked for, checked against the trained sizes.

    A model without buckets takes `resolution` as before (default its first); a bucketed model
    takes `size` ("WxH" or a ratio "W:H") or `resolution` R as the size "RxR" (default: its first
    square bucket, else its first bucket).

    Args:
        config: a `TokenShuffleConfig`.
        size: "WxH" pixels or a trained ratio name; None for `resolution` or the default.
        resolution: side of a square image in pixels.

    Raises:
        ValueError: both given and disagreeing, or a size the model never trained on (the message
            lists the trained sizes).
    """
    if size is not None and resolution is not None:
        if str(size).strip().lower() != f"{resolution}x{resolution}":
            raise ValueError(
                f"size {size!r} and resolution {resolution}: pass one of them (size for a "
                "non-square image)"
            )
        resolution = None
    if not config.buckets and size is None:
        side = resolve_resolution(config, resolution)
        return side, side
    sizes = config.trained_sizes()
    if size is None and resolution is not None:
        size = f"{resolution}x{resolution}"
    if size is None:
        square = [(w, h) for _, w, h in sizes if w == h]
        width, height = square[0] if square else sizes[0][1:]
    else:
        width, height = find_size(sizes, size)
    step = config.vq_downsample * config.shuffle_window
    if width % step or height % step:
        raise ValueError(
            f"size {width}x{height}: both sides must be multiples of downsample x window = {step}"
        )
    return width, height


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
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


def code_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """(B, *shape) Exp(1) noise on `device`, image i's drawn by generators[i].

    Each draw is the one `torch.multinomial(p, 1, generator=g)` makes for a `shape` fp32 input
    (`empty_like(p).exponential_(1, g)`), so argmax(p / noise) is its sample and leaves `g` in
    the same state. Drawn on the generators' device (the CPU) and copied to `device` from pinned
    memory without a sync: the host draws the next step's noise while the GPU runs this one.
    """
    noise = torch.stack(
        [
            torch.empty(shape, dtype=torch.float32, device=g.device).exponential_(1, generator=g)
            for g in generators
        ]
    )
    if noise.device != device:
        if device.type == "cuda":
            noise = noise.pin_memory()
        noise = noise.to(device, non_blocking=True)
    return noise


def sample_step(
    logits: torch.Tensor,
    scale: float | None,
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Samples one window's codes on the logits' device (no device-to-host sync).

    Args:
        logits: (R, s^2, K) codebook logits; R = B, or 2B rows [cond; uncond] when `scale`.
        scale: guidance scale, or None without an unconditional stream.
        sampling: temperature / top-k / top-p.
        generators: one CPU generator per image.

    Returns:
        (B, s^2) codebook-local codes, on the logits' device.
    """
    logits = logits.float()
    if scale is not None:
        cond, uncond = logits.chunk(2, dim=0)
        logits = uncond + scale * (cond - uncond)
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(-1)  # (B, s^2, K)
    noise = code_noise(generators, tuple(probs.shape[1:]), probs.device)  # (B, s^2, K)
    return (probs / noise).argmax(-1)  # torch.multinomial(p, 1)'s sample, see code_noise


@torch.no_grad()
def sample_codes(
    model,
    text_ids: torch.Tensor,
    grid: int | tuple[int, int],
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
    uncond_ids: torch.Tensor | None = None,
    progress: Any = None,
) -> torch.Tensor:
    """Decodes the code grids of a batch of prompts.

    Args:
        model: a `TokenShuffleForCausalLM` (any device/dtype).
        text_ids: (B, T) prompts in the model's sequence format, ending with `<boi>`.
        grid: (H, W) codes down and across the image (`config.code_grid(size)`); an int G
            means G x G.
        sampling: settings.
        generators: one per image.
        uncond_ids: (B, T) unconditional prompts; None disables guidance.
        progress: an object with `update(n)` (a tqdm bar) or None.

    Returns:
        (B, H, W) codebook-local codes.
    """
    cfg = model.config
    s = cfg.shuffle_window
    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if gh % s or gw % s:
        raise ValueError(f"code grid {gh}x{gw} is not divisible by the shuffle window {s}")
    window_grid = (gh // s, gw // s)  # decoding steps down and across, in raster order
    steps = window_grid[0] * window_grid[1]
    lo, hi = cfg.code_offset, cfg.code_offset + cfg.codebook_size
    guided = uncond_ids is not None
    prompt = torch.cat([text_ids, uncond_ids]) if guided else text_ids  # (R, T)
    windows: list[torch.Tensor] = []  # each (B, s^2)

    def rows(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w]) if guided else w  # the same codes feed both streams

    cache = model.new_cache(prompt.shape[1] + steps) if sampling.use_kv_cache else None
    out = model(
        input_ids=prompt,
        past_key_values=cache,
        text_logits=False,
        image_logits=True,
        window_grid=window_grid,
    )
    logits = out.image_logits[:, -1]  # (R, s^2, V)
    for step in range(steps):
        scale = None
        if guided:
            scale = scheduled_guidance(sampling.cfg_schedule, sampling.cfg_scale, step, steps)
        window = sample_step(logits[..., lo:hi], scale, sampling, generators)  # (B, s^2)
        windows.append(window)
        if progress is not None:
            progress.update(1)
        if step == steps - 1:
            break
        if cache is not None:  # the cache knows the window grid and the prompt length
            out = model(image_windows=rows(window)[:, None], past_key_values=cache)
        else:
            so_far = torch.stack(windows, dim=1)  # (B, k, s^2)
            out = model(
                input_ids=prompt,
                image_windows=rows(so_far),
                text_logits=False,
                image_logits_to_keep=1,
                window_grid=window_grid,
            )
        logits = out.image_logits[:, -1]
    codes = torch.stack(windows, dim=1)  # (B, N, s^2)
    return windows_to_grid(codes, s, (gh, gw))  # (B, H, W)


def seeded_generators(
    batch: int, seed: int | Sequence[int] = 0, generator=None
) -> list[torch.Generator]:
    """One CPU generator per image: `generator` (one or a list), else seed + i (or seeds[i])."""
    if generator is not None:
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if len(gens) != batch:
            raise ValueError(f"generator: {len(gens)} given for {batch} images; pass one per image")
        return gens
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(batch)]
    if len(seeds) != batch:
        raise ValueError(f"seed: {len(seeds)} seeds for {batch} images; pass one per image")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def check_prompt_ids(config, input_ids: torch.Tensor) -> None:
    """Raises ValueError unless `input_ids` is (B, T) `<bos> ... <boi>` within the vocabulary."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(
            f"input_ids {shape}: pass (B, T) prompt ids `<bos> caption <pad>... <boi>` (the "
            "pipeline's prompt_ids(prompts) builds them)"
        )
    bos, boi = config.special_id("<bos>"), config.boi_token_id
    if not bool((input_ids[:, 0] == bos).all()) or not bool((input_ids[:, -1] == boi).all()):
        raise ValueError(
            f"input_ids: every row must start with <bos> ({bos}) and end with <boi> ({boi}); "
            "build them with the pipeline's prompt_ids(prompts)"
        )
    if bool((input_ids < 0).any()) or bool((input_ids >= config.code_offset).any()):
        raise ValueError(f"input_ids: ids must be text or special ids in [0, {config.code_offset})")
