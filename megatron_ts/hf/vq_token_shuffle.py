"""VQ image tokenizers: images in [-1, 1] to code grids and back.

This file is copied into every export (the pipeline decodes images with it), so it imports only
torch, safetensors and transformers.

Three checkpoint layouts, chosen with `--vq-format`:

- `llamagen`: LlamaGen's VQ-16 (`vq_ds16_t2i.pt`, `{"model": state_dict}`): 16384 x 8 codebook,
  l2-normalised codes, 16x downsampling; encoder/decoder as in LlamaGen's
  `tokenizer/tokenizer_image/vq_model.py` (`conv_blocks.{i}.res/attn`, `mid.{0,1,2}`).
- `chameleon`: the Chameleon VQGAN used by Lumina-mGPT and Anole (`vqgan.ckpt`,
  `{"state_dict": ...}` in taming-transformers naming): 8192 x 256 codebook, 16x. The encoder and
  quantizer are `transformers`' `ChameleonVQVAE`; `transformers` ships no decoder, so the
  taming decoder (`decoder.up.{i}.block/attn/upsample`) is written here. A `transformers`
  checkpoint (the shard holding `model.vqmodel.*`) has no decoder weights: it loads to encode.
- `native`: a small conv VQ-VAE trained with `ts-data train-vq`, stored as safetensors (or a torch
  file) with its config inside, so the bundled demo needs no download.

Every loader checks keys and shapes strictly and names the first mismatch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

VQ_FORMATS = ("native", "llamagen", "chameleon")
NATIVE_CONFIG_KEY = "megatron_ts.vq_config"


class VQCheckpointError(ValueError):
    """A VQ checkpoint that does not match the chosen format; names the file and first bad key."""

    exit_code = 2  # megatron_ts.errors.EXIT_USAGE (this file ships standalone)


# ----------------------------------------------------------------------------------------------
# Shared blocks (taming-transformers / LlamaGen naming: norm1, conv1, norm2, conv2, nin_shortcut)
# ----------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, 1, c, h * w).transpose(2, 3)  # (B, 1, HW, C)
        k = self.k(y).reshape(b, 1, c, h * w).transpose(2, 3)
        v = self.v(y).reshape(b, 1, c, h * w).transpose(2, 3)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as in taming/LlamaGen


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each row of z (squared L2)."""
    # (N, D) x (K, D) -> (N, K); chunks keep the distance matrix small at 2048 px
    out = []
    cb_sq = (codebook * codebook).sum(1)
    for chunk in z.split(65536):
        d = (chunk * chunk).sum(1, keepdim=True) + cb_sq - 2 * chunk @ codebook.t()
        out.append(d.argmin(1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Tokenizer base
# ----------------------------------------------------------------------------------------------


class VQTokenizer(nn.Module):
    """Base of all formats: `encode` images to codes, `decode` codes to images.

    Attributes:
        format: native, llamagen or chameleon.
        codebook_size: number of codes.
        downsample: pixels per code along each side.
        identity: `format:sha256-prefix` of the checkpoint (recorded in manifests).
        checkpoint_sha256: full sha256 of the checkpoint file (set by `load_vq`).
    """

    format = "base"

    def __init__(self, codebook_size: int, downsample: int):
        super().__init__()
        self.codebook_size = int(codebook_size)
        self.downsample = int(downsample)
        self.identity = self.format
        self.checkpoint_sha256: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VQ encode expects [B, 3, H, W] images, got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the VQ downsampling {self.downsample}; "
                "resize or crop to a multiple first"
            )

    def quantize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) of continuous latents (B, D, h, w)."""
        raise NotImplementedError

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, D, h, w) of codes (B, h, w)."""
        raise NotImplementedError

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes of a batch of images.

        Args:
            images: float [B, 3, H, W] in [-1, 1]; H and W multiples of `downsample`.

        Returns:
            LongTensor [B, H / downsample, W / downsample].
        """
        self._check_images(images)
        param = next(self.parameters())
        z = self.encode_latents(images.to(device=param.device, dtype=param.dtype))
        return self.quantize_latents(z)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images of a batch of code grids.

        Args:
            codes: integer [B, h, w] in [0, codebook_size).

        Returns:
            float [B, 3, h * downsample, w * downsample] clamped to [-1, 1].
        """
        if codes.ndim != 3:
            raise ValueError(f"VQ decode expects [B, h, w] codes, got {tuple(codes.shape)}")
        codes = codes.long().to(self.device)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes out of range [0, {self.codebook_size}): min {int(codes.min())}, "
                f"max {int(codes.max())}; were they made with another VQ tokenizer?"
            )
        return self.decode_latents(self.embed_codes(codes)).clamp(-1, 1).float()


