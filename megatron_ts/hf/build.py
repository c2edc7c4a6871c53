"""From a training ModelSpec (+ weights) to the Hugging Face model, in process."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig
from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM
from megatron_ts.hf.weights import AttentionShape, hf_state_dict
from megatron_ts.models.model import ModelSpec
from megatron_ts.sequence import SequenceLayout


def attention_shape(spec: ModelSpec) -> AttentionShape:
    s = spec.shape
    return AttentionShape(num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim)


def hf_config_from_spec(
    spec: ModelSpec,
    caption_len: int = 64,
    resolutions: Sequence[int] = (256,),
    vq_downsample: int = 16,
    buckets: Sequence[dict] = (),
) -> TokenShuffleConfig:
    """The HF config of a training model.

    Args:
        spec: the training model spec.
        caption_len: caption tokens per prompt the model was trained with.
        resolutions: image sides in pixels it was trained at (first = default); with buckets,
            the stages' pixel budgets.
        vq_downsample: pixels per code along each side.
        buckets: aspect-ratio buckets it was trained on, each {"name", "width", "height",
            "resolution"} (`Bucket.to_dict()` plus the stage's resolution); empty: squares of
            `resolutions` only.
    """
    shape, vocab = spec.shape, spec.vocab
    sizes = [(b["height"], b["width"]) for b in buckets] or list(resolutions)
    spec_dict = spec.to_dict()
    spec_dict["tensor_parallel"] = 1  # an export is one full model
    return TokenShuffleConfig(
        vocab_size=spec.padded_vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        shuffle_window=spec.shuffle_window,
        shuffle_mlp_blocks=spec.shuffle_mlp_blocks,
        text_vocab_size=vocab.text_size,
        codebook_size=vocab.codebook_size,
        special_tokens=list(vocab.specials),
        caption_len=caption_len,
        resolutions=list(resolutions),
        buckets=[dict(b) for b in buckets],
        max_windows_per_side=spec.max_windows_per_side,
        vq_downsample=vq_downsample,
        text_tokenizer=vocab.text_tokenizer,
        vq_tokenizer=vocab.vq_tokenizer,
        initializer_range=spec.init_std,
        model_spec=spec_dict,
        max_position_embeddings=max(
            SequenceLayout.from_resolution(
                r, vq_downsample, caption_len=caption_len, shuffle_window=spec.shuffle_window
            ).seq_len
            for r in sizes
        ),
    )


def build_plain_model(
    spec: ModelSpec,
    state_dict: dict[str, torch.Tensor],
    caption_len: int = 64,
    resolutions: Sequence[int] = (256,),
    vq_downsample: int = 16,
    buckets: Sequence[dict] = (),
) -> TokenShuffleForCausalLM:
    """A single-device HF model holding a full TokenShuffleLM-style state dict.

    The trainer calls this for preview images (`load_full_state_dict` or its own gathered
    weights give the state dict); the sampler decodes with the result.

    Args:
        spec: the training model spec.
        state_dict: full (TP-merged) parameters named as in TokenShuffleLM; megatron's
            `_extra_state` entries are ignored.
        caption_len: caption tokens per prompt.
        resolutions: trained image sides in pixels.
        vq_downsample: pixels per code.
        buckets: trained aspect-ratio buckets (see `hf_config_from_spec`); empty: squares only.

    Returns:
        The model in eval mode, fp32, on CPU.
    """
    config = hf_config_from_spec(spec, caption_len, resolutions, vq_downsample, buckets)
    model = TokenShuffleForCausalLM(config)
    tensors = {
        k: v
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }
    hf = hf_state_dict(tensors, attention_shape(spec))
    missing, unexpected = model.load_state_dict(hf, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()
