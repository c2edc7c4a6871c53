"""Rotary position embedding for the core attention: cached cos/sin, applied in one pass.

Layout: non-interleaved (rotate-half), as megatron-core's `apply_rotary_pos_emb` with
`rotary_interleaved=False` and HF Llama, so exports need no permutation. For t = [t1, t2]
(halves of the head dim) and angles f = position * inv_freq (one per pair):

    out = [t1 cos f - t2 sin f,  t2 cos f + t1 sin f]

megatron-core's unfused path recomputes cos and sin of the angles for every call and builds the
result from a negation, two concatenations (one of them with an empty tail), two products and a
sum, each a pass over q or k, and autograd keeps the pieces. Here cos/sin
are cached per (length, dim, dtype, device), the forward writes each half of the output with one
multiply and one multiply-add (`addcmul_`), and the backward is the same rotation by -f (the
transpose of a rotation), so nothing but cos/sin is saved. Where NVIDIA Apex is installed and we
run on CUDA its fused kernel is used instead (`kernels.py`).
"""

from __future__ import annotations

import functools

import torch


def rope_freqs(seq_len: int, dim: int, theta: float, device: torch.device | str) -> torch.Tensor:
    """RoPE angles (S, 1, 1, dim) for positions 0..S-1 in megatron's rotate-half layout [f, f].

    This is the `rotary_pos_emb` megatron-core's own `apply_rotary_pos_emb` takes; the tests
    compare `apply_rope` against it.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (S, dim/2)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :].to(device)  # (S, 1, 1, dim)


@functools.lru_cache(maxsize=32)
def _cos_sin(
    seq_len: int, dim: int, theta: float, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # normal tensors even when first asked for under inference_mode, so training can reuse them
    with torch.inference_mode(False), torch.no_grad():
        freqs = rope_freqs(seq_len, dim, theta, device)  # fp32, as megatron computes them
        return freqs.cos().to(dtype), freqs.sin().to(dtype)  # (S, 1, 1, dim) each


def rope_cos_sin(
    seq_len: int, dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (S, 1, 1, dim) of `rope_freqs`, in `dtype`, cached per shape."""
    return _cos_sin(seq_len, dim, theta, str(device), dtype)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[t1 c - t2 s, t2 c + t1 s] for t (S, B, H, D) of any strides, cos/sin (S, 1, 1, D/2)."""
    h = t.shape[-1] // 2
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # (S, B, H, D) contiguous
    t1, t2, o1, o2 = t[..., :h], t[..., h:], out[..., :h], out[..., h:]
    torch.mul(t1, cos, out=o1).addcmul_(t2, sin, value=-1.0)
    torch.mul(t2, cos, out=o2).addcmul_(t1, sin)
    return out


class _RotaryFunction(torch.autograd.Function):
    """Rotate-half RoPE whose backward is the inverse rotation; saves only cos/sin."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on t (S, B, H, D) with cos/sin (S, 1, 1, D) from `rope_cos_sin` (torch kernels).

    The rotate-half layout repeats each angle in both halves, so only the first half of
    cos/sin is read.
    """
    h = t.shape[-1] // 2
    return _RotaryFunction.apply(t, cos[..., :h], sin[..., :h])
