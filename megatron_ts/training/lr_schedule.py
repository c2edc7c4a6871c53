"""Learning-rate schedules as pure functions of the step inside a stage.

Being stateless, they resume exactly: the trainer sets the rate of every step from
(stage, step) instead of restoring a scheduler object.
"""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    schedule: str,
    decay_fraction: float = 0.2,
) -> float:
    """Rate for optimizer step `step` (0-based) of a stage with `total_steps` steps.

    Args:
        step: 0-based step inside the stage.
        total_steps: stage length.
        lr: peak rate reached at the end of warmup.
        min_lr: floor at the end of the decay.
        warmup_steps: linear warmup from lr/warmup to lr.
        schedule: cosine, linear, constant, or wsd (warmup, stable at lr, then a linear decay
            over the last `decay_fraction` of the steps).
        decay_fraction: wsd only.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * decay_fraction)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return lr + (min_lr - lr) * progress
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, linear, constant or wsd")
