"""Sampler: guidance schedules, filtering, KV cache vs recomputation, seeds, --cfg 1, and the
entry points over it (`model.generate`, `TokenShufflePipeline`) with their argument checks."""

from __future__ import annotations

import pytest
import torch

from megatron_ts.config import ModelConfig
from megatron_ts.hf.build import build_plain_model
from megatron_ts.hf.generation_token_shuffle import (
    SamplingConfig,
    caption_ids,
    filter_logits,
    sample_step,
    scheduled_guidance,
)
from megatron_ts.hf.pipeline_token_shuffle import TokenShufflePipeline
from megatron_ts.hf.tokenization_token_shuffle import ByteTokenizer as Bytes
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
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


def codes(model, prompts, num_images=1, batch_size=None, **sampling):
    """Code grids through the pipeline (no VQ): what ts-generate samples."""
    pipe = TokenShufflePipeline(model, Bytes())
    return pipe(
        prompts,
        num_images,
        batch_size=batch_size,
        output_type="codes",
        progress=False,
        **sampling,
    )


def test_schedules():
    assert scheduled_guidance("constant", 5.0, 0, 10) == 5.0
    assert [
        scheduled_guidance("half-linear", 5.0, k, 10) for k in (0, 1, 4, 5, 9)
    ] == pytest.approx([1.0, 1.8, 4.2, 5.0, 5.0])
    assert [scheduled_guidance("linear", 5.0, k, 10) for k in (0, 5, 9)] == pytest.approx(
        [1.0, 3.0, 4.6]
    )
    with pytest.raises(ValueError, match="choose one of"):
        scheduled_guidance("cosine", 5.0, 0, 10)


def test_filters_and_guidance():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    top2 = filter_logits(logits, 2, 1.0)
    assert torch.isinf(top2[..., :2]).all() and torch.equal(top2[..., 2:], logits[..., 2:])
    # softmax of [0,1,2,3] = .032 .087 .237 .644: top-p 0.7 keeps the two largest
    nucleus = filter_logits(logits, 0, 0.7)
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
        runs[cache] = codes(model, prompts, guidance_scale=3.0, temperature=0.0, use_cache=cache)
    assert runs[True].codes.shape == (2, 8, 8)
    assert runs[True].steps == 64 // window**2  # s = 2: 4x fewer steps for the same image
    assert torch.equal(runs[True].codes, runs[False].codes)
    assert runs[True].codes.min() >= 0 and runs[True].codes.max() < 64


def test_seeds_are_reproducible_per_image():
    model = plain_model(2)
    sampling = dict(guidance_scale=4.0, top_k=20, top_p=0.95, seed=3)
    a = codes(model, ["a cat"], 3, **sampling)
    b = codes(model, ["a cat"], 3, **sampling)
    assert torch.equal(a.codes, b.codes) and a.seeds == [3, 4, 5]
    assert not torch.equal(a.codes[0], a.codes[1])  # each image has its own stream
    one_by_one = codes(model, ["a cat"], 3, batch_size=1, **sampling)
    assert torch.equal(one_by_one.codes, a.codes)  # an image does not depend on its batch
    other = codes(model, ["a cat"], guidance_scale=4.0, top_k=20, seed=4)
    assert not torch.equal(other.codes[0], a.codes[0])


def test_cfg_one_equals_plain_conditional_sampling():
    """--cfg 1 samples exactly what a bare conditional loop written here samples."""
    model = plain_model(2)
    cfg = model.config
    got = codes(model, ["blue"], guidance_scale=1.0, seed=9, use_cache=False).codes
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
    guided = codes(model, ["blue"], guidance_scale=8.0, seed=9).codes
    assert not torch.equal(guided, got)


def test_resolution_must_be_trained():
    with pytest.raises(ValueError, match=r"trained at \[128\]"):
        codes(plain_model(2), ["x"], resolution=256)


