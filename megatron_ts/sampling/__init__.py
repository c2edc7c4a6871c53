"""Sampling: prompt in, image out (KV cache, CFG schedules, PNGs with metadata)."""

from megatron_ts.hf.build import build_plain_model
from megatron_ts.sampling.sampler import GenerationResult, SamplingConfig, generate, save_png
from megatron_ts.sampling.schedules import SCHEDULES, guidance_scale

__all__ = [
    "SCHEDULES",
    "GenerationResult",
    "SamplingConfig",
    "build_plain_model",
    "generate",
    "guidance_scale",
    "save_png",
]
