"""Sampling: prompt in, image out (KV cache, CFG schedules, PNGs with metadata).

The sampler itself ships inside every export (megatron_ts/hf/generation_token_shuffle.py and
pipeline_token_shuffle.py): `ts-generate`, `ts-eval`, the trainer's previews and a user holding only
the export directory all decode through `TokenShufflePipeline` and `model.generate`. Importing
this package does not import megatron-core; `build_plain_model` (training spec + state dict -> HF
model, for previews) is loaded on first use.
"""

from megatron_ts.hf.generation_token_shuffle import CFG_SCHEDULES, SamplingConfig
from megatron_ts.hf.pipeline_token_shuffle import (
    ModelDirError,
    TokenShufflePipeline,
    TokenShufflePipelineOutput,
)
from megatron_ts.sampling.png import save_png

__all__ = [
    "CFG_SCHEDULES",
    "ModelDirError",
    "SamplingConfig",
    "TokenShufflePipeline",
    "TokenShufflePipelineOutput",
    "build_plain_model",
    "save_png",
]


def __getattr__(name: str):
    if name == "build_plain_model":
        from megatron_ts.hf.build import build_plain_model

        return build_plain_model
    raise AttributeError(name)
