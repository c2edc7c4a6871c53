"""ColumnLinear / RowLinear: megatron-core's TP linear layers, torch's linear at TP = 1.

At one TP rank they must compute what megatron-core's own classes compute (same parameters,
same outputs and gradients, bit for bit on CPU) without its autograd function; TP = 2 keeps
megatron-core's path (tests/distributed: the TP = 2 parity tests train through it).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_ts.config import ModelConfig
from megatron_ts.models.linear import ColumnLinear, RowLinear
from megatron_ts.models.model import ModelSpec, transformer_config
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def _grad_fns(out: torch.Tensor) -> set[str]:
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or type(fn).__name__ in seen:
            continue
        seen.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (ColumnLinear, ColumnParallelLinear, {"gather_output": False, "bias": False}),
        (ColumnLinear, ColumnParallelLinear, {"gather_output": False, "bias": True}),
        (RowLinear, RowParallelLinear, {"input_is_parallel": True, "bias": False}),
        (RowLinear, RowParallelLinear, {"input_is_parallel": True, "bias": True}),
    ],
)
def test_one_rank_linear_equals_megatron_bit_for_bit(ours, theirs, kwargs):
    config = transformer_config(ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 1))
    args = (48, 80)
    common = {"config": config, "init_method": torch.nn.init.normal_, "skip_bias_add": False}
    fast, ref = ours(*args, **common, **kwargs), theirs(*args, **common, **kwargs)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(13, 3, 48, generator=torch.Generator().manual_seed(0))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = fast(x1)
    want, _ = ref(x2)
    assert "LinearWithGradAccumulationAndAsyncCommunicationBackward" in _grad_fns(want)
    assert "LinearWithGradAccumulationAndAsyncCommunicationBackward" not in _grad_fns(out)
    assert out.shape == want.shape == (13, 3, 80)
    assert torch.equal(out, want)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    want.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_frozen_weights_get_no_gradient():
    config = transformer_config(ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 1))
    layer = ColumnLinear(
        48, 80, config=config, init_method=torch.nn.init.normal_, bias=False, gather_output=False
    )
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 2, 48, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    assert layer.weight.grad is None and x.grad is not None
