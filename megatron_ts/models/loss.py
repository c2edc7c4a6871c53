"""Cross-entropy and z-loss over tensor-parallel vocabulary shards.

log Z is computed across TP ranks (max then sum of exponentials, both all-reduced), so the same
code serves TP = 1 and TP > 1, and z-loss (coef * (log Z)^2, PaLM / Chameleon) comes for free.
Image predictions see only codebook logits; text predictions see the unpadded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_ts.models.model import image_targets
from megatron_ts.vocab import VocabLayout


def vocab_parallel_ce(
    logits: torch.Tensor, targets: torch.Tensor, allowed: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prediction cross-entropy and log-partition over a TP-sharded vocabulary.

    Args:
        logits: (..., V/tp) this rank's slice of the logits.
        targets: (...) vocabulary ids, inside `allowed`.
        allowed: [lo, hi) vocabulary ids that compete; the rest are masked out.

    Returns:
        (ce, log_z), each shaped like `targets`, in fp32.
    """
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    part = logits.shape[-1]
    start = tp_rank * part
    ids = torch.arange(start, start + part, device=logits.device)
    logits = logits.float().masked_fill((ids < allowed[0]) | (ids >= allowed[1]), float("-inf"))

    local_max = logits.max(dim=-1).values.detach()
    if tp_world > 1:
        dist.all_reduce(
            local_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
        )
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    # megatron's all-reduce works on input.contiguous(): a non-contiguous view would be left
    # unreduced, so hand it contiguous tensors.
    sum_exp = reduce_from_tensor_model_parallel_region(sum_exp.contiguous())
    log_z = local_max + torch.log(sum_exp)

    local_target = targets - start
    in_shard = (local_target >= 0) & (local_target < part)
    picked = torch.gather(logits, -1, local_target.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    target_logit = reduce_from_tensor_model_parallel_region(picked.contiguous())
    return log_z - target_logit, log_z


@dataclass
class LossParts:
    """Detached components of the last loss, for metrics."""

    total: float
    image: float
    text: float
    z_loss: float
    image_tokens: int
    text_tokens: int


class TokenShuffleLoss:
    """loss(outputs, labels) for one micro-batch, usable as DeepSpeed's pipeline `loss_fn`.

    labels = (text (B, T), text_mask (B, T), codes (B, G, G)). The total is
    image_ce + text_weight * text_ce + z_coef * mean(log_z^2), each a mean over its tokens.
    """

    def __init__(self, vocab: VocabLayout, window: int, text_weight: float, z_coef: float):
        self.vocab = vocab
        self.window = window
        self.text_weight = text_weight
        self.z_coef = z_coef
        self.history: list[LossParts] = []

    def __call__(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        text_logits, image_logits = outputs
        text, text_mask, codes = labels
        vocab = self.vocab

        img_targets = image_targets(codes, self.window, vocab)  # (N, B, s^2)
        img_ce, img_lz = vocab_parallel_ce(
            image_logits, img_targets, (vocab.code_offset, vocab.code_offset + vocab.codebook_size)
        )
        image_loss = img_ce.mean()

        txt_targets = text[:, 1:].transpose(0, 1)  # (T-1, B)
        mask = text_mask[:, 1:].transpose(0, 1).float()  # (T-1, B)
        txt_ce, txt_lz = vocab_parallel_ce(text_logits, txt_targets, (0, vocab.size))
        n_text = mask.sum()
        text_loss = (txt_ce * mask).sum() / n_text.clamp(min=1.0)

        n_img = img_lz.numel()
        z_loss = ((img_lz**2).sum() + (txt_lz**2 * mask).sum()) / (n_img + n_text).clamp(min=1.0)

        total = image_loss + self.text_weight * text_loss + self.z_coef * z_loss
        self.history.append(
            LossParts(
                total=float(total.detach()),
                image=float(image_loss.detach()),
                text=float(text_loss.detach()),
                z_loss=float(z_loss.detach()),
                image_tokens=int(n_img),
                text_tokens=int(n_text.detach()),
            )
        )
        return total

    def pop_history(self) -> list[LossParts]:
        out, self.history = self.history, []
        return out
