"""Layer structure as data: the megatron-core ModuleSpec of one Llama-style block.

RMSNorm -> SelfAttention (fused QKV column-parallel, our core attention, row-parallel proj)
-> residual -> RMSNorm -> SwiGLU MLP (megatron's MLP: column-parallel fc1 holding [gate; up],
row-parallel fc2; the activation is one autograd function, swiglu.py) -> residual. The linear
layers are megatron-core's, with torch's linear at TP = 1 (linear.py). Backend
choices (SDPA vs flash-attn, torch vs NVIDIA Apex norms and RoPE) live here and nowhere else.
RoPE is applied by the core attention (see attention.py for why), so the block is called
without megatron's `rotary_pos_emb`.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ts.models.attention import make_core_attention
from megatron_ts.models.kernels import ApexRMSNorm, Kernels
from megatron_ts.models.linear import ColumnLinear, RowLinear
from megatron_ts.models.swiglu import SwiGLUMLP


def llama_layer_spec(
    attention_backend: str = "sdpa",
    rope_theta: float | None = None,
    kernels: Kernels | None = None,
) -> ModuleSpec:
    """ModuleSpec of one decoder block on megatron-core's local (non-TE) TP layers.

    Args:
        attention_backend: "sdpa" or "flash_attn" (already resolved, see attention.resolve_backend).
        rope_theta: RoPE base, applied in the core attention; None leaves RoPE to megatron's
            SelfAttention (the block is then called with `rotary_pos_emb`, the pre-issue-22 path
            `benchmarks/bench_block.py` compares against).
        kernels: torch or Apex norm and RoPE (`kernels.select_kernels`); default torch.
    """
    kernels = kernels or Kernels()
    norm = ApexRMSNorm if kernels.norm == "apex" else WrappedTorchNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnLinear,
                    core_attention=make_core_attention(attention_backend, rope_theta, kernels.rope),
                    linear_proj=RowLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=SwiGLUMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnLinear, linear_fc2=RowLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
