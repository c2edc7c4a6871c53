"""The FLOPs formula against a direct count, and positions per sample for the paper's stages."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_ts.config import ModelConfig, ResolvedStage
from megatron_ts.models.flavors import FLAVORS
from megatron_ts.models.flops import sample_flops
from megatron_ts.models.model import ModelSpec, TokenShuffleLM
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def counted_matmul_flops(
    spec: ModelSpec, b: int, caption: int, grid: int, backward: bool, train: bool = True
) -> float:
    """FLOPs of one sample as torch's FlopCounterMode counts them (matmuls only on CPU)."""
    model = TokenShuffleLM(spec, seed=3).train(train)
    text = torch.randint(0, VOCAB.text_size, (b, caption + 2))
    codes = torch.randint(0, VOCAB.codebook_size, (b, grid, grid))
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            text_logits, image_logits = model(text, codes)
            if backward:
                (text_logits.sum() + image_logits.sum()).backward()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert ops == {"aten.mm"}, ops  # SDPA on CPU is not counted: attention_core is separate
    return counter.get_total_flops() / b


@pytest.mark.parametrize(
    "s,kv_heads,layers",
    [(1, 4, 2), (2, 4, 2), (4, 4, 2), (2, 2, 3)],  # incl. grouped-query attention, 3 layers
)
def test_forward_flops_equal_counted_matmuls(s: int, kv_heads: int, layers: int):
    spec = ModelSpec.from_config(
        ModelConfig(flavor="debug", num_kv_heads=kv_heads, num_layers=layers), VOCAB, s
    )
    caption, grid = 8, 8
    # in training the head scores image positions against the codebook rows only
    flops = sample_flops(
        spec.shape, spec.padded_vocab, caption, grid, s, spec.shuffle_mlp_blocks,
        image_head_rows=VOCAB.codebook_size,
    )  # fmt: skip
    counted = counted_matmul_flops(spec, 3, caption, grid, backward=False)
    assert counted == flops.forward - flops.attention_core  # exact: integer-valued floats
    # in eval mode (the HF model's logits) over the whole padded vocabulary
    full = sample_flops(spec.shape, spec.padded_vocab, caption, grid, s, spec.shuffle_mlp_blocks)
    counted = counted_matmul_flops(spec, 3, caption, grid, backward=False, train=False)
    assert counted == full.forward - full.attention_core
    if s == 1:
        assert flops.shuffle == flops.unshuffle == 0
    else:
        assert flops.shuffle > 0 and flops.unshuffle > 0


@pytest.mark.parametrize("s", [1, 2])
def test_training_flops_are_three_forwards(s: int):
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, s)
    flops = sample_flops(
        spec.shape, spec.padded_vocab, 8, 8, s, spec.shuffle_mlp_blocks, VOCAB.codebook_size
    )
    counted = counted_matmul_flops(spec, 2, 8, 8, backward=True)
    assert counted == flops.training - 3 * flops.attention_core


@pytest.mark.parametrize("s", [1, 2, 4])
def test_attention_core_is_causal_count(s: int):
    """Explicit count: query i sees i + 1 keys; QK^T and AV each 2 FLOPs per key and channel."""
    shape = FLAVORS["debug"]
    caption, grid = 6, 8
    seq = caption + 2 + grid * grid // s**2
    visible = int(torch.tril(torch.ones(seq, seq)).sum())  # (query, key) pairs a mask keeps
    per_head = 2 * 2 * shape.head_dim * visible
    expected = shape.num_layers * shape.num_heads * per_head
    flops = sample_flops(shape, 896, caption, grid, s, 2)
    assert flops.attention_core == expected
    # a full (non-causal) count would be almost twice as much
    assert flops.attention_core < 0.6 * shape.num_layers * 4 * shape.hidden_size * seq * seq


def test_shuffle_cuts_transformer_flops_for_the_paper_model():
    """2.7B at 1024 px (64 x 64 codes, 128 caption tokens): s = 2 leaves ~1/4 of the positions."""
    shape = FLAVORS["2.7B"]
    padded = VocabLayout(text_size=32000, codebook_size=16384).padded_size(128)
    f1 = sample_flops(shape, padded, 128, 64, 1, 2)
    f2 = sample_flops(shape, padded, 128, 64, 2, 2)
    t1, t2 = 130 + 4096, 130 + 1024  # sequence lengths
    assert f1.mlp / f2.mlp == pytest.approx(t1 / t2)
    assert f1.attention_core / f2.attention_core == pytest.approx(t1 * (t1 + 1) / (t2 * (t2 + 1)))
    assert f1.head == f2.head  # every code is still predicted over the vocabulary
    assert 2.5 < f1.training / f2.training < 3.5


@pytest.mark.parametrize("grid", [64, 128])
def test_code_only_image_head_saves_an_eighth_of_the_paper_model(grid: int):
    """2.7B at 1024 / 2048 px with s = 2: the full-vocabulary head was 18% of the FLOPs.

    Scoring image positions against the 16384 codebook rows instead of 48512 vocabulary rows
    leaves 7% and saves 12% of the training FLOPs (issue 22).
    """
    shape = FLAVORS["2.7B"]
    vocab = VocabLayout(text_size=32000, codebook_size=16384)
    padded = vocab.padded_size(128)
    full = sample_flops(shape, padded, 126, grid, 2, 2)
    codes = sample_flops(shape, padded, 126, grid, 2, 2, image_head_rows=vocab.codebook_size)
    assert 0.18 < full.head / full.forward < 0.19
    assert 0.07 < codes.head / codes.forward < 0.075
    assert 0.115 < 1 - codes.training / full.training < 0.125
    text = 2.0 * shape.hidden_size * padded * 127  # <bos> + 126 caption positions predict text
    assert codes.head - text == pytest.approx((full.head - text) * 16384 / padded)


PAPER = [  # resolution, codes (16x VQ), positions with s = 1, 2, 4
    (512, 1024, 1024, 256, 64),
    (1024, 4096, 4096, 1024, 256),
    (2048, 16384, 16384, 4096, 1024),
]


@pytest.mark.parametrize("resolution,codes,p1,p2,p4", PAPER)
def test_resolved_stage_positions(resolution: int, codes: int, p1: int, p2: int, p4: int):
    for s, positions in ((1, p1), (2, p2), (4, p4)):
        st = ResolvedStage(
            index=0, name="x", resolution=resolution, shuffle_window=s, sources=(),
            global_batch=1, micro_batch=1, caption_len=126, steps=1, lr=0.0, min_lr=0.0,
            warmup_steps=0, schedule="constant", z_loss=0.0, carry_over="weights", tensor=1,
            pipeline=1,
        )  # fmt: skip
        assert st.layout(16).image_codes == codes
        assert st.layout(16).image_positions == positions
        assert st.seq_len(16) == 128 + positions  # <bos> + 126 caption + <boi>
