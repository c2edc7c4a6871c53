"""What the training loop decides after each step: is the step healthy, is a checkpoint due.

health = StepHealth()
schedule = SaveSchedule(cfg.checkpoint)
...
health.observe(state, result)             # every step: counts non-finite (skipped) steps
health.spikes(steps)                      # when the metrics are read: warns on loss spikes
if schedule.due(state.global_step, in_streak=state.nonfinite_in_row > 0): save
"""

from __future__ import annotations

import time

from megatron_ts.config import CheckpointConfig
from megatron_ts.logging import get_logger

log = get_logger(__name__)

SPIKE_FACTOR = 1.5
"""A finite loss above this multiple of the running mean is reported as a spike."""
SPIKE_WARMUP = 10
"""Stage steps before spikes are reported (the running mean needs a few steps)."""


class StepHealth:
    """Counts non-finite steps into the train state and reports loss spikes.

    The count is kept every step from host flags (`result.nonfinite`); the spike check needs the
    loss values, which stay on the device until the trainer reads a logging interval's metrics,
    so it runs then, over those steps in order (the same warnings, printed at the read).
    """

    def __init__(self):
        self.loss_mean: float | None = None

    def observe(self, state, result) -> bool:
        """Records one step's outcome in `state` (skipped_steps, nonfinite_in_row).

        Returns:
            Whether the step was applied with a finite loss.
        """
        if result.nonfinite:
            state.skipped_steps += 1
            state.nonfinite_in_row += 1
            log.warning(
                "step %d: non-finite loss or gradients, update skipped; batch keys %s",
                state.global_step,
                result.keys[:8],
            )
            return False
        state.nonfinite_in_row = 0
        return True

    def spikes(self, steps: list[tuple[int, int, float]]) -> None:
        """Updates the running mean with the finite steps' losses and warns on spikes.

        Args:
            steps: (global_step, stage_step, loss) of the steps `observe` found finite, in order.
        """
        for global_step, stage_step, loss in steps:
            mean = self.loss_mean
            if mean is not None and stage_step > SPIKE_WARMUP and loss > SPIKE_FACTOR * mean:
                log.warning("step %d: loss spike %.4f (running mean %.4f)", global_step, loss, mean)
            self.loss_mean = loss if mean is None else 0.9 * mean + 0.1 * loss


class SaveSchedule:
    """When a checkpoint is due: every `interval_steps` steps and after `interval_minutes`.

    Never inside a streak of non-finite steps: a save there would become `latest`, and a resume
    would replay the streak from it. A save that falls due inside a streak waits for the next
    finite step.
    """

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.last_save = time.monotonic()
        self.pending = False

    def due(self, global_step: int, in_streak: bool) -> bool:
        """Whether to save after `global_step` (False inside a streak; the save then waits)."""
        cfg = self.cfg
        due = (cfg.interval_steps > 0 and global_step % cfg.interval_steps == 0) or (
            cfg.interval_minutes > 0
            and time.monotonic() - self.last_save > 60 * cfg.interval_minutes
        )
        if in_streak:
            self.pending = self.pending or due
            return False
        due, self.pending = due or self.pending, False
        return due

    def saved(self) -> None:
        """Restarts the minutes interval after any save."""
        self.last_save = time.monotonic()
