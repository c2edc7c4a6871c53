"""The training loop's per-step decisions: step health, the checkpoint schedule, and when the
steps' metrics are read."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from megatron_ts.config import CheckpointConfig
from megatron_ts.testing import SyncCounter
from megatron_ts.training.checkpoint import TrainState
from megatron_ts.training.metrics import PendingSteps
from megatron_ts.training.step_watch import SaveSchedule, StepHealth


def _result(loss: float, skipped: bool = False):
    """A StepResult's host side: `nonfinite` is what train_step reads once per step."""
    return SimpleNamespace(
        loss=loss, skipped=skipped, nonfinite=skipped or not math.isfinite(loss), keys=["k0", "k1"]
    )


def test_health_counts_streaks_and_resets_on_a_finite_step(caplog):
    state, health = TrainState(), StepHealth()
    outcomes = []
    for loss, skipped in [(2.0, False), (math.nan, False), (1.9, True), (1.8, False)]:
        state.global_step += 1
        outcomes.append((health.observe(state, _result(loss, skipped)), state.nonfinite_in_row))
    assert outcomes == [(True, 0), (False, 1), (False, 2), (True, 0)]
    assert state.skipped_steps == 2
    assert "step 2: non-finite loss" in caplog.text and "['k0', 'k1']" in caplog.text


def test_health_reports_a_spike_only_after_the_warm_up(caplog):
    health = StepHealth()
    # read in two batches (as the trainer reads a logging interval's metrics): the same report
    steps = [(step, step, 1.0 if step not in (5, 13) else 3.0) for step in range(1, 14)]
    health.spikes(steps[:7])
    health.spikes(steps[7:])
    spikes = [r.message for r in caplog.records if "loss spike" in r.message]
    # step 5 is inside the warm-up (not reported, but averaged: 1 + 0.2 * 0.9^7 at step 13)
    assert spikes == ["step 13: loss spike 3.0000 (running mean 1.0957)"]


def test_pending_steps_are_read_in_one_transfer():
    """A logging interval's metrics come to the host together: one sync, whatever its length."""
    steps = PendingSteps()
    results = [
        SimpleNamespace(
            metrics=torch.tensor([k, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64), host=None
        )
        for k in range(5)
    ]
    for k, result in enumerate(results):
        steps.add(k + 1, k + 1, result, 0.5)
    with SyncCounter() as syncs:
        read, seconds = steps.read()
    assert syncs.count == 1, syncs.sites
    assert [(g, r.host[0]) for g, _, r in read] == [(k + 1, float(k)) for k in range(5)]
    assert 0.5 <= seconds < 0.6 and steps.read() == ([], None)


def test_schedule_defers_a_save_that_falls_inside_a_streak():
    schedule = SaveSchedule(CheckpointConfig(interval_steps=4, interval_minutes=0))
    decisions = [
        schedule.due(step, in_streak=step in (4, 5)) for step in range(1, 10)
    ]  # step 4 is due inside a streak: saved at step 6, the next finite one; then step 8
    assert [s for s, d in zip(range(1, 10), decisions) if d] == [6, 8]


def test_schedule_by_minutes_restarts_after_any_save(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("megatron_ts.training.step_watch.time.monotonic", lambda: now[0])
    schedule = SaveSchedule(CheckpointConfig(interval_steps=0, interval_minutes=1))
    now[0] += 59
    assert not schedule.due(1, in_streak=False)
    now[0] += 2
    assert schedule.due(2, in_streak=False)
    schedule.saved()
    now[0] += 30
    assert not schedule.due(3, in_streak=False)
