"""Never apply a step whose gradients are not finite, whatever the ZeRO stage or precision.

DeepSpeed's own optimizers check: ZeRO stages 1-3 and the bf16 optimizer compute the global
gradient norm and skip a step whose norm is not finite, setting `optimizer.overflow`, which the
engine counts in `skipped_steps`. The one path without a check is ZeRO stage 0 in fp32, where
the engine hands the gradients straight to torch's AdamW: a step with infinite gradients is
applied and every later step is NaN. `guard_plain_optimizer` closes that path; `nonfinite_weights`
is the last line of defence before a checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from megatron_ts.distributed.init import any_rank
from megatron_ts.errors import EXIT_DIVERGED


def _grad_norms(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """fp32 L2 norms of the gradients of the parameters that have one: one fused pass."""
    grads = [p.grad for p in params if p.grad is not None]
    return [n.float() for n in torch._foreach_norm(grads)] if grads else []


def _nonfinite_flag(norms: list[torch.Tensor]) -> torch.Tensor:
    """1.0 when any norm is inf or NaN (a gradient holds one, or its norm overflows), else 0.0."""
    if not norms:
        return torch.zeros(())
    return (~torch.isfinite(torch.stack(norms)).all()).float()


def clip_by_global_norm(
    params: list[torch.nn.Parameter], max_norm: float, norms: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Scales the local gradients so that the global L2 norm is at most `max_norm`; returns the
    norm before clipping, as a 0-d tensor on the gradients' device (no host sync).

    The norm is over every parameter of the model once: tensor-parallel shards are summed over
    the TP group, replicated parameters (norms, the shuffle's compress/expand) count on TP rank 0
    only, and pipeline stages are summed over the PP group (megatron-core's model-parallel
    group, TP x PP). DeepSpeed's `clip_grad_norm_`, used here before, reduced over the engine's
    `mpu` and, under the pipeline engine, counted only the first pipeline stage's replicated
    parameters: the norm came out 1e-4 relative low at PP = 2 on the debug model. Same
    per-parameter arithmetic and clip coefficient as DeepSpeed's otherwise.

    Args:
        params: the local parameters.
        max_norm: the largest global norm left unscaled.
        norms: `_grad_norms(params)` when the caller has them already (the finiteness check
            reads the same norms), so the gradients are read once.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad]
    if norms is None:
        norms = _grad_norms(with_grad)
    counted = [
        n
        for p, n in zip(with_grad, norms, strict=True)
        if tp_rank == 0 or getattr(p, "tensor_model_parallel", False)
    ]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.stack(counted).pow(2).sum() if counted else torch.zeros((), device=device)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    norm = total.sqrt()
    if grads:  # x * 1.0 == x exactly, so scaling unconditionally needs no host decision
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


class _PlainOptimizerGuard:
    """Wraps a ZeRO-0 engine's clipping and optimizer step with an all-rank finiteness check.

    The verdict is taken on the reduced gradients before clipping (clipping by an infinite norm
    zeroes finite entries and could hide the problem). A bad step is not applied; the optimizer's
    `overflow` is set so the engine counts it as skipped and clears the gradients as after any
    step. `loss_flag` (a 0-d device tensor, non-zero when this step's loss is not finite) joins
    the verdict in the same all-reduce, so the step's one host read decides both.
    """

    def __init__(self, engine, loss_flag: Callable[[], torch.Tensor] | None = None):
        self.engine = engine
        self.loss_flag = loss_flag
        self.optimizer = engine.optimizer
        # the module's parameters: every one the optimizer steps, and the ones the clip reads
        self.params = list(engine.module.parameters())
        self.verdict: bool | None = None
        self._step = self.optimizer.step
        engine.clip_fp32_gradients = self.clip
        self.optimizer.step = self.step
        self.optimizer.overflow = False

    def _bad(self, norms: list[torch.Tensor]) -> bool:
        flag = _nonfinite_flag(norms)
        if self.loss_flag is not None:
            flag = torch.maximum(flag, self.loss_flag().to(flag.device, flag.dtype))
        return any_rank(flag)

    def clip(self) -> None:
        # Replaces the engine's clip_fp32_gradients, which drops the norm (ZeRO-0 fp32 runs
        # logged none) and miscounts it under the pipeline engine (`clip_by_global_norm`); the
        # norm stays the device tensor it is (the trainer reads it with the step's metrics).
        # One pass over the gradients gives the norms for both the verdict and the clipping.
        with_grad = [p for p in self.params if p.grad is not None]
        norms = _grad_norms(with_grad)
        self.verdict = self._bad(norms)
        if not self.verdict:
            self.optimizer._global_grad_norm = clip_by_global_norm(
                with_grad, self.engine.gradient_clipping(), norms
            )

    def step(self, *args, **kwargs):
        bad = self._bad(_grad_norms(self.params)) if self.verdict is None else self.verdict
        self.verdict = None
        self.optimizer.overflow = bad
        if bad:
            self.optimizer._global_grad_norm = float("inf")
            return None
        return self._step(*args, **kwargs)


def guard_plain_optimizer(engine, loss_flag: Callable[[], torch.Tensor] | None = None) -> bool:
    """Installs the finiteness check where DeepSpeed has none; returns whether it did.

    Args:
        engine: a DeepSpeed engine (plain or pipeline) after `deepspeed.initialize`.
        loss_flag: returns a 0-d tensor, non-zero when the step's loss (on this rank) is not
            finite; the guard then also skips such a step, and its verdict covers the loss.
    """
    if isinstance(engine.optimizer, ZeROOptimizer):
        return False  # ZeRO 1-3 and bf16: DeepSpeed skips non-finite steps itself
    _PlainOptimizerGuard(engine, loss_flag)
    return True


class NonFiniteWeightsError(RuntimeError):
    """Weights that hold inf or NaN at a save; nothing was written."""

    exit_code = EXIT_DIVERGED


def nonfinite_weights(modules: dict) -> list[str]:
    """Names of this rank's parameters holding inf or NaN (ZeRO-3: this rank's partition).

    Args:
        modules: the local model pieces, {layer index: module}.
    """
    bad = []
    for idx, module in modules.items():
        for name, param in module.named_parameters():
            data = getattr(param, "ds_tensor", param).detach()
            if not bool(torch.isfinite(data).all()):
                bad.append(f"{idx}.{name}")
    return bad


def check_weights_finite(modules: dict, where: str) -> None:
    """Collective: raises NonFiniteWeightsError on every rank when any rank's weights are bad.

    Args:
        modules: the local model pieces, {layer index: module}.
        where: what is about to be written, for the message.
    """
    bad = nonfinite_weights(modules)
    if any_rank(bool(bad)):
        rank = dist.get_rank() if dist.is_initialized() else 0
        names = ", ".join(bad[:4]) or "on another rank"
        raise NonFiniteWeightsError(
            f"weights hold inf/NaN ({where}; rank {rank}: {names}): not saved, `latest` still "
            "names the last good checkpoint; lower optim.lr or optim.grad_clip and restart"
        )
