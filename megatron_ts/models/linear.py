"""megatron-core's tensor-parallel linear layers, with torch's linear where TP has one rank.

megatron-core's `ColumnParallelLinear` and `RowParallelLinear` run every matmul through their own
autograd function (`LinearWithGradAccumulationAndAsyncCommunication`) whatever the TP size: a
Python forward and backward wrapped in autocast decorators, a 3-D `matmul` for the input
gradient, and `prepare_input_tensors_for_wgrad_compute` (a `contiguous` copy and reshapes)
before the weight gradient. With one TP rank none of it does anything but the matmuls: there is
no all-reduce of the input gradient, no sequence-parallel gather, and (fused) gradient
accumulation into `main_grad` is off in our models. There `torch.nn.functional.linear` computes
the same product and gradients: bit-identical weights after 5 demo training steps on CPU and a
demo step 1-4% faster at 32 px (issue 22; docs/benchmarks.md, "ts-train overhead vs plain
PyTorch", run 5). Anything else (TP > 1, sequence parallel, gradient accumulation fusion) stays
on megatron-core's path unchanged, and the parameters, their attributes and the state dict are
megatron-core's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _one_rank_linear(layer, input: torch.Tensor, weight: torch.Tensor, kwargs: dict):
    """F.linear when megatron-core's function would only multiply, else None."""
    if (
        layer.tp_group is not None
        and layer.tp_group.size() == 1
        and not kwargs.get("sequence_parallel")
        and not kwargs.get("gradient_accumulation_fusion")
        and kwargs.get("grad_output_buffer") is None
    ):
        return F.linear(input, weight, kwargs.get("bias"))
    return None


class ColumnLinear(ColumnParallelLinear):
    """`ColumnParallelLinear` that multiplies with torch's linear at TP = 1 (module docstring)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        out = None if args else _one_rank_linear(self, input, weight, kwargs)
        return super()._forward_impl(input, weight, *args, **kwargs) if out is None else out


class RowLinear(RowParallelLinear):
    """`RowParallelLinear` that multiplies with torch's linear at TP = 1 (module docstring)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        out = None if args else _one_rank_linear(self, input, weight, kwargs)
        return super()._forward_impl(input, weight, *args, **kwargs) if out is None else out
