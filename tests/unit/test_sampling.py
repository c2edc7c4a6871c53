"""Sampler: guidance schedules, filtering, KV cache vs recomputation, seeds, --cfg 1."""

from __future__ import annotations

import pytest
import torch

from megatron_ts.config import ModelConfig
from megatron_ts.hf.build import build_plain_model
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.sampling.sampler import (
    SamplingConfig,
    _filter_logits,
    caption_ids,
    generate,
    sample_step,
)
from megatron_ts.sampling.schedules import guidance_scale
from megatron_ts.tokenizers.text import ByteTokenizer as Bytes
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=64)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


_MODELS: dict = {}


def plain_model(window: int):
    """A randomised debug model as the HF class (128 px at 16x: 8x8 codes)."""
    if window not in _MODELS:
        spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, window)
        model = TokenShuffleLM(spec, seed=5)
        gen = torch.Generator().manual_seed(window)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:  # sharp logits so greedy decoding has no near-ties
                    p.copy_(3 * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        _MODELS[window] = build_plain_model(
            spec, model.state_dict(), caption_len=6, resolutions=[128]
        )
    return _MODELS[window]


def test_schedules():
    assert guidance_scale("constant", 5.0, 0, 10) == 5.0
    assert [guidance_scale("half-linear", 5.0, k, 10) for k in (0, 1, 4, 5, 9)] == pytest.approx(
        [1.0, 1.8, 4.2, 5.0, 5.0]
    )
    assert [guidance_scale("linear", 5.0, k, 10) for k in (0, 5, 9)] == pytest.approx(
        [1.0, 3.0, 4.6]
    )
    with pytest.raises(ValueError, match="choose one of"):
        guidance_scale("cosine", 5.0, 0, 10)


def test_filters_and_guidance():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    top2 = _filter_logits(logits, 2, 1.0)
    assert torch.isinf(top2[..., :2]).all() and torch.equal(top2[..., 2:], logits[..., 2:])
    # softmax of [0,1,2,3] = .032 .087 .237 .644: top-p 0.7 keeps the two largest
    nucleus = _filter_logits(logits, 0, 0.7)
    assert torch.isinf(nucleus[..., :2]).all() and torch.isfinite(nucleus[..., 2:]).all()
    cond = torch.tensor([[[0.0, 1.0, 0.5]]])
    uncond = torch.tensor([[[0.0, 2.0, 0.0]]])
    greedy = SamplingConfig(temperature=0.0)
    both = torch.cat([cond, uncond])
    assert sample_step(both, 1.0, greedy, [None]).tolist() == [[1]]  # w = 1: the conditional
    assert sample_step(both, 3.0, greedy, [None]).tolist() == [[2]]  # 2 + 3 * (0.5 - 0) wins


def test_caption_format():
    model = plain_model(2)
    ids = caption_ids(Bytes(), "hi", 6, model.config)
    assert ids == [257, ord("h"), ord("i"), 256, 256, 256, 256, 259]
    assert caption_ids(Bytes(), "", 6, model.config) == [257] + [256] * 6 + [259]
    assert len(caption_ids(Bytes(), "x" * 50, 6, model.config)) == 8


@pytest.mark.parametrize("window", [1, 2])
def test_kv_cache_equals_recompute_greedy(window: int):
    model = plain_model(window)
    prompts = ["a red square", "two circles"]
    runs = {}
    for cache in (True, False):
        sampling = SamplingConfig(cfg=3.0, temperature=0.0, use_kv_cache=cache)
        runs[cache] = generate(model, None, Bytes(), prompts, sampling, batch_size=2)
    assert runs[True].codes.shape == (2, 8, 8)
    assert runs[True].steps == 64 // window**2  # s = 2: 4x fewer steps for the same image
    assert torch.equal(runs[True].codes, runs[False].codes)
    assert runs[True].codes.min() >= 0 and runs[True].codes.max() < 64


def test_seeds_are_reproducible_per_image():
    model = plain_model(2)
    sampling = SamplingConfig(cfg=4.0, top_k=20, top_p=0.95, seed=3)
    a = generate(model, None, Bytes(), ["a cat"], sampling, num_images=3, batch_size=3)
    b = generate(model, None, Bytes(), ["a cat"], sampling, num_images=3, batch_size=3)
    assert torch.equal(a.codes, b.codes) and a.seeds == [3, 4, 5]
    assert not torch.equal(a.codes[0], a.codes[1])  # each image has its own stream
    other = generate(model, None, Bytes(), ["a cat"], SamplingConfig(cfg=4.0, top_k=20, seed=4))
    assert not torch.equal(other.codes[0], a.codes[0])


def test_cfg_one_equals_plain_conditional_sampling():
    """--cfg 1 samples exactly what a bare conditional loop written here samples."""
    model = plain_model(2)
    cfg = model.config
    got = generate(
        model, None, Bytes(), ["blue"], SamplingConfig(cfg=1.0, seed=9, use_kv_cache=False)
    ).codes
    text = torch.tensor([caption_ids(Bytes(), "blue", 6, cfg)])
    gen = torch.Generator().manual_seed(9)
    windows = torch.zeros(1, 0, 4, dtype=torch.long)
    with torch.no_grad():
        for _ in range(16):
            out = model(input_ids=text, image_windows=windows if windows.shape[1] else None)
            logits = out.image_logits[0, -1, :, cfg.code_offset : cfg.code_offset + 64]
            window = torch.multinomial(logits.softmax(-1), 1, generator=gen).T  # (1, 4)
            windows = torch.cat([windows, window[:, None]], dim=1)
    from megatron_ts.hf.modeling_token_shuffle import windows_to_grid

    assert torch.equal(got, windows_to_grid(windows, 2, 8))
    guided = generate(model, None, Bytes(), ["blue"], SamplingConfig(cfg=8.0, seed=9)).codes
    assert not torch.equal(guided, got)


def test_resolution_must_be_trained():
    with pytest.raises(ValueError, match=r"trained at \[128\]"):
        generate(plain_model(2), None, Bytes(), ["x"], SamplingConfig(resolution=256))


def test_sampling_from_flags_prefers_flags_then_the_export():
    from megatron_ts.sampling.sampler import SamplingConfig, sampling_from_flags

    gen = {"cfg_scale": 2.0, "temperature": 0.0, "top_k": 5, "caption_len": 16}
    s = sampling_from_flags(gen, cfg=None, temperature=0.7, top_k=None, seed=3)
    assert (s.cfg, s.temperature, s.top_k, s.seed) == (2.0, 0.7, 5, 3)
    assert s.cfg_schedule == SamplingConfig().cfg_schedule and s.top_p == 1.0
    assert sampling_from_flags({}, cfg=None).cfg == SamplingConfig().cfg