# ----------------------------------------------------------------------------------------------
# Native: a small conv VQ-VAE for the demo
# ----------------------------------------------------------------------------------------------


@dataclass
class NativeVQConfig:
    codebook_size: int = 512
    """Codes in the codebook."""
    downsample: int = 8
    """Pixels per code along each side (a power of two)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Conv widths after each 2x downsampling, one per level (len = log2(downsample))."""
    embed_dim: int = 16
    """Codebook vector size; codes are l2-normalised (as LlamaGen) for high codebook usage."""
    beta: float = 0.25
    """Commitment loss weight."""

    def __post_init__(self):
        levels = int(round(math.log2(self.downsample)))
        if 2**levels != self.downsample or levels < 1:
            raise ValueError(
                f"native VQ downsample must be a power of two >= 2, not {self.downsample}"
            )
        if len(self.channels) != levels:
            raise ValueError(
                f"native VQ channels {self.channels} needs one width per level "
                f"({levels} for downsample {self.downsample})"
            )


class _PlainRes(nn.Module):
    """Norm-free residual block: cheap on CPU and fine at this size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class NativeVQ(VQTokenizer):
    """Conv encoder -> l2-normalised codebook -> conv decoder."""

    format = "native"

    def __init__(self, config: NativeVQConfig):
        super().__init__(config.codebook_size, config.downsample)
        self.config = config
        ch = config.channels
        # strided convs straight from pixels: no full-resolution layer, cheap on CPU
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 4, 2, 1)]
        for i in range(1, len(ch)):
            enc += [_PlainRes(ch[i - 1]), nn.Conv2d(ch[i - 1], ch[i], 4, 2, 1)]
        enc += [_PlainRes(ch[-1]), _PlainRes(ch[-1]), nn.SiLU()]
        enc += [nn.Conv2d(ch[-1], config.embed_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.embedding = nn.Embedding(config.codebook_size, config.embed_dim)
        nn.init.normal_(self.embedding.weight)
        dec: list[nn.Module] = [nn.Conv2d(config.embed_dim, ch[-1], 3, 1, 1)]
        dec += [_PlainRes(ch[-1]), _PlainRes(ch[-1])]
        for i in reversed(range(1, len(ch))):
            dec += [nn.ConvTranspose2d(ch[i], ch[i - 1], 4, 2, 1), _PlainRes(ch[i - 1])]
        dec += [nn.SiLU(), nn.ConvTranspose2d(ch[0], 3, 4, 2, 1)]
        self.decoder = nn.Sequential(*dec)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=1)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(images), dim=1)

    def quantize_latents(self, z: torch.Tensor) -> torch.Tensor:
        b, d, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        return _nearest_codes(flat, self.codebook()).view(b, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)  # (B, D, h, w)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, codebook + commitment loss, codes)."""
        z = self.encode_latents(images)
        codes = self.quantize_latents(z.detach())
        z_q = self.embed_codes(codes)
        vq_loss = F.mse_loss(z_q, z.detach()) + self.config.beta * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()  # straight-through gradient to the encoder
        return self.decoder(z_st), vq_loss, codes


def save_native(model: NativeVQ, path: str | Path, extra: dict | None = None) -> None:
    """Writes a native VQ as safetensors with its config (and `extra` info) in the header."""
    from safetensors.torch import save_file

    meta = {NATIVE_CONFIG_KEY: json.dumps(asdict(model.config))}
    if extra:
        meta["megatron_ts.vq_train"] = json.dumps(extra)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


# ----------------------------------------------------------------------------------------------
# LlamaGen VQ-16
# ----------------------------------------------------------------------------------------------


@dataclass
class LlamaGenConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    num_res_blocks: int = 2


class _LlamaGenEncoder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        in_mult = (1, *cfg.ch_mult)
        self.conv_blocks = nn.ModuleList()
        n = len(cfg.ch_mult)
        for i in range(n):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if i == n - 1:  # attention at the lowest resolution only
                    block.attn.append(AttnBlock(c_in))
            if i != n - 1:
                block.downsample = Downsample(c_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)]
        )
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _LlamaGenDecoder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)]
        )
        self.conv_blocks = nn.ModuleList()
        for i in range(n):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * cfg.ch_mult[n - 1 - i]
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if i == 0:
                    block.attn.append(AttnBlock(c_in))
            if i != n - 1:
                block.upsample = Upsample(c_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _L2Quantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)


