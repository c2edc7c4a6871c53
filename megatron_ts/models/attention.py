"""Core attention for megatron-core's SelfAttention: RoPE, then flash-attn or PyTorch SDPA.

megatron-core's own DotProductAttention takes its score buffer from a CUDA global buffer and
fails on CPU, so the layer spec plugs this module in instead. SDPA on H100 dispatches to the
FlashAttention-2 kernel through PyTorch's flash backend; the `flash_attn` package is used when
it is importable and the tensors are on CUDA in bf16/fp16.

RoPE is applied here, to the query and key views megatron's SelfAttention hands over, rather
than by SelfAttention itself (the block passes it no `rotary_pos_emb`): megatron-core 0.16 fuses
RoPE only through Transformer Engine, and its unfused path costs several full passes over q and
k (`rope.py`). Both backends take the strided (S, B, H, D) views as they are: the permutes
below are views, not copies; the one copy is the output's (B, S) -> (S, B) reorder that
megatron's sequence-first layout needs before the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ts.logging import get_logger
from megatron_ts.models.kernels import apex_apply_rope
from megatron_ts.models.rope import apply_rope, rope_cos_sin

log = get_logger(__name__)

try:  # optional extra `gpu`; the SDPA path is the tested default
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

_announced: set[str] = set()


def flash_attn_available() -> bool:
    """True when the flash_attn package imported and a CUDA device is present."""
    return _flash_attn_func is not None and torch.cuda.is_available()


def resolve_backend(requested: str) -> str:
    """Maps model.attention_backend (auto, sdpa, flash_attn) to the backend that will run."""
    if requested == "flash_attn" and not flash_attn_available():
        raise RuntimeError(
            "model.attention_backend = 'flash_attn' but the flash_attn package is not importable "
            "on a CUDA machine; install the `gpu` extra or use 'sdpa' / 'auto'"
        )
    if requested == "auto":
        return "flash_attn" if flash_attn_available() else "sdpa"
    return requested


class CoreAttention(MegatronModule):
    """RoPE and causal attention over [seq, batch, heads, head_dim] tensors of one TP partition.

    Grouped-query attention is handled natively (SDPA's enable_gqa, flash-attn's MQA/GQA).
    """

    backend = "sdpa"
    rope_theta: float | None = None
    """RoPE base applied to query and key over positions 0..S-1; None: no RoPE here."""
    rope_kernel = "torch"
    """"torch" (`rope.apply_rope`) or "apex" (NVIDIA Apex's fused kernel, CUDA only)."""
    checkpoint = False
    """Selective activation checkpointing: recompute attention in the backward pass."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CoreAttention supports causal masks only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.layer_number = layer_number

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if (
            attention_mask is not None
            or attention_bias is not None
            or packed_seq_params is not None
        ):
            raise ValueError("CoreAttention is causal-only: masks, biases and packing are not used")
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._attend, query, key, value, use_reentrant=False
            )
        return self._attend(query, key, value)

    def _rope(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(
            query.shape[0], query.shape[-1], self.rope_theta, query.device, query.dtype
        )  # (S, 1, 1, D), cached per shape
        rope = apex_apply_rope if self.rope_kernel == "apex" and query.is_cuda else apply_rope
        return rope(query, cos, sin), rope(key, cos, sin)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.rope_theta is not None:  # inside the checkpointed region: recomputed, not kept
            query, key = self._rope(query, key)
        seq, batch, heads, dim = query.shape
        dropout = self.dropout_p if self.training else 0.0
        backend = self.backend
        if backend == "flash_attn" and not (
            query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
        ):
            backend = "sdpa"
        if backend not in _announced:
            _announced.add(backend)
            log.info("core attention backend: %s", backend)
        if backend == "flash_attn":
            # flash-attn wants [batch, seq, heads, dim]
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            out = _flash_attn_func(
                q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True
            )
            out = out.transpose(0, 1)  # (S, B, H, D)
        else:
            # SDPA wants [batch, heads, seq, dim]; strided views are fine on CPU and CUDA
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout,
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
            out = out.permute(2, 0, 1, 3)  # (S, B, H, D)
        return out.reshape(seq, batch, heads * dim)  # the one copy: batch-major -> seq-major


def make_core_attention(
    backend: str, rope_theta: float | None = None, rope_kernel: str = "torch"
) -> type[CoreAttention]:
    """A CoreAttention subclass bound to one backend and RoPE, for use in a ModuleSpec.

    Args:
        backend: "sdpa" or "flash_attn".
        rope_theta: RoPE base to apply to query and key; None for attention without RoPE.
        rope_kernel: "torch" or "apex" (see `kernels.select_kernels`).
    """
    if rope_kernel not in ("torch", "apex"):
        raise ValueError(f"rope_kernel must be 'torch' or 'apex', got {rope_kernel!r}")
    attrs = {"backend": backend, "rope_theta": rope_theta, "rope_kernel": rope_kernel}
    return type(f"CoreAttention_{backend}", (CoreAttention,), attrs)
