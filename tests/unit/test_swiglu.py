"""SwiGLUMLP: bitwise megatron-core's MLP (same parameters), without its backward concatenation."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules

from megatron_ts.config import ModelConfig
from megatron_ts.models.model import ModelSpec, transformer_config
from megatron_ts.models.swiglu import SwiGLUMLP
from megatron_ts.testing import randomize_weights
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def test_swiglu_mlp_equals_megatron_mlp():
    config = transformer_config(ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 1))
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    ours, ref = SwiGLUMLP(config, submodules), MLP(config, submodules)
    randomize_weights(ours, 2)
    ref.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(13, 3, config.hidden_size, generator=torch.Generator().manual_seed(0))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, bias = ours(x1)
    want, want_bias = ref(x2)
    assert out.shape == (13, 3, config.hidden_size) and bias is None and want_bias is None
    assert torch.equal(out, want)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    want.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_other_activations_are_refused():
    config = transformer_config(ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 1))
    config.activation_func = torch.nn.functional.gelu
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    with pytest.raises(ValueError, match="activation_func=F.silu"):
        SwiGLUMLP(config, submodules)
