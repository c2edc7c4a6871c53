"""megatron-core's MLP with SwiGLU as one autograd function, so backward needs no concatenation.

megatron-core's unfused gated MLP splits the fused fc1 output (S, B, 2f) [gate; up] with
`torch.chunk`; autograd then joins the two gradient halves with a `cat` in backward, one more
pass over the widest activation of the block. `_SwiGLU` writes both halves of the input
gradient straight into one buffer instead. It saves what autograd saved (the fc1 output and
silu(gate)) and computes the same products in the same order, so results are bitwise those of
megatron-core's `MLP` (tests/unit/test_swiglu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for x = [gate; up] along the last dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(x, act)
        return act * up  # (S, B, f)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, act = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)  # (S, B, 2f)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x1) * x2 for x = [x1; x2] along the last dim: (..., 2f) -> (..., f)."""
    return _SwiGLU.apply(x)


class SwiGLUMLP(MLP):
    """megatron-core's MLP (same linears, parameters and TP layout) with `swiglu` as activation.

    Only the plain Llama MLP: SiLU-gated, no clamp, no offset, no per-token scale.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        if not (
            config.gated_linear_unit
            and config.activation_func is F.silu
            and config.activation_func_clamp_value is None
            and not config.glu_linear_offset
            and not config.use_te_activation_func
        ):
            raise ValueError(
                "SwiGLUMLP needs gated_linear_unit=True, activation_func=F.silu and no clamp, "
                "offset or TE activation; use megatron-core's MLP for other activations"
            )

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise ValueError("SwiGLUMLP has no per-token scale (a MoE expert feature)")
        fc1, bias = self.linear_fc1(hidden_states)  # (S, B, 2f/tp): [gate; up] of this rank
        if bias is not None:
            fc1 = fc1 + bias
        return self.linear_fc2(swiglu(fc1))  # (out (S, B, d), bias)
