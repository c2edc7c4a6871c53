"""`ts-data train-vq`: trains the small native VQ-VAE on image shards (the bundled demo).

Loss: reconstruction (MSE + L1, optionally weighting pixels off the background up) + codebook
loss + beta * commitment loss (codes l2-normalised, as in
LlamaGen, which keeps codebook usage high). Codes unused over the last `restart_every` steps are
re-seeded from current encoder outputs. Reports PSNR and codebook usage on held-out images and
stores them in the checkpoint's header.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.images import ImageSkip, decode_image, resize_center_crop, to_tensor_batch
from data_tools.shards import RawSample, expand_inputs, iter_samples
from megatron_ts.hf.vq_token_shuffle import NativeVQ, NativeVQConfig, save_native
from megatron_ts.logging import get_logger

log = get_logger(__name__)


@dataclass
class TrainVQResult:
    psnr: float
    """Reconstruction PSNR (dB) on the held-out images, pixel range [0, 1]."""
    codebook_usage: float
    """Fraction of codes used at least once on the held-out images."""
    perplexity: float
    """exp(entropy) of the held-out code histogram."""
    steps: int
    seconds: float
    train_images: int
    eval_images: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def load_images(
    inputs: list[str], resolution: int, max_images: int, endpoint_url: str | None = None
) -> np.ndarray:
    """Up to `max_images` images from input shards as uint8 (N, R, R, 3)."""
    arrays = []
    for url in expand_inputs(inputs, endpoint_url):
        for sample in iter_samples(url, endpoint_url):
            if not isinstance(sample, RawSample) or sample.image_member() is None:
                continue
            try:
                img, _, _ = decode_image(sample.image_member()[1], resolution, 1)
            except ImageSkip:
                continue
            arrays.append(resize_center_crop(img, resolution))
            if len(arrays) >= max_images:
                return np.stack(arrays)
    if not arrays:
        raise ValueError(f"no readable images in {inputs}; run `ts-data make-demo` first")
    return np.stack(arrays)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two batches in [-1, 1], measured on the [0, 1] range."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


@torch.no_grad()
def evaluate(model: NativeVQ, images: torch.Tensor, batch: int = 64) -> tuple[float, float, float]:
    """(PSNR, codebook usage, perplexity) of the model on images [N, 3, R, R]."""
    model.eval()
    counts = torch.zeros(model.codebook_size)
    se, n = 0.0, 0
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        codes = model.encode(x)
        rec = model.decode(codes)
        se += F.mse_loss((rec + 1) / 2, (x + 1) / 2, reduction="sum").item()
        n += x.numel()
        counts += torch.bincount(codes.flatten(), minlength=model.codebook_size).float()
    model.train()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return (
        10 * math.log10(n / max(se, 1e-10)),
        (counts > 0).float().mean().item(),
        math.exp(entropy),
    )


def _reconstruction_loss(
    rec: torch.Tensor, x: torch.Tensor, foreground_weight: float
) -> torch.Tensor:
    """MSE + L1, with pixels away from the image's median colour weighted up.

    Small objects on a flat background are a few percent of the pixels: an unweighted loss is
    met by painting the background and washing the objects out. Pixels that differ from the
    per-image median colour by more than 0.1 (of the [-1, 1] range) count `1 + foreground_weight`.
    """
    err = (rec - x).pow(2) + (rec - x).abs()
    if not foreground_weight:
        return err.mean()
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    fg = ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    weight = 1 + foreground_weight * fg
    return (weight * err).mean() / weight.mean()


def train_vq(
    inputs: list[str],
    out: str,
    *,
    steps: int = 1500,
    resolution: int = 64,
    batch_size: int = 32,
    lr: float = 2e-3,
    codebook_size: int = 512,
    downsample: int = 8,
    channels: list[int] | None = None,
    embed_dim: int = 16,
    max_images: int = 4000,
    eval_images: int = 256,
    restart_every: int = 100,
    foreground_weight: float = 0.0,
    seed: int = 0,
    endpoint_url: str | None = None,
    threads: int | None = None,
) -> TrainVQResult:
    """Trains a native VQ and saves it (safetensors, config and metrics in the header).

    Args:
        inputs: image shards (img2dataset layout), local or s3://.
        out: checkpoint path (.safetensors).
        steps: optimizer steps.
        resolution: training crop size.
        batch_size: images per step.
        lr: Adam learning rate (cosine decay to 10%).
        codebook_size: codes.
        downsample: pixels per code side.
        channels: conv widths per level (default 32, 64, 128... one per level).
        embed_dim: code vector size.
        max_images: images read from the inputs.
        eval_images: images held out for PSNR and usage.
        restart_every: re-seed codes unused in this many steps (0 disables).
        foreground_weight: extra loss weight of pixels away from each image's median colour
            (0: plain MSE + L1).
        seed: init and batch-order seed.
        endpoint_url: S3 endpoint.
        threads: torch CPU threads (default: all cores).

    Returns:
        The held-out metrics.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    levels = int(round(math.log2(downsample)))
    channels = channels or [min(32 * 2**i, 128) for i in range(levels)]
    config = NativeVQConfig(
        codebook_size=codebook_size, downsample=downsample, channels=channels, embed_dim=embed_dim
    )
    data = load_images(inputs, resolution, max_images + eval_images, endpoint_url)
    n_eval = min(eval_images, max(1, len(data) // 10))
    images = to_tensor_batch(list(data))
    eval_set, train_set = images[:n_eval], images[n_eval:]
    if len(train_set) == 0:
        train_set = eval_set
    model = NativeVQ(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    used = torch.zeros(codebook_size, dtype=torch.bool)
    t0 = time.perf_counter()
    log.info(
        "train-vq: %d train / %d eval images at %d px, %d codes, %dx, %d steps",
        len(train_set),
        len(eval_set),
        resolution,
        codebook_size,
        downsample,
        steps,
    )
    for step in range(steps):
        for group in opt.param_groups:  # cosine from lr to lr/10
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        idx = torch.randint(len(train_set), (batch_size,), generator=gen)
        x = train_set[idx]
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip
            x = x.flip(-1)
        rec, vq_loss, codes = model(x)
        rec_loss = _reconstruction_loss(rec, x, foreground_weight)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used[codes.flatten()] = True
        if restart_every and (step + 1) % restart_every == 0 and step + 1 < steps * 0.8:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, embed_dim)
                    pick = torch.randint(len(z), (len(dead),), generator=gen)
                    noise = 0.01 * torch.randn(len(dead), embed_dim, generator=gen)
                    model.embedding.weight[dead] = z[pick] + noise
            used.zero_()
        if step % 100 == 0 or step == steps - 1:
            log.info(
                "step %d: rec %.5f (%.1f dB) vq %.4f",
                step,
                rec_loss.item(),
                psnr(rec.detach(), x),
                vq_loss.item(),
            )
    seconds = time.perf_counter() - t0
    p, usage, perplexity = evaluate(model, eval_set)
    result = TrainVQResult(
        psnr=p,
        codebook_usage=usage,
        perplexity=perplexity,
        steps=steps,
        seconds=seconds,
        train_images=len(train_set),
        eval_images=len(eval_set),
    )
    save_native(
        model,
        out,
        extra={
            **result.to_dict(),
            "resolution": resolution,
            "foreground_weight": foreground_weight,
        },
    )
    log.info(
        "train-vq: PSNR %.2f dB, codebook usage %.1f%% (perplexity %.0f), %.0f s -> %s",
        p,
        100 * usage,
        perplexity,
        seconds,
        out,
    )
    return result
