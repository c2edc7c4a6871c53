"""Optional fused kernels: NVIDIA Apex's RMSNorm and RoPE on CUDA, torch everywhere else.

NVIDIA Apex only builds from source (clusters build it with its CUDA extensions); the package
index's `apex` is an unrelated web toolkit, so a successful `import apex` proves nothing. Apex
counts as NVIDIA's here only when the module that holds the kernel imports *and* its compiled
extension is present:

| kernel | Python entry | compiled extension |
|---|---|---|
| RMSNorm | `apex.normalization.FusedRMSNorm` | `fused_layer_norm_cuda` |
| RoPE | `apex.transformer.functional.fused_apply_rotary_pos_emb_cached` | `fused_rotary_positional_embedding` |

megatron-core 0.16's own Apex wrapper (`FusedLayerNorm`) is LayerNorm-only and its fused RoPE is
Transformer Engine's, so both are wired here. `select_kernels` is asked once per block build;
it logs the choice once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ts.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Kernels:
    """Which implementation each optional fused kernel uses: "apex" or "torch"."""

    norm: str = "torch"
    rope: str = "torch"


_announced: set[Kernels] = set()


def _has_extension(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _apex_attr(module: str, attr: str):
    """`module.attr` of an importable apex, or None (also for the unrelated PyPI `apex`)."""
    try:
        return getattr(importlib.import_module(module), attr, None)
    except Exception:  # noqa: BLE001 - the PyPI apex can fail to import in any way
        return None


def apex_rms_norm_available() -> bool:
    """True when NVIDIA Apex's FusedRMSNorm and its CUDA extension are installed."""
    return _apex_attr("apex.normalization", "FusedRMSNorm") is not None and _has_extension(
        "fused_layer_norm_cuda"
    )


def apex_rope_available() -> bool:
    """True when NVIDIA Apex's fused RoPE and its CUDA extension are installed."""
    return _apex_attr(
        "apex.transformer.functional", "fused_apply_rotary_pos_emb_cached"
    ) is not None and _has_extension("fused_rotary_positional_embedding")


def select_kernels(cuda: bool | None = None) -> Kernels:
    """Apex's kernels where NVIDIA Apex is installed and we run on CUDA, else torch's.

    Args:
        cuda: whether the model runs on CUDA; default `torch.cuda.is_available()` (models are
            built on CPU and moved, so the build device says nothing).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kernels = Kernels(
        norm="apex" if cuda and apex_rms_norm_available() else "torch",
        rope="apex" if cuda and apex_rope_available() else "torch",
    )
    if kernels not in _announced:
        _announced.add(kernels)
        log.info(
            "fused kernels: RMSNorm %s, RoPE %s (NVIDIA Apex %s)",
            kernels.norm,
            kernels.rope,
            "used on CUDA" if "apex" in (kernels.norm, kernels.rope) else "not used",
        )
    return kernels


class ApexRMSNorm:
    """megatron-core's norm interface, built as `apex.normalization.FusedRMSNorm`.

    Its parameter is `weight`, as torch.nn.RMSNorm's, so checkpoints do not depend on which
    kernel ran. On a CPU tensor Apex falls back to its own unfused RMSNorm.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(
                "ApexRMSNorm is a plain RMSNorm: config.normalization must be 'RMSNorm' and "
                "layernorm_zero_centered_gamma False"
            )
        fused_rms_norm = importlib.import_module("apex.normalization").FusedRMSNorm
        norm = fused_rms_norm(hidden_size, eps=eps)
        # megatron all-reduces the grads of parameters marked so under sequence parallelism
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def apex_apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apex's fused RoPE on t (S, B, H, D) with cos/sin (S, 1, 1, D) from `rope.rope_cos_sin`."""
    functional = importlib.import_module("apex.transformer.functional")
    return functional.fused_apply_rotary_pos_emb_cached(t, cos, sin)