class LlamaGenVQ(VQTokenizer):
    """LlamaGen's VQModel (VQ-16) in its public key layout."""

    format = "llamagen"

    def __init__(self, config: LlamaGenConfig | None = None):
        config = config or LlamaGenConfig()
        super().__init__(config.codebook_size, 2 ** (len(config.ch_mult) - 1))
        self.config = config
        self.encoder = _LlamaGenEncoder(config)
        self.decoder = _LlamaGenDecoder(config)
        self.quantize = _L2Quantizer(config.codebook_size, config.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.quantize.embedding.weight, dim=1)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    def quantize_latents(self, z: torch.Tensor) -> torch.Tensor:
        b, d, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        return _nearest_codes(flat, self.codebook()).view(b, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))


# ----------------------------------------------------------------------------------------------
# Chameleon VQGAN (encoder and quantizer from transformers, taming decoder here)
# ----------------------------------------------------------------------------------------------


@dataclass
class ChameleonConfig:
    num_embeddings: int = 8192
    embed_dim: int = 256
    base_channels: int = 128
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    latent_channels: int = 256
    num_res_blocks: int = 2


class _TamingDecoder(nn.Module):
    """taming-transformers' Decoder without attention outside the middle (attn_resolutions=[])."""

    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        mult = cfg.channel_multiplier
        c_in = cfg.base_channels * mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c_in, c_in)
        self.mid.attn_1 = AttnBlock(c_in)
        self.mid.block_2 = ResnetBlock(c_in, c_in)
        ups: list[nn.Module] = [nn.Module() for _ in mult]
        for i in reversed(range(len(mult))):  # up[i] works at the resolution of level i
            c_out = cfg.base_channels * mult[i]
            ups[i].block = nn.ModuleList()
            ups[i].attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                ups[i].block.append(ResnetBlock(c_in, c_out))
                c_in = c_out
            if i != 0:
                ups[i].upsample = Upsample(c_in)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if hasattr(self.up[i], "upsample"):
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ChameleonVQ(VQTokenizer):
    """The Chameleon VQGAN: `transformers.ChameleonVQVAE` plus the taming decoder."""

    format = "chameleon"

    def __init__(self, config: ChameleonConfig | None = None):
        from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

        config = config or ChameleonConfig()
        super().__init__(config.num_embeddings, 2 ** (len(config.channel_multiplier) - 1))
        self.config = config
        hf_config = ChameleonVQVAEConfig(
            num_embeddings=config.num_embeddings,
            embed_dim=config.embed_dim,
            base_channels=config.base_channels,
            channel_multiplier=list(config.channel_multiplier),
            latent_channels=config.latent_channels,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=[],
            double_latent=False,
        )
        self.hf = ChameleonVQVAE(hf_config)
        self.decoder = _TamingDecoder(config)

    def load_flat_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads a taming-named state dict (encoder., quantize., quant_conv., decoder., ...)."""
        dec = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
        rest = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        self.hf.load_state_dict(rest, strict=True)
        if self.decoder is not None:
            self.decoder.load_state_dict(dec, strict=True)

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state in the checkpoint's (taming) key names."""
        out = dict(self.hf.state_dict())
        if self.decoder is not None:
            out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        return out

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf.quant_conv(self.hf.encoder(images))

    def quantize_latents(self, z: torch.Tensor) -> torch.Tensor:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return _nearest_codes(flat, self.hf.quantize.embedding.weight).view(b, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.hf.quantize.embedding(codes).permute(0, 3, 1, 2)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise VQCheckpointError(
                "this Chameleon VQ was loaded without a decoder (transformers' converted "
                "checkpoints drop it); load the original vqgan.ckpt to decode images"
            )
        return self.decoder(self.hf.post_quant_conv(z_q))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors or torch checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VQCheckpointError(
            f"VQ checkpoint {path} is neither safetensors nor a readable torch file ({exc})"
        ) from exc
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        meta[NATIVE_CONFIG_KEY] = json.dumps(obj["config"])
    for key in ("model", "state_dict", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise VQCheckpointError(f"VQ checkpoint {path} holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, meta


def check_state_dict(
    expected: dict[str, torch.Tensor],
    got: dict[str, torch.Tensor],
    path: str | Path,
    fmt: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Strict key and shape check naming the first mismatch.

    Args:
        expected: the model's state dict (names and shapes).
        got: the checkpoint's tensors.
        path: checkpoint path, for the message.
        fmt: the chosen `--vq-format`, for the message.
        optional: checkpoint keys that may be present without a model counterpart.

    Raises:
        VQCheckpointError: naming the first missing, unexpected or mis-shaped key.
    """
    hint = (
        f"check --vq-format (now {fmt!r}: one of {', '.join(VQ_FORMATS)}) and that "
        f"--vq-checkpoint is the right file"
    )
    for key, tensor in expected.items():
        if key not in got:
            raise VQCheckpointError(f"VQ checkpoint {path}: missing key {key!r}; {hint}")
        if tuple(got[key].shape) != tuple(tensor.shape):
            raise VQCheckpointError(
                f"VQ checkpoint {path}: key {key!r} has shape {tuple(got[key].shape)}, the "
                f"{fmt} model expects {tuple(tensor.shape)}; {hint}"
            )
    for key in got:
        if key not in expected and not key.startswith(optional):
            raise VQCheckpointError(f"VQ checkpoint {path}: unexpected key {key!r}; {hint}")


_IDENTITY_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (or of the sorted member hashes of a directory); cached by mtime."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for member in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(member.relative_to(path)).encode())
            h.update(file_sha256(member).encode())
        return h.hexdigest()
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _IDENTITY_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _IDENTITY_CACHE[key] = h.hexdigest()
    return _IDENTITY_CACHE[key]


def vq_identity(fmt: str, checkpoint: str | Path | None) -> str:
    """The identity recorded in vocabulary layouts: `format:sha256[:16]` of the checkpoint."""
    if not checkpoint:
        return fmt
    return f"{fmt}:{file_sha256(checkpoint)[:16]}"


def _dataclass_from(cls, values: dict, path: Path):
    names = {f.name for f in cls.__dataclass_fields__.values()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise VQCheckpointError(
            f"VQ config for {path} has unknown field {unknown[0]!r}; known: {sorted(names)}"
        )
    return cls(**values)


def load_vq(
    format: str,
    checkpoint: str | Path | None,
    device: str | torch.device | None = None,
    config: dict | None = None,
) -> VQTokenizer:
    """Loads a VQ tokenizer in eval mode.

    Args:
        format: native, llamagen or chameleon.
        checkpoint: path to the checkpoint file.
        device: where it runs; None picks CUDA when present, else CPU.
        config: architecture overrides for llamagen/chameleon (defaults are the public models:
            LlamaGen VQ-16, Chameleon VQGAN); the native config is read from the checkpoint.

    Returns:
        The tokenizer with `identity` set from the checkpoint's hash.

    Raises:
        VQCheckpointError: unknown format, unreadable file, or mismatched keys/shapes.
        FileNotFoundError: the checkpoint does not exist.
    """
    if format not in VQ_FORMATS:
        raise VQCheckpointError(f"--vq-format {format!r} is not one of {', '.join(VQ_FORMATS)}")
    if not checkpoint:
        raise VQCheckpointError(
            f"no VQ checkpoint given for format {format!r}; pass --vq-checkpoint PATH "
            "(for the demo: train one with `ts-data train-vq`)"
        )
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"VQ checkpoint {path} does not exist; fix --vq-checkpoint")
    state, meta = _read_state(path)
    if format == "native":
        if NATIVE_CONFIG_KEY not in meta:
            raise VQCheckpointError(
                f"VQ checkpoint {path} has no native config ({NATIVE_CONFIG_KEY}); it is not a "
                "`ts-data train-vq` checkpoint: pass --vq-format llamagen or chameleon"
            )
        cfg = _dataclass_from(NativeVQConfig, json.loads(meta[NATIVE_CONFIG_KEY]), path)
        model: VQTokenizer = NativeVQ(cfg)
        check_state_dict(model.state_dict(), state, path, format)
        model.load_state_dict(state, strict=True)
    elif format == "llamagen":
        model = LlamaGenVQ(_dataclass_from(LlamaGenConfig, config or {}, path))
        # LlamaGen saves a usage counter buffer beside the codebook
        check_state_dict(model.state_dict(), state, path, format, ("quantize.codebook_used",))
        state = {k: v for k, v in state.items() if k != "quantize.codebook_used"}
        model.load_state_dict(state, strict=True)
    else:
        model = ChameleonVQ(_dataclass_from(ChameleonConfig, config or {}, path))
        for prefix in ("model.vqmodel.", "vqmodel."):  # HF full-model files nest the VQ
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        # the taming training checkpoint also holds the discriminator/perceptual loss
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        expected = model.flat_state_dict()
        if not any(k.startswith("decoder.") for k in state):
            # transformers' converted Chameleon files drop the decoder: enough to tokenize
            expected = {k: v for k, v in expected.items() if not k.startswith("decoder.")}
            model.decoder = None
            log.warning("VQ checkpoint %s has no decoder: it can encode, not decode", path)
        check_state_dict(expected, state, path, format)
        model.load_flat_state_dict(state)
    model.identity = vq_identity(format, path)
    model.checkpoint_sha256 = file_sha256(path)  # cached: the identity just hashed the file
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    log.info(
        "loaded %s VQ %s: %d codes, %dx downsampling (%s)",
        format,
        path,
        model.codebook_size,
        model.downsample,
        model.identity,
    )
    return model


def default_device() -> str:
    """CUDA when present (honouring TS_VQ_DEVICE), else CPU."""
    return os.environ.get("TS_VQ_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
