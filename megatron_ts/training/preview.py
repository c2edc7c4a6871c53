"""Preview images during training, drawn by the same sampler as `ts-generate`.

Previews are taken from a checkpoint the trainer has just saved, on rank 0 only: the weights are
read back one layer at a time from the layout-independent model files, so no collective is
needed whatever the TP/PP layout. The other ranks continue and meet rank 0 at the next step.
A stage with aspect-ratio buckets draws every prompt in each of its buckets.
"""

from __future__ import annotations

from pathlib import Path

from megatron_ts.config import ResolvedStage, SamplingDefaults, TokenizerConfig
from megatron_ts.logging import get_logger

log = get_logger(__name__)


def write_previews(
    ckpt_dir: Path,
    tokenizer: TokenizerConfig,
    defaults: SamplingDefaults,
    prompts: list[str],
    stage: ResolvedStage,
    out_dir: Path,
    step: int,
    metrics=None,
) -> list[Path]:
    """Samples one image per prompt from `ckpt_dir` with the run's [sampling] settings; writes
    PNGs and TensorBoard images.

    Files are `out_dir/step_SSSSSSSS/PP.png` for prompt PP; with buckets, one image per prompt
    and bucket, `PP-WxH.png` (TensorBoard tags `preview/PP` and `preview/PP/WxH`).

    Returns:
        The PNG paths (empty when no VQ checkpoint is configured to decode codes).
    """
    if not tokenizer.vq_checkpoint:
        log.warning("logging.preview_prompts set but tokenizer.vq_checkpoint is not: no previews")
        return []
    import numpy as np

    from megatron_ts.checkpoint.model_files import load_full_state_dict, read_meta
    from megatron_ts.hf.build import build_plain_model
    from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline
    from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer
    from megatron_ts.hf.vq_token_shuffle import load_vq
    from megatron_ts.models.model import ModelSpec
    from megatron_ts.sampling.png import save_png

    spec = ModelSpec.from_dict(read_meta(ckpt_dir)["model_spec"])
    buckets = stage.bucket_sizes(tokenizer.downsample)
    model = build_plain_model(
        spec,
        load_full_state_dict(ckpt_dir, "auto"),
        caption_len=stage.caption_len,
        resolutions=(stage.resolution,),
        vq_downsample=tokenizer.downsample,
        buckets=[b.to_dict() for b in buckets],
    )
    vq = load_vq(tokenizer.vq_format, tokenizer.vq_checkpoint)
    pipe = TokenShufflePipeline(model, load_text_tokenizer(tokenizer.text), vq)
    out_dir = Path(out_dir) / f"step_{step:08d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for size in [b.size for b in buckets] or [None]:
        result = pipe(
            prompts,
            guidance_scale=defaults.cfg_scale,
            cfg_schedule=defaults.cfg_schedule,
            temperature=defaults.temperature,
            top_k=defaults.top_k,
            top_p=defaults.top_p,
            seed=step,
            resolution=None if size else stage.resolution,
            size=size,
            progress=False,
        )
        suffix = f"-{size}" if size else ""
        settings = {**result.settings, "step": step}
        for i, (image, prompt) in enumerate(zip(result.images, result.prompts)):
            paths.append(save_png(image, out_dir / f"{i:02d}{suffix}.png", prompt, settings))
            if metrics is not None:
                tag = f"preview/{i:02d}" + (f"/{size}" if size else "")
                metrics.image(tag, np.asarray(image.convert("RGB")), step)
    log.info("wrote %d preview images to %s", len(paths), out_dir)
    return paths
