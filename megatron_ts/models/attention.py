"""Core attention for megatron-core's SelfAttention: flash-attn when usable, else PyTorch SDPA.

megatron-core's own DotProductAttention takes its score buffer from a CUDA global buffer and
fails on CPU, so the layer spec plugs this module in instead. SDPA on H100 dispatches to the
FlashAttention-2 kernel through PyTorch's flash backend; the `flash_attn` package is used when
it is importable and the tensors are on CUDA in bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ts.logging import get_logger

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
    """Causal attention over [seq, batch, heads, head_dim] tensors of one TP partition.

    Grouped-query attention is handled natively (SDPA's enable_gqa, flash-attn's MQA/GQA).
    """

    backend = "sdpa"
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

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
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
            # SDPA wants [batch, heads, seq, dim]
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
        return out.reshape(seq, batch, heads * dim)


def make_core_attention(backend: str) -> type[CoreAttention]:
    """Returns a CoreAttention subclass bound to one backend, for use in a ModuleSpec."""
    return type(f"CoreAttention_{backend}", (CoreAttention,), {"backend": backend})
