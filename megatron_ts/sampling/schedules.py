"""Classifier-free guidance scale schedules over the decoding steps of one image.

The paper guides with a scale that changes over the image tokens and adopts a "half-linear"
schedule. Our reading: the scale rises linearly from 1 (no guidance) to the target over the
first half of the image tokens and stays at the target for the second half. `linear` rises over
the whole image; `constant` is the usual fixed scale. Progress is measured in image tokens
already generated, so s = 1 and s = 2 models follow the same curve over the image.
"""

from __future__ import annotations

SCHEDULES = ("constant", "linear", "half-linear")
DEFAULT_SCHEDULE = "half-linear"


def guidance_scale(schedule: str, target: float, step: int, steps: int) -> float:
    """Guidance scale at decoding step `step` of `steps`.

    Args:
        schedule: constant, linear or half-linear.
        target: the final (constant: the only) guidance scale.
        step: 0-based decoding step; step k emits codes k*s^2 .. (k+1)*s^2 - 1.
        steps: decoding steps of the image (positions, not codes).

    Returns:
        The scale w in logits = uncond + w * (cond - uncond).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"cfg schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if schedule == "constant" or steps <= 1:
        return float(target)
    progress = step / steps  # fraction of the image tokens generated before this step
    if schedule == "half-linear":
        progress = min(1.0, 2.0 * progress)
    return 1.0 + (target - 1.0) * progress


def needs_uncond(schedule: str, target: float) -> bool:
    """Whether any step differs from plain conditional sampling (w = 1)."""
    return float(target) != 1.0
