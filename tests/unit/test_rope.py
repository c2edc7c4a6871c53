"""RoPE in the core attention: equal to megatron-core's own `apply_rotary_pos_emb`, and the block
that uses it equal to the block where megatron-core's SelfAttention applies RoPE (issue 22)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.spec_utils import build_module

from megatron_ts.config import ModelConfig
from megatron_ts.models.layer_specs import llama_layer_spec
from megatron_ts.models.model import BlockLayer, ModelSpec, transformer_config
from megatron_ts.models.rope import apply_rope, rope_cos_sin, rope_freqs
from megatron_ts.testing import randomize_weights
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)
REL = 1e-6  # fp32


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    """megatron-core layers need a (TP = 1) parallel state; a world of one gloo rank."""
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_rope_matches_megatron_core(dtype):
    s, b, heads, dim, theta = 37, 3, 4, 32, 10000.0
    config = transformer_config(ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 1))
    gen = torch.Generator().manual_seed(0)
    # q is a strided view into a fused QKV tensor, as megatron's SelfAttention hands it over
    mixed = torch.randn(s, b, heads, 3 * dim, generator=gen, dtype=dtype)
    grad_out = torch.randn(s, b, heads, dim, generator=gen, dtype=dtype)
    freqs = rope_freqs(s, dim, theta, "cpu")
    cos, sin = rope_cos_sin(s, dim, theta, torch.device("cpu"), dtype)

    outs, grads = [], []
    for ours in (True, False):
        leaf = mixed.clone().requires_grad_()
        q = leaf[..., :dim]
        out = apply_rope(q, cos, sin) if ours else apply_rotary_pos_emb(q, freqs, config)
        out.backward(grad_out)
        outs.append(out.detach())
        grads.append(leaf.grad)
    assert outs[0].shape == (s, b, heads, dim)
    assert rel_err(outs[0], outs[1]) < REL
    assert rel_err(grads[0], grads[1]) < REL
    assert grads[0][..., dim:].abs().max() == 0  # k and v parts of the view untouched


def test_cos_sin_are_cached_and_usable_after_inference_mode():
    with torch.inference_mode():
        cos, sin = rope_cos_sin(11, 16, 500.0, torch.device("cpu"), torch.float32)
    again = rope_cos_sin(11, 16, 500.0, torch.device("cpu"), torch.float32)
    assert again[0] is cos and again[1] is sin
    assert cos.shape == (11, 1, 1, 16) and not cos.is_inference()
    t = torch.randn(11, 2, 3, 16, requires_grad=True)
    apply_rope(t, cos, sin).sum().backward()  # inference tensors could not be saved for this
    assert t.grad is not None


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_block_equals_block_with_megatron_core_rope(checkpointing):
    """BlockLayer (RoPE in our core attention) == the same weights with RoPE left to megatron."""
    spec = ModelSpec.from_config(
        ModelConfig(flavor="debug", num_kv_heads=2), VOCAB, 2, 1, checkpointing
    )
    config = transformer_config(spec)
    block = BlockLayer(spec, config, 0, seed=3)
    randomize_weights(block, 4)
    old = build_module(llama_layer_spec("sdpa"), config=config, layer_number=1)
    old.load_state_dict(block.layer.state_dict())
    s, b = 21, 3
    x = torch.randn(s, b, spec.shape.hidden_size, generator=torch.Generator().manual_seed(1))
    freqs = rope_freqs(s, spec.shape.head_dim, spec.rope_theta, "cpu")

    h_new, h_old = x.clone().requires_grad_(), x.clone().requires_grad_()
    new_out, _ = block((h_new, torch.tensor([5])))
    old_out, _ = old(h_old, attention_mask=None, rotary_pos_emb=freqs)
    assert new_out.shape == (s, b, spec.shape.hidden_size)
    assert rel_err(new_out, old_out) < REL
    new_out.square().sum().backward()
    old_out.square().sum().backward()
    assert rel_err(h_new.grad, h_old.grad) < REL
    qkv = "self_attention.linear_qkv.weight"
    assert rel_err(block.layer.get_parameter(qkv).grad, old.get_parameter(qkv).grad) < REL
