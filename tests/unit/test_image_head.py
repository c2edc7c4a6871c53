"""The code-only image head: image positions scored against codebook rows only (one gloo rank).

In training `OutputLayer` returns image logits over the codebook columns only and
`TokenShuffleLoss` scores them without a mask; the loss and the gradients of the head weight and
of the stage's hidden input must equal the full-vocabulary head with the masked loss (what both
did before) to 1e-6 relative. tests/distributed/test_tp_parity.py checks the same at TP = 2.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ts.config import ModelConfig
from megatron_ts.models.loss import TokenShuffleLoss
from megatron_ts.models.model import (
    ModelSpec,
    OutputLayer,
    image_targets,
    transformer_config,
    vocab_columns,
)
from megatron_ts.testing import randomize_weights
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)  # codes are ids 261..772 of 896 rows
TEXT_WEIGHT, Z_COEF = 0.5, 1e-2
REL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


def reference_loss(
    outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple, vocab: VocabLayout, window: int
) -> torch.Tensor:
    """The loss as it was, written plainly over full-vocabulary logits (TP = 1).

    Logits outside the competing ids are masked to -inf: codes only at image positions, the
    unpadded vocabulary at text positions; z-loss is the mean log Z^2 over both.
    """
    text_logits, image_logits = outputs  # (T-1, B, V), (N, B, s^2, V)
    text, text_mask, codes = labels
    ids = torch.arange(image_logits.shape[-1])
    lo, hi = vocab.code_offset, vocab.code_offset + vocab.codebook_size
    img = image_logits.float().masked_fill((ids < lo) | (ids >= hi), float("-inf"))
    img_lz = torch.logsumexp(img, dim=-1)  # (N, B, s^2)
    img_tgt = image_targets(codes, window, vocab)
    img_ce = img_lz - img.gather(-1, img_tgt.unsqueeze(-1)).squeeze(-1)

    txt = text_logits.float().masked_fill(ids >= vocab.size, float("-inf"))
    txt_lz = torch.logsumexp(txt, dim=-1)  # (T-1, B)
    txt_tgt = text[:, 1:].transpose(0, 1)
    mask = text_mask[:, 1:].transpose(0, 1).float()
    txt_ce = txt_lz - txt.gather(-1, txt_tgt.unsqueeze(-1)).squeeze(-1)
    text_loss = (txt_ce * mask).sum() / mask.sum()
    z_loss = ((img_lz**2).sum() + (txt_lz**2 * mask).sum()) / (img_lz.numel() + mask.sum())
    return img_ce.mean() + TEXT_WEIGHT * text_loss + Z_COEF * z_loss


def stage_inputs(spec: ModelSpec, b: int, caption: int, grid: int, seed: int) -> tuple:
    """((hidden (S, B, d), text_len), labels) for an OutputLayer; S = T + N."""
    gen = torch.Generator().manual_seed(seed)
    t = caption + 2
    n = (grid // spec.shuffle_window) ** 2
    hidden = torch.randn(t + n, b, spec.shape.hidden_size, generator=gen)
    text = torch.randint(0, spec.vocab.size, (b, t), generator=gen)
    text[:, 0], text[:, -1] = spec.vocab.bos_id, spec.vocab.boi_id
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[-1, 2:4] = False  # caption padding
    codes = torch.randint(0, spec.vocab.codebook_size, (b, grid, grid), generator=gen)
    return (hidden, torch.tensor([t])), (text, mask, codes)


def run(stage: OutputLayer, inputs: tuple, labels: tuple, reference: bool) -> tuple:
    """Loss, (head weight grad, hidden grad), outputs: new path (train) or the reference (eval)."""
    stage.zero_grad()
    hidden = inputs[0].clone().requires_grad_()
    stage.train(not reference)
    outputs = stage((hidden, inputs[1]))
    s, vocab = stage.spec.shuffle_window, stage.spec.vocab
    if reference:
        loss = reference_loss(outputs, labels, vocab, s)
    else:
        loss = TokenShuffleLoss(vocab, s, TEXT_WEIGHT, Z_COEF)(outputs, labels)
    loss.backward()
    return loss.detach(), (stage.head.weight.grad.clone(), hidden.grad), outputs


def assert_rel(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """max |got - want| <= REL * max |want| (elementwise relative error is meaningless near 0)."""
    scale = want.abs().max()
    assert scale > 0, f"{what}: all zero, the check is vacuous"
    err = (got - want).abs().max() / scale
    assert err <= REL, f"{what}: relative error {float(err):.2e} > {REL}"


@pytest.mark.parametrize("s", [1, 2])
def test_code_only_head_equals_full_vocabulary_head(s: int):
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, s)
    stage = OutputLayer(spec, transformer_config(spec), seed=3)
    randomize_weights(stage, seed=4)
    inputs, labels = stage_inputs(spec, b=2, caption=6, grid=8, seed=5)
    loss, grads, (text_logits, image_logits) = run(stage, inputs, labels, reference=False)
    ref_loss, ref_grads, (_, ref_image) = run(stage, inputs, labels, reference=True)

    n = 64 // s**2
    assert text_logits.shape == (7, 2, 896)  # text keeps the whole (padded) vocabulary
    assert image_logits.shape == (n, 2, s * s, 512)  # image positions: the codebook only
    assert ref_image.shape == (n, 2, s * s, 896)  # eval mode returns the whole vocabulary
    lo = VOCAB.code_offset
    torch.testing.assert_close(image_logits, ref_image[..., lo : lo + 512], rtol=0, atol=1e-6)
    assert_rel(loss, ref_loss, "loss")
    assert_rel(grads[0], ref_grads[0], "head weight grad")
    assert_rel(grads[1], ref_grads[1], "hidden grad")
    # rows outside the codebook get gradient from the text positions only
    assert grads[0][VOCAB.size :].abs().max() == 0


def test_loss_takes_full_shard_or_code_columns():
    """Eval-mode (whole shard) and training (codebook columns) image logits give one loss."""
    torch.manual_seed(0)
    s, n = 2, 16
    text_logits = torch.randn(5, 2, 896)
    full = torch.randn(n, 2, 4, 896)
    text = torch.randint(0, 256, (2, 6))
    labels = (text, torch.ones_like(text, dtype=torch.bool), torch.randint(0, 512, (2, 8, 8)))
    loss_fn = TokenShuffleLoss(VOCAB, s, TEXT_WEIGHT, Z_COEF)
    lo = VOCAB.code_offset
    a = loss_fn((text_logits, full), labels)
    b = loss_fn((text_logits, full[..., lo : lo + 512].contiguous()), labels)
    assert torch.equal(a, b)
    assert_rel(a, reference_loss((text_logits, full), labels, VOCAB, s), "loss")
    with pytest.raises(ValueError, match="expected this rank's 512 codebook columns"):
        loss_fn((text_logits, full[..., :100]), labels)


class _CountHostSyncs(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: what .item(), float() and int() of a tensor run."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_loss_makes_no_host_sync_until_metrics_are_read():
    text_logits = torch.randn(5, 2, 896, requires_grad=True)
    image_logits = torch.randn(16, 2, 4, 512, requires_grad=True)
    text = torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[1, 3] = False
    labels = (text, mask, torch.randint(0, 512, (2, 8, 8)))
    loss_fn = TokenShuffleLoss(VOCAB, 2, TEXT_WEIGHT, Z_COEF)
    with _CountHostSyncs() as counter:
        loss = loss_fn((text_logits, image_logits), labels)
        loss.backward()
    assert counter.syncs == 0
    (parts,) = loss_fn.pop_history()
    with _CountHostSyncs() as counter:  # every field comes over in one transfer
        fields = (parts.total, parts.image, parts.text, parts.z_loss, parts.text_tokens)
    assert counter.syncs <= 1
    assert fields[0] == float(loss) and fields[4] == 9 and parts.image_tokens == 128
    assert isinstance(fields[4], int)


def test_vocab_columns():
    assert vocab_columns(0, 448, 261, 773) == (261, 448)  # TP rank 0 of 896 rows
    assert vocab_columns(448, 448, 261, 773) == (0, 325)  # TP rank 1
    assert vocab_columns(0, 320, 517, 581) == (320, 320)  # a shard without codes: empty
    assert vocab_columns(640, 320, 0, 581) == (0, 0)  # a shard of padding rows only
