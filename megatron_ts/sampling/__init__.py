"""Sampling: prompt in, image out (KV cache, CFG schedules, PNGs with metadata).

Importing this package does not import megatron-core: sampling from an export needs only torch
and transformers. `build_plain_model` (training spec + state dict -> HF model, for previews) is
loaded on first use.
"""

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


def __getattr__(name: str):
    if name == "build_plain_model":
        from megatron_ts.hf.build import build_plain_model

        return build_plain_model
    raise AttributeError(name)