def test_sizes_must_be_trained_and_the_refusal_lists_them():
    from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig
    from megatron_ts.hf.generation_token_shuffle import resolve_size

    square = TokenShuffleConfig(resolutions=[128, 64], vq_downsample=16, shuffle_window=2)
    assert resolve_size(square) == (128, 128) and resolve_size(square, "64x64") == (64, 64)
    with pytest.raises(ValueError) as err:
        resolve_size(square, "96x48")
    assert str(err.value) == (
        "size '96x48' is not one this model trained on; use one of: 128x128 (1:1), 64x64 (1:1)"
    )
    buckets = [
        {"name": "2:1", "width": 192, "height": 96, "resolution": 128},
        {"name": "1:1", "width": 128, "height": 128, "resolution": 128},
    ]
    bucketed = TokenShuffleConfig(
        resolutions=[128], buckets=buckets, vq_downsample=16, shuffle_window=2
    )
    assert resolve_size(bucketed) == (128, 128)  # the first square bucket
    assert resolve_size(bucketed, "192x96") == resolve_size(bucketed, "2:1") == (192, 96)
    assert resolve_size(bucketed, resolution=128) == (128, 128)
    with pytest.raises(ValueError, match=r"use one of: 192x96 \(2:1\), 128x128 \(1:1\)$"):
        resolve_size(bucketed, "96x192")
    with pytest.raises(ValueError, match="'128x128' is not one"):
        resolve_size(TokenShuffleConfig(resolutions=[128], buckets=buckets[:1]), resolution=128)
    with pytest.raises(ValueError, match="pass one of them"):
        resolve_size(bucketed, "192x96", 128)
    # a size or resolution in the call replaces either from generation_config.json
    file = {"size": "192x96", "resolution": None}
    assert SamplingConfig.from_generation_config(file, resolution=128).size is None
    assert SamplingConfig.from_generation_config({"resolution": 64}, size="2:1").resolution is None
    assert SamplingConfig.from_generation_config(file).size == "192x96"


def test_settings_prefer_arguments_then_the_export():
    gen = {"cfg_scale": 2.0, "temperature": 0.0, "top_k": 5, "caption_len": 16}
    s = SamplingConfig.from_generation_config(gen, guidance_scale=None, temperature=0.7, seed=3)
    assert (s.cfg_scale, s.temperature, s.top_k, s.seed) == (2.0, 0.7, 5, 3)
    assert s.cfg_schedule == SamplingConfig().cfg_schedule and s.top_p == 1.0
    assert SamplingConfig.from_generation_config({}).cfg_scale == SamplingConfig().cfg_scale
    assert SamplingConfig.from_generation_config({"do_sample": False}).temperature == 0.0
    assert SamplingConfig.from_generation_config(gen, do_sample=False).temperature == 0.0


def test_generate_equals_the_pipeline_and_checks_its_input():
    """`model.generate` (transformers' entry point) samples what the pipeline samples."""
    model = plain_model(2)
    pipe = TokenShufflePipeline(model, Bytes())
    prompts = ["a red square", "blue"]
    ids = pipe.prompt_ids(prompts)
    grids = model.generate(ids, guidance_scale=4.0, top_k=20, seed=7)
    assert grids.shape == (2, 8, 8) and grids.dtype == torch.long
    via_pipe = codes(model, prompts, guidance_scale=4.0, top_k=20, seed=7).codes
    assert torch.equal(grids, via_pipe)
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    assert torch.equal(model.generate(ids, guidance_scale=4.0, top_k=20, generator=gens), grids)
    negative = pipe.prompt_ids(["a red square", "a red square"])
    assert not torch.equal(
        model.generate(ids, guidance_scale=4.0, top_k=20, seed=7, negative_input_ids=negative),
        grids,
    )
    for bad, match in (
        (dict(input_ids=ids[:, 1:]), "start with <bos>"),
        (dict(input_ids=ids[:, :-1]), "end with <boi>"),
        (dict(input_ids=ids, guidance_scale=0.5), "guidance_scale 0.5"),
        (dict(input_ids=ids, resolution=256), r"trained at \[128\]"),
        (dict(input_ids=ids, top_p=0.0), "top_p"),
        (dict(input_ids=ids, cfg_schedule="cosine"), "cfg_schedule"),
        (dict(input_ids=ids, seed=[1]), "2 images"),
    ):
        with pytest.raises(ValueError, match=match):
            model.generate(**bad)
    with pytest.raises(TypeError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=5)


