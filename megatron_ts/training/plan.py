"""Start-up planning shared by `--dry-run` and the trainer: vocabulary, model spec, FLOPs."""

from __future__ import annotations

from pathlib import Path

from megatron_ts.config import Config, ConfigError, ResolvedStage, TokenizerConfig
from megatron_ts.models.flops import param_counts, sample_flops
from megatron_ts.sequence import SequenceLayout
from megatron_ts.vocab import VocabLayout


def text_size(tok: TokenizerConfig) -> int:
    """Text ids of the configured tokenizer (explicit size, byte = 256, or the JSON file)."""
    if tok.text_size is not None:
        return tok.text_size
    if tok.text == "byte":
        return 256
    # A missing file is a config mistake (exit 2 naming the field), not a traceback.
    if not Path(tok.text).is_file():
        raise ConfigError(
            f"tokenizer.text = {tok.text!r} is neither 'byte' nor an existing tokenizer JSON; "
            "fix the path, or set tokenizer.text_size to plan without the file"
        )
    try:
        from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer
    except ImportError as err:
        raise ConfigError(
            f"tokenizer.text = {tok.text!r} needs megatron_ts.tokenizers ({err}); set "
            "tokenizer.text_size to plan without it"
        ) from None
    return load_text_tokenizer(tok.text).vocab_size


def vocab_from_config(tok: TokenizerConfig) -> VocabLayout:
    """The vocabulary layout the model is built with.

    Tokenizer identities are filled in from the files when they are readable, so they can be
    compared with the token shards' manifests; a dry run without the files still plans sizes.
    """
    text_identity = "byte"
    if tok.text != "byte":
        try:
            from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer

            text_identity = load_text_tokenizer(tok.text).identity
        except (ImportError, OSError):
            text_identity = tok.text
    vq_identity = tok.vq_format
    if tok.vq_checkpoint:
        try:
            from megatron_ts.hf.vq_token_shuffle import vq_identity as _vq_identity

            vq_identity = _vq_identity(tok.vq_format, tok.vq_checkpoint)
        except (ImportError, OSError):
            vq_identity = f"{tok.vq_format}:{tok.vq_checkpoint}"
    return VocabLayout(
        text_size=text_size(tok),
        codebook_size=tok.codebook_size,
        text_tokenizer=text_identity,
        vq_tokenizer=vq_identity,
    )


def dry_run_report(cfg: Config, stages: list[ResolvedStage]) -> dict:
    """Parameter counts and per-stage sequence/FLOPs numbers, without building anything."""
    shape = cfg.model.shape()
    vocab = VocabLayout(
        text_size=text_size(cfg.tokenizer), codebook_size=cfg.tokenizer.codebook_size
    )
    padded = vocab.padded_size(cfg.model.vocab_multiple)
    downsample = cfg.tokenizer.downsample
    max_window = max(st.shuffle_window for st in stages)
    report = {
        "flavor": cfg.model.flavor,
        "shape": {
            "hidden_size": shape.hidden_size,
            "num_layers": shape.num_layers,
            "num_heads": shape.num_heads,
            "num_kv_heads": shape.num_kv_heads,
            "ffn_hidden_size": shape.ffn_hidden_size,
        },
        "vocab": {
            "text": vocab.text_size,
            "specials": len(vocab.specials),
            "codes": vocab.codebook_size,
            "padded": padded,
        },
        "parameters": param_counts(
            shape, padded, max_window, cfg.model.shuffle_mlp_blocks, cfg.model.max_windows_per_side
        ),
        "stages": [],
    }
    for st in stages:
        layout = st.layout(downsample)
        flops = layout_flops(cfg, padded, vocab.codebook_size, layout)
        seq = layout.seq_len
        report["stages"].append(
            {
                "name": st.name,
                "resolution": st.resolution,
                "shuffle_window": st.shuffle_window,
                "image_codes_per_sample": layout.image_codes,
                "image_positions_per_sample": layout.image_positions,
                "sequence_length": seq,
                "parameters": param_counts(
                    shape,
                    padded,
                    st.shuffle_window,
                    cfg.model.shuffle_mlp_blocks,
                    cfg.model.max_windows_per_side,
                )["total"],
                "training_flops_per_sample": flops.training,
                "training_flops_per_step": flops.training * st.global_batch,
                "flops_breakdown_per_sample": flops.to_dict(),
                "global_batch": st.global_batch,
                "steps": st.steps,
                "tokens": seq * st.global_batch * st.steps,
                "tensor": st.tensor,
                "pipeline": st.pipeline,
            }
        )
        if st.buckets:
            report["stages"][-1]["buckets"] = _bucket_rows(cfg, st, padded, vocab)
    return report


def layout_flops(cfg: Config, padded_vocab: int, codebook_size: int, layout: SequenceLayout):
    """The FLOPs of one training sample of `layout` (`models.flops.sample_flops`): image
    positions score the codebook rows only, as the training model's head does."""
    return sample_flops(
        cfg.model.shape(),
        padded_vocab,
        layout.caption_len,
        layout.grid,
        layout.shuffle_window,
        cfg.model.shuffle_mlp_blocks,
        image_head_rows=codebook_size,
    )


def _bucket_rows(cfg: Config, st: ResolvedStage, padded: int, vocab) -> list[dict]:
    """Per aspect-ratio bucket: pixel size, code grid, positions and FLOPs of one sample. The
    stage's own numbers are the square image of its resolution (the pixel budget)."""
    downsample = cfg.tokenizer.downsample
    layouts = st.layouts(downsample)
    rows = []
    for bucket in st.bucket_sizes(downsample):
        layout = layouts[bucket.name]
        flops = layout_flops(cfg, padded, vocab.codebook_size, layout)
        rows.append(
            {
                "name": bucket.name,
                "size": bucket.size,
                "grid": list(layout.grid),
                "image_positions_per_sample": layout.image_positions,
                "sequence_length": layout.seq_len,
                "training_flops_per_sample": flops.training,
            }
        )
    return rows
