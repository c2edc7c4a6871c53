"""Token-shuffle layout, causality, learning and parameter counts of the decoder (one gloo rank)."""

from __future__ import annotations

import pytest
import torch

from megatron_ts.config import ModelConfig
from megatron_ts.models.flavors import FLAVORS
from megatron_ts.models.flops import param_counts
from megatron_ts.models.loss import TokenShuffleLoss
from megatron_ts.models.model import ModelSpec, TokenShuffleLM, image_targets
from megatron_ts.models.token_shuffle import (
    TokenShuffle,
    TokenUnshuffle,
    grid_to_windows,
    windows_to_grid,
)
from megatron_ts.testing import randomize_weights
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)  # 773 ids, padded to 896


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    """megatron-core layers need a (TP = 1) parallel state; a world of one gloo rank."""
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def build(window: int, seed: int = 1234, flavor: str = "debug", **shape) -> TokenShuffleLM:
    spec = ModelSpec.from_config(ModelConfig(flavor=flavor, **shape), VOCAB, window)
    return TokenShuffleLM(spec, seed=seed)


def batch(b: int, caption: int, grid: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(text (B, T), text_mask (B, T), codes (B, G, G)) in the model's sequence format."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB.text_size, (b, caption + 2), generator=gen)
    text[:, 0] = VOCAB.bos_id
    text[:, -1] = VOCAB.boi_id
    mask = torch.ones_like(text, dtype=torch.bool)
    codes = torch.randint(0, VOCAB.codebook_size, (b, grid, grid), generator=gen)
    return text, mask, codes


# ------------------------------------------------------------------------------------------------
# Shuffle layout
# ------------------------------------------------------------------------------------------------


def test_grid_to_windows_s2_known_layout():
    grid = torch.arange(16).reshape(1, 4, 4)
    # 0  1 |  2  3
    # 4  5 |  6  7
    # -----+------
    # 8  9 | 10 11
    # 12 13| 14 15
    expected = torch.tensor([[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]])
    assert torch.equal(grid_to_windows(grid, 2), expected)
    assert torch.equal(windows_to_grid(expected, 2, 4), grid)


def test_grid_to_windows_s4_known_layout():
    grid = torch.arange(64).reshape(1, 8, 8) + 100 * torch.arange(2).reshape(2, 1, 1)
    win = grid_to_windows(grid, 4)
    assert win.shape == (2, 4, 16)
    expected0 = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]  # top-left window
    expected3 = [36, 37, 38, 39, 44, 45, 46, 47, 52, 53, 54, 55, 60, 61, 62, 63]  # bottom-right
    assert win[0, 0].tolist() == expected0
    assert win[0, 1].tolist() == [c + 4 for c in expected0]  # top-right: 4 columns over
    assert win[0, 2].tolist() == [c + 32 for c in expected0]  # bottom-left: 4 rows down
    assert win[0, 3].tolist() == expected3
    assert win[1, 3].tolist() == [c + 100 for c in expected3]  # batch items stay separate
    assert torch.equal(windows_to_grid(win, 4, 8), grid)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_windows_round_trip_with_channels(s: int):
    x = torch.randn(3, 8, 8, 5)  # embeddings: trailing dims travel with their code
    win = grid_to_windows(x, s)
    assert win.shape == (3, 64 // s**2, s * s, 5)
    assert torch.equal(windows_to_grid(win, s, 8), x)
    assert torch.equal(win[1, 0, s * s - 1], x[1, s - 1, s - 1])  # last code of window 0


def test_grid_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible by shuffle window 3"):
        grid_to_windows(torch.zeros(1, 8, 8), 3)


@pytest.mark.parametrize("s", [2, 4])
def test_image_targets_layout(s: int):
    codes = torch.arange(2 * 64).reshape(2, 8, 8)
    tgt = image_targets(codes, s, VOCAB)
    n = 64 // s**2
    assert tgt.shape == (n, 2, s * s)  # (N, B, s^2)
    off = VOCAB.code_offset
    assert off == 261
    # position 0 (<boi>) predicts window 0: the top-left s x s codes of its sample
    assert tgt[0, 0].tolist() == [off + r * 8 + c for r in range(s) for c in range(s)]
    # position 1 predicts window 1 (one window to the right), sample 1 is offset by 64 codes
    assert tgt[1, 1].tolist() == [off + 64 + r * 8 + c + s for r in range(s) for c in range(s)]
    # the last window is the bottom-right corner
    assert int(tgt[-1, 0, -1]) == off + 63


def test_shuffle_concatenates_window_in_raster_order():
    """Channel block k of a shuffled position is the compressed embedding of window code k."""
    model = build(2)
    shuffle: TokenShuffle = model.input_stage.shuffle
    emb = torch.randn(1, 4, 4, 64)
    with torch.no_grad():
        for blk in shuffle.blocks:  # residual blocks are the identity at init (fc2 = 0)
            assert torch.count_nonzero(blk.fc2.weight) == 0
        out = shuffle(emb)  # (B, N, d)
        comp = shuffle.compress(emb)  # (B, G, G, d/4)
    assert out.shape == (1, 4, 64)
    # window 1 = codes (0,2) (0,3) (1,2) (1,3); part k holds code k
    for k, (r, c) in enumerate([(0, 2), (0, 3), (1, 2), (1, 3)]):
        torch.testing.assert_close(out[0, 1, 16 * k : 16 * (k + 1)], comp[0, r, c])


def test_unshuffle_splits_position_into_s2_parts():
    model = build(2)
    unshuffle: TokenUnshuffle = model.output_stage.unshuffle
    h = torch.randn(3, 2, 64)  # (N, B, d)
    with torch.no_grad():
        out = unshuffle(h)
    assert out.shape == (3, 2, 4, 64)  # (N, B, s^2, d)
    with torch.no_grad():
        torch.testing.assert_close(out[2, 1, 3], unshuffle.expand(h[2, 1, 48:64]))


# ------------------------------------------------------------------------------------------------
# Causality
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 4])
def test_causal_over_windows(s: int):
    """Changing windows j+1.. leaves every logit at positions <= j unchanged, and only those.

    Image logit row r sits at position T-1+r (<boi> is row 0) and predicts window r, so
    positions <= window j are text rows and image rows 0..j+1.
    """
    torch.manual_seed(0)
    model = build(s, seed=7)
    randomize_weights(model, 1)
    model.eval()
    grid = 8
    text, _, codes = batch(2, 6, grid, seed=3)
    n = grid * grid // s**2
    with torch.no_grad():
        text_ref, img_ref = model(text, codes)
    assert img_ref.shape == (n, 2, s * s, 896)
    checked = 0
    for j in sorted({0, n // 2 - 1, n - 3}):
        win = grid_to_windows(codes, s).clone()
        win[:, j + 1 :] = (win[:, j + 1 :] + 1 + torch.arange(s * s)) % VOCAB.codebook_size
        changed = windows_to_grid(win, s, grid)
        with torch.no_grad():
            text_out, img_out = model(text, changed)
        assert torch.equal(text_out, text_ref)
        torch.testing.assert_close(img_out[: j + 2], img_ref[: j + 2], rtol=0, atol=1e-6)
        # not vacuous: the next position sees the change
        assert (img_out[j + 2] - img_ref[j + 2]).abs().max() > 1e-3
        checked += 1
    assert checked >= 2


def test_caption_change_reaches_image_logits_but_not_earlier_text():
    model = build(2, seed=7)
    randomize_weights(model, 2)
    text, _, codes = batch(1, 6, 8, seed=4)
    with torch.no_grad():
        t_ref, i_ref = model(text, codes)
        text2 = text.clone()
        text2[0, 4] = (text2[0, 4] + 1) % 256
        t_out, i_out = model(text2, codes)
    torch.testing.assert_close(t_out[:4], t_ref[:4], rtol=0, atol=1e-6)
    assert (t_out[4:] - t_ref[4:]).abs().max() > 1e-3
    assert (i_out - i_ref).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every image row depends on it


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2])
def test_loss_matches_explicit_loops(s: int):
    """TokenShuffleLoss equals cross-entropy written out code by code.

    Image row r must be scored against the codes of window r (raster order, codes in raster
    order inside), over codebook logits only; text row t against token t + 1 where the mask is
    set, over the unpadded vocabulary; z-loss is the mean squared log-partition of both.
    """
    torch.manual_seed(5)
    grid, g = 8, 8 // s
    text, mask, codes = batch(2, 5, grid, seed=9)
    mask[0, 3:6] = False
    text_logits = torch.randn(6, 2, 896)  # (T-1, B, V)
    image_logits = torch.randn(g * g, 2, s * s, 896)  # (N, B, s^2, V)
    loss_fn = TokenShuffleLoss(VOCAB, s, text_weight=0.3, z_coef=0.02)
    total = loss_fn((text_logits, image_logits), (text, mask, codes))

    lo, hi = VOCAB.code_offset, VOCAB.code_offset + VOCAB.codebook_size
    img_ce, img_z = [], []
    for r in range(g * g):
        wr, wc = divmod(r, g)
        for b in range(2):
            for k in range(s * s):
                code = int(codes[b, wr * s + k // s, wc * s + k % s])
                row = image_logits[r, b, k, lo:hi]
                img_ce.append(torch.logsumexp(row, 0) - row[code])
                img_z.append(torch.logsumexp(row, 0) ** 2)
    txt_ce, txt_z = [], []
    for t in range(6):
        for b in range(2):
            if mask[b, t + 1]:
                row = text_logits[t, b, : VOCAB.size]
                txt_ce.append(torch.logsumexp(row, 0) - row[text[b, t + 1]])
                txt_z.append(torch.logsumexp(row, 0) ** 2)
    assert len(txt_ce) == 12 - 3
    z = (sum(img_z) + sum(txt_z)) / (len(img_z) + len(txt_z))
    expected = sum(img_ce) / len(img_ce) + 0.3 * sum(txt_ce) / len(txt_ce) + 0.02 * z
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    (parts,) = loss_fn.pop_history()
    assert parts.image_tokens == 128 and parts.text_tokens == 9
    assert parts.z_loss == pytest.approx(float(z), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 4])
def test_debug_flavor_learns_fixed_batch(s: int):
    torch.manual_seed(0)
    model = build(s, seed=11)
    loss_fn = TokenShuffleLoss(VOCAB, s, text_weight=1.0, z_coef=1e-4)
    text, mask, codes = batch(2, 8, 8, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(model(text, codes), (text, mask, codes))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    parts = loss_fn.pop_history()
    # at init every code is about equally likely: image loss ~ log(512) = 6.24
    assert abs(parts[0].image - 6.238) < 0.1
    assert (parts[0].image_tokens, parts[0].text_tokens) == (2 * 64, 2 * 9)
    # measured: 12.9 -> 7.0 (s = 1), 5.4 (s = 2), 5.7 (s = 4)
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(b < a for a, b in zip(losses[-4:], losses[-3:])), losses
    assert parts[-1].image < parts[0].image - 1.0  # the image codes are learnt, not just the text


# ------------------------------------------------------------------------------------------------
# Non-square images and window positions
# ------------------------------------------------------------------------------------------------


def codes_of(b: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB.codebook_size, (b, rows, cols), generator=gen)


def test_window_positions_name_the_window_each_position_predicts():
    from megatron_ts.models.model import WindowPositions

    table = WindowPositions(4, 3)
    with torch.no_grad():
        for i, p in enumerate((table.row, table.col, table.rows, table.cols)):
            p.copy_(torch.arange(4.0).unsqueeze(1) * 10 ** (3 - i) * torch.ones(3))
    out = table((2, 3))  # 2 window rows of 3: windows (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    # row*1000 + col*100 + (R-1)*10 + (C-1)
    assert out[:, 0].tolist() == [12.0, 112.0, 212.0, 1012.0, 1112.0, 1212.0]
    assert table((2, 3), start=4, count=1)[:, 0].tolist() == [1112.0]  # a decoding step
    with pytest.raises(ValueError, match="max_windows_per_side = 4"):
        table((2, 5))


@pytest.mark.parametrize("s", [1, 2])
def test_zero_window_positions_change_nothing(s: int):
    """A square model gaining the tables (zero at init) computes exactly what it did."""
    plain = build(s, seed=5)
    tabled = build(s, seed=5, max_windows_per_side=8)
    randomize_weights(plain, 2)
    state = plain.state_dict()
    missing, unexpected = tabled.load_state_dict(state, strict=False)
    assert sorted(missing) == [f"input_stage.window_positions.{n}" for n in sorted(
        ("row", "col", "rows", "cols"))] and not unexpected  # fmt: skip
    plain.eval(), tabled.eval()
    text, _, codes = batch(2, 4, 8, seed=1)
    with torch.no_grad():
        for a, b in zip(plain(text, codes), tabled(text, codes)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("s", [1, 2])
def test_non_square_shapes_and_causality(s: int):
    """A 4 x 8 code grid: N = (4/s)(8/s) positions, causal over windows in raster order."""
    model = build(s, seed=7, max_windows_per_side=8)
    randomize_weights(model, 3)
    model.eval()
    text, _, _ = batch(2, 6, 8, seed=3)
    codes = codes_of(2, 4, 8, seed=4)
    n = 32 // s**2
    with torch.no_grad():
        text_ref, img_ref = model(text, codes)
    assert text_ref.shape == (7, 2, 896) and img_ref.shape == (n, 2, s * s, 896)
    for j in (0, n // 2):
        win = grid_to_windows(codes, s).clone()
        win[:, j + 1 :] = (win[:, j + 1 :] + 1) % VOCAB.codebook_size
        with torch.no_grad():
            _, img_out = model(text, windows_to_grid(win, s, (4, 8)))
        torch.testing.assert_close(img_out[: j + 2], img_ref[: j + 2], rtol=0, atol=1e-6)
        assert (img_out[j + 2] - img_ref[j + 2]).abs().max() > 1e-3


def test_shape_is_known_at_the_first_window():
    """<boi> predicts window 0 differently for a 2:1 and a 1:2 image: the shape term."""
    model = build(2, seed=7, max_windows_per_side=8)
    randomize_weights(model, 3)
    model.eval()
    text, _, _ = batch(1, 6, 8, seed=3)
    with torch.no_grad():
        _, wide = model(text, codes_of(1, 4, 8))
        _, tall = model(text, codes_of(1, 8, 4))
    assert (wide[0] - tall[0]).abs().max() > 1e-3
    plain = build(2, seed=7)  # without the tables the first window cannot tell
    randomize_weights(plain, 3)
    plain.eval()
    with torch.no_grad():
        _, wide = plain(text, codes_of(1, 4, 8))
        _, tall = plain(text, codes_of(1, 8, 4))
    assert torch.equal(wide[0], tall[0])


def test_non_square_learns_and_trains_the_tables():
    model = build(2, seed=11, max_windows_per_side=4)
    loss_fn = TokenShuffleLoss(VOCAB, 2, text_weight=1.0, z_coef=1e-4)
    text, mask, _ = batch(2, 8, 8, seed=5)
    codes = codes_of(2, 4, 8, seed=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model(text, codes), (text, mask, codes))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert loss_fn.pop_history()[0].image_tokens == 2 * 32
    assert losses[-1] < 0.7 * losses[0], losses
    table = model.input_stage.window_positions
    # a 2 x 4 window grid: rows[1] and cols[3] learn; other shapes were never seen
    assert table.rows[1].abs().sum() > 0 and table.cols[3].abs().sum() > 0
    assert table.rows[0].abs().sum() == 0 and table.cols[1].abs().sum() == 0
    assert table.row[:2].abs().sum(1).min() > 0 and table.row[2:].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------


def components(model: TokenShuffleLM) -> dict[str, int]:
    """Built parameter counts under the component names of flops.param_counts."""
    out = dict.fromkeys(("embeddings", "shuffle", "transformer", "unshuffle", "head"), 0)
    prefix = {
        "input_stage.embedding.": "embeddings",
        "input_stage.shuffle.": "shuffle",
        "input_stage.window_positions.": "window_positions",
        "blocks.": "transformer",
        "output_stage.final_norm.": "transformer",
        "output_stage.unshuffle.": "unshuffle",
        "output_stage.head.": "head",
    }
    for name, p in model.named_parameters():
        (key,) = [v for k, v in prefix.items() if name.startswith(k)]
        out[key] = out.get(key, 0) + p.numel()
    out["total"] = sum(out.values())
    return out


@pytest.mark.parametrize(
    "flavor,s,total",
    [
        # 896 padded rows x 64 (embedding and untied head) = 57,344 each; 2 blocks of 50,304 + 64
        ("debug", 1, 215_360),
        ("debug", 2, 250_176),  # + 2 x (64 x 16 + 2 x 2 x 64 x 64) shuffle / unshuffle
        ("debug", 4, 248_640),  # + 2 x (64 x 4 + 2 x 2 x 64 x 64)
        # demo: 896 x 192 x 2 + 4 x 442,752 + 192 + 2 x (192 x 48 + 4 x 192^2)
        ("demo", 2, 2_428_608),
    ],
)
def test_built_parameters_match_param_counts(flavor: str, s: int, total: int):
    model = build(s, flavor=flavor)
    spec = model.spec
    assert spec.padded_vocab == 896
    expected = param_counts(spec.shape, spec.padded_vocab, s, spec.shuffle_mlp_blocks)
    assert components(model) == expected
    assert expected["total"] == total


def test_window_position_tables_are_counted():
    model = build(2, max_windows_per_side=8)
    spec = model.spec
    expected = param_counts(spec.shape, spec.padded_vocab, 2, spec.shuffle_mlp_blocks, 8)
    assert components(model) == expected
    assert expected["window_positions"] == 4 * 8 * 64
    assert expected["total"] == 250_176 + 2048


def test_large_flavor_param_counts():
    """2.7B and 7B with the recipe vocabulary, from the formula (too large to build in CI).

    Vocabulary: Llama-2's 32,000 text ids + 5 specials + 16,384 LlamaGen VQ-16 codes = 48,389 ids,
    padded to a multiple of 128 = 48,512 rows, in the embedding and again in the untied head.

    2.7B (d 3072, 20 layers, 24 heads, SwiGLU 8192): a block has 4 d^2 (QKV + proj) +
    3 d x 8192 (SwiGLU) + 2 d (norms) = 113,252,352; 20 blocks + final norm = 2,265,050,112.
    Embedding and head 48,512 x 3072 = 149,028,864 each. s = 2 adds per side d x d/4 + 2 blocks x
    2 d^2 = 40,108,032. Total 2,643,323,904 with s = 2 (the paper's "2.7B"), 2,563,107,840 without.

    7B (Llama-2 shape, d 4096, 32 layers, SwiGLU 11008): 202,383,360 per block; transformer
    6,476,271,616; embedding = head = 198,705,152; s = 2 adds 71,303,168 per side.
    """
    vocab = VocabLayout(text_size=32000, codebook_size=16384)
    padded = vocab.padded_size(128)
    assert (vocab.size, padded) == (48_389, 48_512)
    p27 = param_counts(FLAVORS["2.7B"], padded, 2, 2)
    assert p27 == {
        "embeddings": 149_028_864,
        "shuffle": 40_108_032,
        "transformer": 2_265_050_112,
        "unshuffle": 40_108_032,
        "head": 149_028_864,
        "total": 2_643_323_904,
    }
    assert param_counts(FLAVORS["2.7B"], padded, 1, 2)["total"] == 2_563_107_840
    p7 = param_counts(FLAVORS["7B"], padded, 2, 2)
    assert p7 == {
        "embeddings": 198_705_152,
        "shuffle": 71_303_168,
        "transformer": 6_476_271_616,
        "unshuffle": 71_303_168,
        "head": 198_705_152,
        "total": 7_016_288_256,
    }
    assert param_counts(FLAVORS["7B"], padded, 1, 2)["total"] == 6_873_681_920


def test_small_flavor_counts_with_default_codebook():
    """The counts beside debug/demo in flavors.py: byte text + 16384 codes = 16,768 rows, s = 2."""
    padded = VocabLayout(text_size=256, codebook_size=16384).padded_size(128)
    assert padded == 16_768
    assert param_counts(FLAVORS["debug"], padded, 2, 2)["total"] == 2_281_792
    assert param_counts(FLAVORS["demo"], padded, 2, 2)["total"] == 8_523_456
