"""Checks that need CUDA: skipped, with the reason shown, on CPU machines (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.gpu


def _attention(backend: str, q, k, v):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ts.config import ModelConfig
    from megatron_ts.models.attention import make_core_attention
    from megatron_ts.models.model import ModelSpec, transformer_config
    from megatron_ts.vocab import VocabLayout

    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VocabLayout(256, 512), 1)
    module = make_core_attention(backend)(transformer_config(spec), 1, AttnMaskType.causal, "self")
    return module(q, k, v, None)


def test_flash_attn_matches_sdpa():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (optional `gpu` extra)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(512, 2, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = _attention("sdpa", q, k, v).float()
    out = _attention("flash_attn", q, k, v).float()
    assert (out - ref).abs().max().item() < 2e-2


def test_sdpa_uses_the_flash_kernel_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1024, 2, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot run
        out = _attention("sdpa", q, k, v)
    assert out.shape == (1024, 2, 8 * 128)


def _nccl_curve(rank: int, world: int, tp: int) -> list[float]:
    import megatron_ts.distributed.init as init
    from tests.distributed.test_engine import _loss_curve

    init.init_distributed("nccl")
    torch.cuda.set_device(rank)
    return [loss for loss, _ in _loss_curve(tp, 1, 1, device="cuda")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL parity needs 2 GPUs")
def test_nccl_tp2_matches_single_gpu():
    single = run_distributed(_nccl_curve, 1, 1)[0]
    tp2 = run_distributed(_nccl_curve, 2, 2)[0]
    assert tp2 == pytest.approx(single, abs=1e-4)
