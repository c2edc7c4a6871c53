"""Cross-entropy and z-loss over tensor-parallel vocabulary shards.

log Z is computed across TP ranks (each rank's log-sum-exp, then their max and sum of
exponentials, both all-reduced), so the same code serves TP = 1 and TP > 1, and z-loss
(coef * (log Z)^2, PaLM / Chameleon) comes for free. Image predictions see only codebook logits;
text predictions see the unpadded vocabulary. Both are column slices of a rank's logits, so
nothing outside them is computed: no mask, and image logits may arrive as the codebook columns
only (what `OutputLayer` returns in training).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_ts.models.model import code_columns, image_targets, vocab_columns
from megatron_ts.vocab import VocabLayout


def vocab_parallel_ce(
    logits: torch.Tensor, targets: torch.Tensor, first_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prediction cross-entropy and log-partition over a TP-sharded set of competing ids.

    Every TP rank must call it (it all-reduces), also one whose slice is empty.

    Args:
        logits: (..., W) this rank's logits of vocabulary ids [first_id, first_id + W); all of
            them compete, and the ranks' slices together cover the competing ids once.
        targets: (...) vocabulary ids among the competing ones.
        first_id: vocabulary id of column 0.

    Returns:
        (ce, log_z), each shaped like `targets`, in fp32.
    """
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    # named explicitly: megatron-core warns on every call without it (and will require it)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    width = logits.shape[-1]
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # (...), -inf for an empty slice
    if tp_world > 1:
        # log Z = M + log sum_r exp(lse_r - M); M is detached (log Z does not depend on it)
        shift = log_z.detach().clone()
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
        # megatron's all-reduce sums its input in place (exp's backward would then read the sum:
        # hand it a copy) and works on input.contiguous() (a non-contiguous view would be left
        # unreduced: hand it contiguous tensors).
        sum_exp = reduce_from_tensor_model_parallel_region(
            torch.exp(log_z - shift).clone(), tp_group
        )
        log_z = shift + torch.log(sum_exp)

    local_target = targets - first_id
    in_slice = (local_target >= 0) & (local_target < width)
    if width:
        index = local_target.clamp(0, width - 1).unsqueeze(-1)
        picked = torch.gather(logits, -1, index).squeeze(-1)
        picked = torch.where(in_slice, picked, torch.zeros_like(picked))
    else:
        picked = torch.zeros(targets.shape, dtype=logits.dtype, device=logits.device)
    target_logit = reduce_from_tensor_model_parallel_region(picked.contiguous(), tp_group)
    return log_z - target_logit, log_z


@dataclass
class LossParts:
    """Detached components of one micro-batch's loss, for metrics.

    They stay on the device until a field is first read, then come to the host together in one
    transfer: computing the loss makes no device-to-host sync.
    """

    values: torch.Tensor
    """(5,) detached: total, image, text, z_loss, text tokens."""
    image_tokens: int

    @functools.cached_property
    def _host(self) -> list[float]:
        return self.values.tolist()

    @property
    def total(self) -> float:
        return self._host[0]

    @property
    def image(self) -> float:
        return self._host[1]

    @property
    def text(self) -> float:
        return self._host[2]

    @property
    def z_loss(self) -> float:
        return self._host[3]

    @property
    def text_tokens(self) -> int:
        return int(self._host[4])


class TokenShuffleLoss:
    """loss(outputs, labels) for one micro-batch, usable as DeepSpeed's pipeline `loss_fn`.

    outputs = (text logits (T-1, B, V/tp), image logits (N, B, s^2, C)) as `OutputLayer`
    returns them: C is this rank's codebook columns (`code_columns`) or its whole shard V/tp.
    labels = (text (B, T), text_mask (B, T), codes (B, G, G)). The total is
    image_ce + text_weight * text_ce + z_coef * mean(log_z^2), each a mean over its tokens.
    The trainer calls `set_step_norm` before each step: the means are then over the tokens of
    the whole global batch (each micro-batch's sums divided by the global counts per
    micro-batch), so any split into micro-batches and DP ranks gives the same step.
    """

    def __init__(self, vocab: VocabLayout, window: int, text_weight: float, z_coef: float):
        self.vocab = vocab
        self.window = window
        self.text_weight = text_weight
        self.z_coef = z_coef
        self.history: list[LossParts] = []
        self.step_norm: torch.Tensor | None = None

    def set_step_norm(self, norm: torch.Tensor | None) -> None:
        """[text, image] predictions per micro-batch of the current global batch (None: each
        micro-batch's own counts)."""
        self.step_norm = norm

    def __call__(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        text_logits, image_logits = outputs
        text, text_mask, codes = labels
        vocab = self.vocab
        width = text_logits.shape[-1]  # V/tp, this rank's head rows
        first = parallel_state.get_tensor_model_parallel_rank() * width

        a, b = code_columns(vocab, width)
        if image_logits.shape[-1] == width:
            image_logits = image_logits[..., a:b]  # a whole shard (eval mode): its codes only
        elif image_logits.shape[-1] != b - a:
            raise ValueError(
                f"image logits have {image_logits.shape[-1]} columns; expected this rank's "
                f"{b - a} codebook columns or its whole vocabulary shard of {width}"
            )
        img_targets = image_targets(codes, self.window, vocab)  # (N, B, s^2)
        img_ce, img_lz = vocab_parallel_ce(image_logits, img_targets, first + a)

        ta, tb = vocab_columns(first, width, 0, vocab.size)  # the padding rows never compete
        txt_targets = text[:, 1:].transpose(0, 1)  # (T-1, B)
        mask = text_mask[:, 1:].transpose(0, 1).float()  # (T-1, B)
        txt_ce, txt_lz = vocab_parallel_ce(text_logits[..., ta:tb], txt_targets, first + ta)
        n_text = mask.sum()
        n_img = img_lz.numel()
        if self.step_norm is not None:  # the global batch's counts per micro-batch
            text_div, img_div = self.step_norm[0], self.step_norm[1]
            z_div = text_div + img_div
            text_div = text_div.clamp(min=1e-6)  # no text in the whole batch: the sum is 0
        else:  # this micro-batch's own
            text_div, img_div = n_text.clamp(min=1.0), float(n_img)
            z_div = (n_img + n_text).clamp(min=1.0)
        image_loss = img_ce.sum() / img_div
        text_loss = (txt_ce * mask).sum() / text_div
        z_loss = ((img_lz**2).sum() + (txt_lz**2 * mask).sum()) / z_div

        total = image_loss + self.text_weight * text_loss + self.z_coef * z_loss
        values = torch.stack([total, image_loss, text_loss, z_loss, n_text]).detach()
        self.history.append(LossParts(values=values, image_tokens=n_img))
        return total

    def nonfinite(self) -> torch.Tensor:
        """0-d: 1.0 when a micro-batch loss since the last `pop_history` is not finite, else 0.0
        (on the device, no host read)."""
        if not self.history:
            return torch.zeros(())
        totals = torch.stack([parts.values[0] for parts in self.history])
        return (~torch.isfinite(totals)).any().float()

    def pop_history(self) -> list[LossParts]:
        out, self.history = self.history, []
        return out
