"""NVIDIA Apex's fused RMSNorm and RoPE against the torch kernels, on CUDA.

Skipped with the reason shown where CUDA or a real NVIDIA Apex build (with its CUDA extensions)
is missing; Apex is never a pip dependency (docs/parallelism.md, "NVIDIA Apex (optional)").
"""

from __future__ import annotations

import pytest
import torch

from megatron_ts.models import kernels
from megatron_ts.models.rope import apply_rope, rope_cos_sin

pytestmark = pytest.mark.gpu


@pytest.fixture()
def apex_rms_norm(cuda_only) -> None:
    if not kernels.apex_rms_norm_available():
        pytest.skip("NVIDIA Apex with its CUDA extensions is not installed (built from source)")


@pytest.fixture()
def apex_rope(cuda_only) -> None:
    if not kernels.apex_rope_available():
        pytest.skip("NVIDIA Apex's fused RoPE extension is not installed (built from source)")


def test_apex_is_selected_on_cuda(apex_rms_norm, apex_rope):
    assert kernels.select_kernels() == kernels.Kernels(norm="apex", rope="apex")


def test_apex_rms_norm_matches_torch(apex_rms_norm):
    from megatron_ts.config import ModelConfig
    from megatron_ts.models.model import ModelSpec, transformer_config
    from megatron_ts.vocab import VocabLayout

    spec = ModelSpec.from_config(
        ModelConfig(flavor="debug"), VocabLayout(text_size=256, codebook_size=512), 1
    )
    d = spec.shape.hidden_size
    fused = kernels.ApexRMSNorm(transformer_config(spec), d, eps=spec.norm_eps).cuda()
    ref = torch.nn.RMSNorm(d, eps=spec.norm_eps).cuda()
    with torch.no_grad():
        fused.weight.copy_(1 + 0.1 * torch.randn(d))
        ref.weight.copy_(fused.weight)
    x = torch.randn(64, 4, d, device="cuda")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = fused(x1), ref(x2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apex_rope_matches_torch(apex_rope, dtype):
    s, b, heads, dim = 128, 2, 8, 64
    mixed = torch.randn(s, b, heads, 3 * dim, device="cuda", dtype=dtype)
    cos, sin = rope_cos_sin(s, dim, 10000.0, torch.device("cuda"), dtype)
    grads, outs = [], []
    for fn in (kernels.apex_apply_rope, apply_rope):
        leaf = mixed.clone().requires_grad_()
        out = fn(leaf[..., :dim], cos, sin)  # a strided q view, as in the block
        out.backward(torch.ones_like(out))
        outs.append(out.float())
        grads.append(leaf.grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
