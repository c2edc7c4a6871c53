"""SequenceLayout: the positions, prompt format and window order of one sample, with exact values,
and the agreement of the copies an HF export ships (they cannot import megatron_ts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_ts.config import ModelConfig, ResolvedStage
from megatron_ts.data.batching import Collator
from megatron_ts.data.pipeline import Sample
from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig
from megatron_ts.hf.generation_token_shuffle import caption_ids, unconditional_ids
from megatron_ts.hf.generation_token_shuffle import grid_to_windows as export_grid_to_windows
from megatron_ts.hf.tokenization_token_shuffle import ByteTokenizer
from megatron_ts.sequence import SequenceLayout, build_prompts, grid_to_windows, windows_to_grid
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)  # <pad> 256, <bos> 257, <boi> 259


def test_grid_16_window_2_positions():
    layout = SequenceLayout(caption_len=16, grid=16, shuffle_window=2)
    assert layout.grid == (16, 16) and (layout.rows, layout.cols) == (16, 16)
    assert layout.window_grid == (8, 8)
    assert layout.image_codes == 256
    assert layout.codes_per_position == 4
    assert layout.image_positions == 64
    assert layout.text_positions == 18  # <bos> + 16 caption + <boi>
    assert layout.seq_len == 82
    assert layout.text_span == slice(0, 18)
    assert layout.image_span == slice(18, 82)
    positions = list(range(layout.seq_len))
    assert len(positions[layout.text_span]) + len(positions[layout.image_span]) == 82


@pytest.mark.parametrize(
    "resolution,codes,p1,p2,p4,seq2",  # docs/model.md: 16x tokenizer, 126 caption tokens
    [(512, 1024, 1024, 256, 64, 384), (1024, 4096, 4096, 1024, 256, 1152),
     (2048, 16384, 16384, 4096, 1024, 4224)],
)  # fmt: skip
def test_paper_stages(resolution: int, codes: int, p1: int, p2: int, p4: int, seq2: int):
    for s, positions in ((1, p1), (2, p2), (4, p4)):
        layout = SequenceLayout.from_resolution(resolution, 16, caption_len=126, shuffle_window=s)
        assert (layout.grid, layout.image_codes) == ((resolution // 16,) * 2, codes)
        assert layout.image_positions == positions
        assert layout.seq_len == 128 + positions
    layout = SequenceLayout.from_resolution(resolution, 16, caption_len=126, shuffle_window=2)
    assert layout.seq_len == seq2


def test_default_window_is_no_shuffle():
    layout = SequenceLayout(caption_len=0, grid=3)
    assert (layout.image_positions, layout.codes_per_position, layout.seq_len) == (9, 1, 11)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: SequenceLayout.from_resolution(100, 16, caption_len=8), "size 100x100"),
        (lambda: SequenceLayout.from_resolution((64, 40), 16, caption_len=8), "size 40x64"),
        (lambda: SequenceLayout(caption_len=8, grid=(8, 6), shuffle_window=4), "8x6"),
        (lambda: SequenceLayout.from_resolution(64, 0, caption_len=8), "downsample 0"),
        (lambda: SequenceLayout(caption_len=8, grid=6, shuffle_window=4), "shuffle_window = 4"),
        (lambda: SequenceLayout(caption_len=8, grid=8, shuffle_window=0), "shuffle_window = 0"),
        (lambda: SequenceLayout(caption_len=-1, grid=8), "caption_len = -1"),
        (lambda: SequenceLayout(caption_len=8, grid=0), "grid = 0"),
        (lambda: SequenceLayout(caption_len=8, grid=(4, 0)), r"grid = \(4, 0\)"),
    ],
)
def test_bad_geometry_names_the_field(make, field: str):
    with pytest.raises(ValueError, match=field):
        make()


def test_layout_is_a_frozen_value():
    layout = SequenceLayout(4, 8, 2)
    assert layout == SequenceLayout.from_resolution(64, 8, caption_len=4, shuffle_window=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.grid = 16  # type: ignore[misc]


def test_resolved_stage_asks_the_layout():
    st = ResolvedStage(
        index=0, name="x", resolution=64, shuffle_window=2, buckets=(), grid_multiple=4,
        sources=(), global_batch=1,
        micro_batch=1, caption_len=16, steps=1, lr=0.0, min_lr=0.0, warmup_steps=0,
        schedule="constant", z_loss=0.0, carry_over="weights", tensor=1, pipeline=1,
    )  # fmt: skip
    assert st.layout(8) == SequenceLayout(caption_len=16, grid=8, shuffle_window=2)
    assert (st.grid(8), st.seq_len(8)) == (8, 34)  # 16 caption + 2 + (8 / 2)^2
    assert st.layouts(8) == {"1:1": st.layout(8)}


def test_bucketed_stage_has_one_layout_per_bucket():
    st = ResolvedStage(
        index=0, name="x", resolution=64, shuffle_window=2, buckets=("1:1", "2:1", "1:2"),
        grid_multiple=2, sources=(), global_batch=1, micro_batch=1, caption_len=16, steps=1,
        lr=0.0, min_lr=0.0, warmup_steps=0, schedule="constant", z_loss=0.0,
        carry_over="weights", tensor=1, pipeline=1,
    )  # fmt: skip
    layouts = st.layouts(8)  # unit 16 px: 2:1 at a 64^2 budget is 96 x 48 px
    assert list(layouts) == ["1:1", "2:1", "1:2"]
    assert layouts["2:1"].grid == (6, 12) and layouts["1:2"].grid == (12, 6)
    assert layouts["2:1"].window_grid == (3, 6)
    assert layouts["2:1"].image_positions == 18 and layouts["2:1"].seq_len == 36


def test_non_square_layout_and_round_trip():
    layout = SequenceLayout(caption_len=2, grid=(4, 6), shuffle_window=2)
    assert (layout.window_grid, layout.image_positions, layout.image_codes) == ((2, 3), 6, 24)
    grid = torch.arange(24).reshape(1, 4, 6)
    windows = layout.grid_to_windows(grid)  # (1, 6, 4)
    # window 1 is the top row's second window: columns 2..3 of rows 0..1
    assert windows[0, 1].tolist() == [2, 3, 8, 9]
    assert windows[0, 3].tolist() == [12, 13, 18, 19]  # second window row starts at row 2
    assert torch.equal(layout.windows_to_grid(windows), grid)
    with pytest.raises(ValueError, match=r"\(B, 4, 6, ...\)"):
        layout.grid_to_windows(grid.reshape(1, 6, 4))


# ------------------------------------------------------------------------------------------------
# Prompt format
# ------------------------------------------------------------------------------------------------


def test_prompts_exact_ids_and_mask():
    layout = SequenceLayout(caption_len=4, grid=2)
    ids, mask = layout.prompts([[1, 2, 3], [], list(range(10, 20))], VOCAB)
    assert ids.dtype == np.int64 and mask.dtype == np.float32
    assert ids.shape == mask.shape == (3, layout.text_positions)
    assert ids.tolist() == [
        [257, 1, 2, 3, 256, 259],  # short caption: padded
        [257, 256, 256, 256, 256, 259],  # empty caption: the unconditional prompt
        [257, 10, 11, 12, 13, 259],  # long caption: truncated to caption_len
    ]
    assert mask.tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]]


def test_prompts_match_the_collator_with_caption_dropout():
    """The collator's text and mask, dropped captions included, are the layout's prompts, with
    the values the collator produced before the layout existed."""
    captions = [[1, 2, 3], [], list(range(20, 32)), [9], [4, 5]]
    samples = [
        Sample(f"k{i}", "u", np.full((2, 2), i, np.uint16), np.array(c, np.int32), 0, 1)
        for i, c in enumerate(captions)
    ]
    col = Collator(
        layout=SequenceLayout(caption_len=8, grid=2),
        vocab=VOCAB,
        caption_dropout=0.4,
        seed=3,
        stage=0,
    )
    batch = col(samples)
    dropped = batch["dropped"].tolist()
    assert dropped == [True, False, False, False, False]  # seed 3 drops the first caption
    pad = [256] * 8
    expected = [
        [257, *pad, 259],  # dropped: the unconditional prompt
        [257, *pad, 259],  # empty caption
        [257, *range(20, 28), 259],  # truncated to caption_len
        [257, 9, *pad[1:], 259],
        [257, 4, 5, *pad[2:], 259],
    ]
    assert batch["text"].tolist() == expected
    assert batch["text_mask"].sum(dim=1).tolist() == [0, 0, 8, 1, 2]
    layout = SequenceLayout(caption_len=8, grid=2)
    ids, mask = layout.prompts([[] if d else c for c, d in zip(captions, dropped)], VOCAB)
    assert torch.equal(batch["text"], torch.from_numpy(ids))
    assert torch.equal(batch["text_mask"], torch.from_numpy(mask))


def test_build_prompts_is_the_layout_form():
    captions = [[5, 6], [7]]
    got = build_prompts(captions, 3, VOCAB.bos_id, VOCAB.pad_id, VOCAB.boi_id)
    want = SequenceLayout(caption_len=3, grid=1).prompts(captions, VOCAB)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_export_prompt_copy_agrees():
    """The export's `caption_ids` / `unconditional_ids` build the layout's prompts."""
    config = TokenShuffleConfig(text_vocab_size=256, codebook_size=512, caption_len=6)
    tok = ByteTokenizer()
    layout = SequenceLayout(caption_len=6, grid=4)
    prompts = ["hi", "", "a long caption"]
    ids, _ = layout.prompts([tok.encode(p) for p in prompts], VOCAB)
    assert ids.tolist() == [caption_ids(tok, p, 6, config) for p in prompts]
    uncond = unconditional_ids(config, 2, layout.text_positions)
    assert uncond.tolist() == layout.prompts([[], []], VOCAB)[0].tolist()


# ------------------------------------------------------------------------------------------------
# Window order
# ------------------------------------------------------------------------------------------------


def test_window_order_s2_on_4x4():
    layout = SequenceLayout(caption_len=0, grid=4, shuffle_window=2)
    grid = torch.arange(16).reshape(1, 4, 4)  # (B, G, G) codes numbered in raster order
    windows = layout.grid_to_windows(grid)
    assert windows.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    assert torch.equal(layout.windows_to_grid(windows), grid)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_window_round_trip_with_channels(s: int):
    layout = SequenceLayout(caption_len=0, grid=8, shuffle_window=s)
    x = torch.randn(3, 8, 8, 5)  # (B, G, G, d)
    windows = layout.grid_to_windows(x)
    assert windows.shape == (3, layout.image_positions, layout.codes_per_position, 5)
    assert torch.equal(layout.windows_to_grid(windows), x)
    assert torch.equal(windows, grid_to_windows(x, s))
    assert torch.equal(windows_to_grid(windows, s, 8), x)
    assert torch.equal(windows, export_grid_to_windows(x, s))  # the export's copy


def test_window_shapes_are_checked():
    layout = SequenceLayout(caption_len=0, grid=8, shuffle_window=2)
    with pytest.raises(ValueError, match=r"\(B, 8, 8, \.\.\.\) code grid"):
        layout.grid_to_windows(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16, 4, \.\.\.\) windows"):
        layout.windows_to_grid(torch.zeros(1, 16, 1))


def test_token_shuffle_module_reexports_the_order():
    from megatron_ts.models import token_shuffle

    assert token_shuffle.grid_to_windows is grid_to_windows
    assert token_shuffle.windows_to_grid is windows_to_grid


# ------------------------------------------------------------------------------------------------
# The export's config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 4])
def test_export_config_positions_agree(s: int):
    from megatron_ts.hf.build import hf_config_from_spec
    from megatron_ts.models.model import ModelSpec

    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, s)
    config = hf_config_from_spec(spec, 16, [64, 128, 256], 8)
    layouts = [
        SequenceLayout.from_resolution(r, 8, caption_len=16, shuffle_window=s)
        for r in (64, 128, 256)
    ]
    for r, layout in zip((64, 128, 256), layouts):
        assert (config.grid(r),) * 2 == layout.grid
        assert config.image_positions(r) == layout.image_positions
    # the longest trained sequence: 18 text + (256 / 8 / s)^2 image positions
    assert config.max_position_embeddings == max(layout.seq_len for layout in layouts)
    assert config.max_position_embeddings == {1: 1042, 2: 274, 4: 82}[s]


@pytest.mark.parametrize("s", [1, 2, 4])
def test_export_copies_agree_on_non_square_buckets(s: int):
    """The export's window order, grid arithmetic and size refusal are buckets'/the layout's."""
    from megatron_ts.buckets import find, make_buckets
    from megatron_ts.hf.build import hf_config_from_spec
    from megatron_ts.hf.generation_token_shuffle import find_size
    from megatron_ts.hf.generation_token_shuffle import windows_to_grid as export_windows_to_grid
    from megatron_ts.models.model import ModelSpec

    buckets = make_buckets(["1:1", "16:9", "9:16", "2:1"], 256, 8 * 4)
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, s)
    listed = [{**b.to_dict(), "resolution": 256} for b in buckets]
    config = hf_config_from_spec(spec, 16, [256], 8, listed)
    layouts = [
        SequenceLayout.from_resolution((b.height, b.width), 8, caption_len=16, shuffle_window=s)
        for b in buckets
    ]
    for b, layout in zip(buckets, layouts):
        assert config.code_grid((b.width, b.height)) == layout.grid == b.grid(8)
        assert config.window_grid((b.width, b.height)) == layout.window_grid
        assert config.image_positions((b.width, b.height)) == layout.image_positions
        x = torch.arange(2 * layout.image_codes).reshape(2, *layout.grid)
        windows = layout.grid_to_windows(x)
        assert torch.equal(export_grid_to_windows(x, s), windows)
        assert torch.equal(export_windows_to_grid(windows, s, layout.grid), x)
        assert find_size(config.trained_sizes(), b.size) == (b.width, b.height)
        assert find_size(config.trained_sizes(), b.name) == (b.width, b.height)
    assert config.max_position_embeddings == max(layout.seq_len for layout in layouts)
    for bad in ("100x50", "3:1"):
        with pytest.raises(ValueError) as ours:
            find(buckets, bad)
        with pytest.raises(ValueError) as export:
            find_size(config.trained_sizes(), bad)
        assert str(export.value) == str(ours.value)