def test_pipeline_rejects_bad_arguments_by_name():
    pipe = TokenShufflePipeline(plain_model(2), Bytes())
    for kwargs, match in (
        (dict(prompt=[]), "prompt: the list of prompts is empty"),
        (dict(prompt="x", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt="x", guidance_scale=0.9, output_type="codes"), "guidance_scale 0.9"),
        (dict(prompt="x", resolution=64, output_type="codes"), "resolution 64"),
        (dict(prompt="x", output_type="latent"), "output_type"),
        (dict(prompt="x"), "no VQ decoder"),
    ):
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)


# -- host syncs (issue 22) --------------------------------------------------------------------


def _multinomial_step(logits, scale, sampling, generators):
    """The sampler step before issue 22: probabilities copied to the host at every decoding step
    and sampled there with torch.multinomial (the reference the device path must reproduce)."""
    logits = logits.float()
    if scale is not None:
        cond, uncond = logits.chunk(2, dim=0)
        logits = uncond + scale * (cond - uncond)
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(-1).cpu()
    picks = [torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)]
    return torch.stack(picks).to(logits.device)


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize(
    "sampling",
    [
        dict(guidance_scale=7.5, top_k=20, top_p=0.9, seed=3),
        dict(guidance_scale=2.0, cfg_schedule="constant", temperature=1.3, seed=0),
        dict(guidance_scale=1.0, temperature=0.7, seed=11),  # no unconditional stream
    ],
    ids=["cfg-topk-topp", "cfg-constant", "no-cfg"],
)
def test_device_sampling_equals_host_multinomial(window, sampling, monkeypatch):
    """Batched prompts sample the very codes torch.multinomial samples on the host, and leave
    every image's generator in the same state."""
    import megatron_ts.hf.generation_token_shuffle as generation

    model = plain_model(window)
    ids = TokenShufflePipeline(model, Bytes()).prompt_ids(["a red square", "two circles", "a"])
    sampling = dict(sampling)  # the parametrized dict is shared by both windows
    seed = sampling.pop("seed")
    gens = {}
    runs = {}
    for name, step in (("device", generation.sample_step), ("host", _multinomial_step)):
        monkeypatch.setattr(generation, "sample_step", step)
        gens[name] = [torch.Generator().manual_seed(seed + i) for i in range(3)]
        runs[name] = model.generate(ids, generator=gens[name], **sampling)
    assert torch.equal(runs["device"], runs["host"])
    assert len({tuple(c.flatten().tolist()) for c in runs["device"]}) == 3  # not a degenerate case
    for a, b in zip(gens["device"], gens["host"]):
        assert torch.equal(a.get_state(), b.get_state())


def test_sampling_makes_no_host_sync_per_decoding_step():
    """One sampling call syncs a constant number of times: s = 1 decodes 64 steps, s = 2 16."""
    from megatron_ts.hf.generation_token_shuffle import sample_codes
    from megatron_ts.testing import SyncCounter

    counts = {}
    for window in (1, 2):
        model = plain_model(window)
        cfg = model.config
        ids = torch.tensor([caption_ids(Bytes(), p, 6, cfg) for p in ("a cat", "blue")])
        uncond = torch.tensor([caption_ids(Bytes(), "", 6, cfg)] * 2)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        sampling = SamplingConfig(cfg_scale=7.5, top_k=20, top_p=0.9)
        with SyncCounter() as decode:
            sample_codes(model, ids, 8, sampling, gens, uncond)
        with SyncCounter() as pipeline:  # + argument checks, batching, the returned codes
            codes(model, ["a cat", "blue"], guidance_scale=7.5, top_k=20)
        counts[window] = (decode.count, pipeline.count)
        assert decode.count == 0, decode.sites
    assert counts[1] == counts[2], counts
