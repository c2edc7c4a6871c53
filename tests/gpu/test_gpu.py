"""Checks of the CUDA path: kernels, bf16, the engine on CUDA/NCCL, GPU sampling and tokenize.

Skipped, with the reason shown, on CPU machines (tests/conftest.py); `scripts/gpu_check.sh`
runs them on the GPU machine, and its `--smoke` mode runs them on CPU (tests/gpu/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_ts.config import ModelConfig
from megatron_ts.models.loss import TokenShuffleLoss
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.testing import randomize_weights
from megatron_ts.vocab import VocabLayout
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.gpu

VOCAB = VocabLayout(text_size=256, codebook_size=512)


def _attention(backend: str, q, k, v):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ts.models.attention import make_core_attention
    from megatron_ts.models.model import transformer_config

    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 1)
    module = make_core_attention(backend)(transformer_config(spec), 1, AttnMaskType.causal, "self")
    return module(q, k, v, None)


def test_flash_attn_matches_sdpa(cuda_only):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (optional `gpu` extra)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(512, 2, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = _attention("sdpa", q, k, v).float()
    out = _attention("flash_attn", q, k, v).float()
    assert (out - ref).abs().max().item() < 2e-2


def test_sdpa_uses_the_flash_kernel_in_bf16(cuda_only):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1024, 2, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot run
        out = _attention("sdpa", q, k, v)
    assert out.shape == (1024, 2, 8 * 128)


def _model(s: int, device: str, dtype=torch.float32, checkpointing: str = "none"):
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, s, 1, checkpointing)
    model = TokenShuffleLM(spec, seed=3)
    randomize_weights(model, 4)  # the zero-initialised branches too
    return model.to(device=device, dtype=dtype)


def _batch(device: str, b: int = 2, caption: int = 8, grid: int = 8):
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB.text_size, (b, caption + 2), generator=gen)
    text[:, 0], text[:, -1] = VOCAB.bos_id, VOCAB.boi_id
    mask = torch.ones_like(text, dtype=torch.bool)
    codes = torch.randint(0, VOCAB.codebook_size, (b, grid, grid), generator=gen)
    return text.to(device), mask.to(device), codes.to(device)


def _loss_and_grads(model, s: int, batch) -> tuple[float, torch.Tensor]:
    text, mask, codes = batch
    loss = TokenShuffleLoss(VOCAB, s, text_weight=1.0, z_coef=1e-4)(model(text, codes), batch)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return float(loss), grads


@pytest.mark.parametrize("s", [1, 2])
def test_bf16_model_matches_fp32(single_rank, device, s):
    """The training model with bf16 weights (what DeepSpeed's bf16 mode runs) against fp32."""
    batch = _batch(device)
    ref_loss, ref_grads = _loss_and_grads(_model(s, device), s, batch)
    loss, grads = _loss_and_grads(_model(s, device, torch.bfloat16), s, batch)
    assert loss == pytest.approx(ref_loss, rel=5e-3)
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.995


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_matches_plain_backward(single_rank, device, mode):
    """Recompute (torch.utils.checkpoint; it restores the CUDA RNG state) changes nothing.

    megatron-core's CUDA RNG tracker is never used: dropout is 0, weights are initialised on CPU
    and both recompute modes are torch.utils.checkpoint.
    """
    batch = _batch(device)
    ref_loss, ref_grads = _loss_and_grads(_model(2, device), 2, batch)
    loss, grads = _loss_and_grads(_model(2, device, checkpointing=mode), 2, batch)
    assert loss == ref_loss
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


def _engine_curve(rank: int, world: int, device: str) -> list[tuple[float, float]]:
    import megatron_ts.distributed.init as init
    from tests.distributed.test_engine import _loss_curve

    init.init_distributed("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(rank)
    return _loss_curve(1, 1, 1, device=device)


def test_engine_on_device_matches_cpu(device):
    """ZeRO-1 steps through DeepSpeed's accelerator for the device (NCCL world of one on CUDA)."""
    env = {"DS_ACCELERATOR": "cuda"} if device == "cuda" else {}
    (on_device,) = run_distributed(_engine_curve, 1, device, env=env)
    (on_cpu,) = run_distributed(_engine_curve, 1, "cpu")
    assert len(on_device) == len(on_cpu) == 3
    for (loss, norm), (ref_loss, ref_norm) in zip(on_device, on_cpu):
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert norm == pytest.approx(ref_norm, rel=1e-3)


class _Bytes:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def _hf_model(device: str, dtype=torch.float32):
    from megatron_ts.hf.build import hf_config_from_spec
    from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM

    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 2)
    config = hf_config_from_spec(spec, caption_len=8, resolutions=[64], vq_downsample=8)
    torch.manual_seed(0)
    model = TokenShuffleForCausalLM(config).eval()
    randomize_weights(model, 5)
    return model.to(device=device, dtype=dtype)


def _sample(model, device: str, sampling) -> torch.Tensor:
    from megatron_ts.hf.generation_token_shuffle import caption_ids, sample_codes

    cfg = model.config
    ids = [caption_ids(_Bytes(), p, 8, cfg) for p in ("a red square", "two blue dots")]
    uncond = [caption_ids(_Bytes(), "", 8, cfg)] * 2
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return sample_codes(
        model, torch.tensor(ids, device=device), 8, sampling, gens,
        torch.tensor(uncond, device=device),
    ).cpu()  # fmt: skip


def test_sampling_on_device_matches_cpu(device):
    """KV-cache decoding with guidance: greedy codes equal CPU's in fp32; bf16 samples run."""
    from megatron_ts.hf.generation_token_shuffle import SamplingConfig

    greedy = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    ref = _sample(_hf_model("cpu"), "cpu", greedy)
    assert torch.equal(_sample(_hf_model(device), device, greedy), ref)
    topk = _sample(
        _hf_model(device, torch.bfloat16), device, SamplingConfig(cfg_scale=3.0, top_k=50)
    )
    assert topk.shape == (2, 8, 8)
    assert 0 <= int(topk.min()) and int(topk.max()) < VOCAB.codebook_size


def test_vq16_encode_on_device_matches_cpu(device):
    """LlamaGen's VQ-16 (random weights): codes from the device agree with CPU's."""
    from megatron_ts.hf.vq_token_shuffle import LlamaGenVQ

    torch.manual_seed(0)
    vq = LlamaGenVQ().eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = vq.encode(images)
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, as on CPU
    try:
        codes = vq.to(device).encode(images.to(device)).cpu()
        decoded = vq.decode(codes.to(device))
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert codes.shape == ref.shape == (2, 8, 8)
    # a code can flip where two codebook entries are about equally near
    assert (codes == ref).float().mean() >= 0.95
    assert decoded.shape == (2, 3, 128, 128)


def _nccl_curve(rank: int, world: int, tp: int) -> list[float]:
    import megatron_ts.distributed.init as init
    from tests.distributed.test_engine import _loss_curve

    init.init_distributed("nccl")
    torch.cuda.set_device(rank)
    return [loss for loss, _ in _loss_curve(tp, 1, 1, device="cuda")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL parity needs 2 GPUs")
def test_nccl_tp2_matches_single_gpu():
    env = {"DS_ACCELERATOR": "cuda"}
    single = run_distributed(_nccl_curve, 1, 1, env=env)[0]
    tp2 = run_distributed(_nccl_curve, 2, 2, env=env)[0]
    assert tp2 == pytest.approx(single, abs=1e-4)
