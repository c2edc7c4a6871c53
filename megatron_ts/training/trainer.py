"""The training loop: stages, steps, metrics, checkpoints, signals.

`run` returns 0 when finished and 75 (EX_TEMPFAIL) when it checkpointed after SIGTERM / SIGUSR1
and should be requeued; failures raise, and `ts-train` maps them to the exit codes of
megatron_ts.errors.
"""

from __future__ import annotations

import gc
import json
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ts.config import (
    Config,
    ConfigError,
    ResolvedStage,
    save_resolved,
    stage_field,
    validate,
)
from megatron_ts.distributed.init import (
    any_rank,
    init_distributed,
    init_model_parallel,
    shutdown_distributed,
)
from megatron_ts.errors import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE
from megatron_ts.logging import get_logger, setup_logging
from megatron_ts.models.model import ModelSpec
from megatron_ts.training.checkpoint import (
    TrainState,
    clean_incomplete,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_ts.training.engine import StageEngine
from megatron_ts.training.lr_schedule import learning_rate
from megatron_ts.training.metrics import (
    MetricsWriter,
    PendingSteps,
    device_peak_tflops,
    peak_memory_gb,
)
from megatron_ts.training.plan import layout_flops, vocab_from_config
from megatron_ts.training.run_lock import RunDirBusyError, RunLock
from megatron_ts.training.step_watch import SaveSchedule, StepHealth

log = get_logger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot continue; the message names the step and the cause."""

    exit_code = EXIT_DIVERGED


class SignalFlag:
    """Records SIGTERM / SIGUSR1 so the loop can finish the step, save and exit 75."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def any_rank(self) -> bool:
        """True on every rank when any rank got a signal (a collective)."""
        return any_rank(self.received is not None)


def _device(backend: str) -> torch.device:
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


NEW_AT_A_STAGE = ("shuffle.", "window_positions.")
"""Parameters a checkpoint may lack when a stage or run adds them (token-shuffle turned on, or
aspect-ratio buckets on a square model); they start from their init: identity / zero."""


def _needs_data(engine: StageEngine) -> bool:
    return not engine.pipeline or engine.is_first_stage or engine.is_last_stage


def _stage_meta(stage: ResolvedStage, downsample: int) -> dict:
    return {
        "index": stage.index,
        "name": stage.name,
        "resolution": stage.resolution,
        "shuffle_window": stage.shuffle_window,
        "caption_len": stage.caption_len,
        "grid": stage.grid(downsample),
        "buckets": list(stage.buckets),
        "steps": stage.steps,
        "global_batch": stage.global_batch,
    }


class Trainer:
    """Runs every remaining curriculum stage of one run directory."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        setup_logging(cfg.logging.level)
        self.rank, self.world = init_distributed(cfg.parallel.backend)
        self.stages = validate(cfg, self.world)
        self.device = _device(dist.get_backend())
        self.bf16 = _use_bf16(cfg.train.precision, self.device)
        self.run_dir = Path(cfg.job.run_dir)
        self.lock = self._lock_run_dir()
        # Leftovers of an interrupted save go first: after a full disk they hold the space
        # that writing config.json needs.
        clean_incomplete(self.run_dir)
        if self.rank == 0:
            save_resolved(cfg, self.run_dir)
        dist.barrier()
        self.vocab = vocab_from_config(cfg.tokenizer)
        self.metrics = MetricsWriter(self.run_dir, cfg.logging, enabled=self.rank == 0)
        self.signals = SignalFlag()
        self.peak = device_peak_tflops(cfg.logging)
        self._verified: Path | None = None  # the checkpoint `run` checked against its checksums

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run directory before anything touches it; every rank learns how."""
        lock, verdict = None, [None]
        if self.rank == 0:
            lock = RunLock(self.run_dir)
            verdict[0] = lock.acquire()
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RunDirBusyError(verdict[0])
        return lock

    def run(self) -> int:
        cfg = self.cfg
        latest = latest_checkpoint(self.run_dir) if cfg.checkpoint.resume else None
        state = TrainState()
        if latest is not None:
            from megatron_ts.checkpoint.model_files import read_meta

            verify_checkpoint(latest)  # before anything is built: a damaged file fails at once
            self._verified = latest
            meta = read_meta(latest)
            state = self._extend_finished(TrainState(**meta["train_state"]), meta, latest)
            self._check_same_stage(state, meta, latest)
            log.info(
                "resuming from %s (stage %d, step %d)", latest, state.stage_index, state.global_step
            )
        if state.stage_index >= len(self.stages):
            log.info(
                "nothing to train: the run finished at step %d with all %d stages; raise the last "
                "stage's steps or add a stage to train on",
                state.global_step,
                len(self.stages),
            )
            self.metrics.close()
            return EXIT_OK
        try:
            for stage in self.stages[state.stage_index :]:
                code = self._run_stage(stage, state, latest)
                if code != EXIT_OK:
                    return code
                latest = latest_checkpoint(self.run_dir)
        finally:
            self.metrics.close()
        log.info("training finished at step %d", state.global_step)
        return EXIT_OK

    def _check_same_stage(self, state: TrainState, meta: dict, latest: Path) -> None:
        """A resume inside a stage keeps what fixes the stage's samples and steps.

        The parallel layout, micro-batch and worker count may change (the loader continues after
        the last consumed sample). The global batch, resolution, shuffle window and caption length
        may not: the step count, the learning-rate schedule and the sample shapes were planned
        with them, and a silent change would train a different recipe than the config says.

        Raises:
            ConfigError: naming the field, both values and the ways out.
        """
        saved = meta.get("stage") or {}
        k = state.stage_index
        if state.stage_step == 0 or not 0 <= k < len(self.stages) or saved.get("index") != k:
            return
        stage = self.stages[k]
        for key in ("global_batch", "resolution", "shuffle_window", "caption_len", "buckets"):
            old, new = saved.get(key), getattr(stage, key)
            if key == "buckets":  # a checkpoint from before buckets trained square images
                old, new = saved.get(key, []), list(new)
            if old is not None and old != new:
                raise ConfigError(
                    f"{stage_field(self.cfg, k, key)} = {new}, but stage {stage.name!r} was "
                    f"checkpointed at step {state.stage_step} with {key} = {old} ({latest}); "
                    f"resume it with {key} = {old} (the TP/PP/DP layout, micro_batch and "
                    "num_workers may change), or start a new curriculum stage with the new value"
                )

    def _extend_finished(self, state: TrainState, meta: dict, latest: Path) -> TrainState:
        """Re-enters the stage a checkpoint ended when the config now gives it more steps.

        A save at the end of stage k (stage_index k + 1, stage_step 0) records the steps k was
        configured with. With more steps now, training continues in k where it stopped: the
        optimizer, the loader position and the step counts carry on, and the learning rate
        follows the schedule of the new length (at the resumed step, the rate a run configured
        with the new length from the start would use there; docs/curriculum.md).
        """
        done, k = meta.get("stage") or {}, state.stage_index - 1
        if state.stage_step != 0 or not 0 <= k < len(self.stages) or "steps" not in done:
            return state
        stage = self.stages[k]
        if done.get("index") != k or done.get("name") != stage.name or stage.steps <= done["steps"]:
            return state
        if not any((latest / "loader").glob("*.json")):
            raise ConfigError(
                f"cannot extend stage {stage.name} ({latest}): the checkpoint holds no loader "
                "state, so its data would start over; add a curriculum stage instead"
            )
        old = done["steps"]
        args = (stage.lr, stage.min_lr, stage.warmup_steps, stage.schedule)
        log.warning(
            "extending stage %s from %d to %d steps: the learning rate follows the new length "
            "(%.3g at its last step, %.3g at the next)",
            stage.name,
            old,
            stage.steps,
            learning_rate(old - 1, old, *args, self.cfg.optim.decay_fraction),
            learning_rate(old, stage.steps, *args, self.cfg.optim.decay_fraction),
        )
        state.stage_index, state.stage_step = k, old
        state.stage_samples = old * done.get("global_batch", stage.global_batch)
        return state

    # -- one stage ---------------------------------------------------------------------------

    def _build(self, stage: ResolvedStage) -> tuple[StageEngine, object | None]:
        cfg = self.cfg
        init_model_parallel(stage.tensor, stage.pipeline)
        spec = ModelSpec.from_config(
            cfg.model,
            self.vocab,
            stage.shuffle_window,
            stage.tensor,
            cfg.parallel.activation_checkpointing,
        )
        torch.manual_seed(cfg.job.seed)
        engine = StageEngine(
            spec,
            stage,
            cfg.parallel,
            cfg.optim,
            cfg.train.text_loss_weight,
            cfg.job.seed,
            self.device,
            self.bf16,
            cfg.train.ema_decay,
        )
        loader = None
        if _needs_data(engine):
            from megatron_ts.data.loader import build_loader

            loader = build_loader(
                cfg.data,
                stage,
                self.vocab,
                seed=cfg.job.seed,
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(),
                downsample=cfg.tokenizer.downsample,
            )
        return engine, loader

    def _restore(
        self,
        stage: ResolvedStage,
        engine: StageEngine,
        loader,
        state: TrainState,
        latest: Path | None,
    ) -> None:
        """Loads what `stage` starts from into `engine` and `loader`; `state` is not changed.

        Inside a stage, `state` is already the position `run` read from `latest`'s meta.json
        (moved back into a finished stage by `_extend_finished`), so only the engine and the
        loader are restored.
        """
        cfg = self.cfg
        if latest is not None and state.stage_index == stage.index and state.stage_step > 0:
            loader_states, mode = load_checkpoint(
                latest,
                engine,
                load_optimizer=True,
                load_average=True,
                verified=latest == self._verified,
            )
            if loader is not None and loader_states:
                loader.load_state_dict(loader_states)  # every DP rank's: any DP size resumes
            log.info("resumed stage %s at step %d (%s)", stage.name, state.stage_step, mode)
            return
        if latest is not None:  # a stage boundary of this run: what carry_over says
            _, mode = load_checkpoint(
                latest,
                engine,
                load_optimizer=stage.carry_over == "weights+optimizer",
                allow_missing=NEW_AT_A_STAGE,
                verified=latest == self._verified,
            )
            log.info("stage %s starts from %s (%s)", stage.name, latest, mode)
            return
        if not cfg.checkpoint.load:
            return
        # checkpoint.load: weights only (safetensors, no pickle), the optimizer state only with
        # checkpoint.load_optimizer, never the other run's RNG, loader position or step count
        from megatron_ts.checkpoint.model_files import (
            CheckpointError,
            check_spec,
            is_hf_directory,
            read_meta,
            resolve_checkpoint,
        )

        load = Path(cfg.checkpoint.load)
        scratch = None
        if is_hf_directory(load):
            from megatron_ts.hf.import_hf import checkpoint_from_export, export_model_spec

            check_spec(export_model_spec(load), engine.spec.to_dict(), load)
            if cfg.checkpoint.load_optimizer:
                raise CheckpointError(
                    f"checkpoint.load {load} is a Hugging Face export, which holds no optimizer "
                    "state; set checkpoint.load_optimizer = false"
                )
            # rank 0 converts it into the run directory (shared by all ranks, like checkpoints)
            scratch = self.run_dir / ".checkpoint-load-hf"
            failed: list[str | None] = [None]
            if self.rank == 0:
                try:
                    if scratch.exists():
                        shutil.rmtree(scratch)  # left by an interrupted start
                    checkpoint_from_export(load, scratch)
                except Exception as err:  # noqa: BLE001 - every rank raises it, none waits
                    failed[0] = f"checkpoint.load {load}: {type(err).__name__}: {err}"
            dist.broadcast_object_list(failed, src=0)
            if failed[0] is not None:
                raise CheckpointError(failed[0])
            source = scratch
        else:
            source = resolve_checkpoint(load)
            check_spec(read_meta(source)["model_spec"], engine.spec.to_dict(), source)
        try:
            _, mode = load_checkpoint(
                source,
                engine,
                load_optimizer=cfg.checkpoint.load_optimizer,
                allow_missing=NEW_AT_A_STAGE,
                load_rng=False,
            )
        finally:
            if scratch is not None:
                dist.barrier()
                if self.rank == 0:
                    shutil.rmtree(scratch, ignore_errors=True)
        log.info("stage %s starts from checkpoint.load %s (%s)", stage.name, load, mode)

    def _run_stage(self, stage: ResolvedStage, state: TrainState, latest: Path | None) -> int:
        cfg = self.cfg
        downsample = cfg.tokenizer.downsample
        engine, loader = self._build(stage)
        self._restore(stage, engine, loader, state, latest)
        batches = iter(loader) if loader is not None else None
        flops_per_sample, seq_len = self._sample_cost(stage, engine, loader)
        meta_extra = {"config": cfg.to_dict(), "stage": _stage_meta(stage, downsample)}
        health, schedule = StepHealth(), SaveSchedule(cfg.checkpoint)
        pending = PendingSteps()  # metrics stay on the device until a logging step or a save
        last_keys: list[str] = []
        log.info(
            "stage %d/%d %s: %d steps, %dpx, s=%d, %.0f positions, TP=%d PP=%d DP=%d",
            stage.index + 1,
            len(self.stages),
            stage.name,
            stage.steps,
            stage.resolution,
            stage.shuffle_window,
            seq_len,
            stage.tensor,
            stage.pipeline,
            engine.data_parallel,
        )
        try:
            while state.stage_step < stage.steps:
                lr = learning_rate(
                    state.stage_step,
                    stage.steps,
                    stage.lr,
                    stage.min_lr,
                    stage.warmup_steps,
                    stage.schedule,
                    cfg.optim.decay_fraction,
                )
                engine.set_lr(lr)
                start = time.perf_counter()
                result = engine.train_step(batches)
                seconds = time.perf_counter() - start  # host time: the device may still run
                last_keys = result.keys
                if cfg.logging.sample_keys:
                    self._record_keys(state.global_step + 1, result.keys)
                state.global_step += 1
                state.stage_step += 1
                state.consumed_samples += stage.global_batch
                state.stage_samples += stage.global_batch
                pending.add(state.global_step, state.stage_step, result, seconds)
                health.observe(state, result)  # host flags only: the metrics are not read here

                diverged = state.nonfinite_in_row >= cfg.train.max_nonfinite_in_row
                if (
                    diverged
                    or state.global_step % cfg.logging.interval == 0
                    or state.stage_step == stage.steps
                ):
                    step_seconds = self._read_metrics(pending, state, health)
                    self._log(
                        state, stage, result, lr, step_seconds, flops_per_sample, seq_len, loader
                    )
                if diverged:
                    raise TrainingError(
                        self._streak_message(state, result.keys, "train.max_nonfinite_in_row")
                    )

                stop = self.signals.any_rank()
                due = schedule.due(state.global_step, in_streak=state.nonfinite_in_row > 0)
                if state.nonfinite_in_row:
                    if stop:  # no checkpoint inside a streak (SaveSchedule)
                        log.warning(
                            "signal received during %d non-finite steps: not checkpointed; "
                            "exiting %d, the requeued run resumes from %s",
                            state.nonfinite_in_row,
                            EXIT_REQUEUE,
                            latest_checkpoint(self.run_dir) or "the start",
                        )
                        return EXIT_REQUEUE
                    continue
                preview = self._preview_due(state)
                if stop or preview or (due and state.stage_step < stage.steps):
                    self._read_metrics(pending, state, health)  # the loss history is saved
                    saved = self._save(engine, state, loader, meta_extra)
                    schedule.saved()
                    if preview:
                        self._preview(saved, stage, state)
                if stop:
                    log.warning(
                        "signal received: checkpointed at step %d, exiting %d for requeue",
                        state.global_step,
                        EXIT_REQUEUE,
                    )
                    return EXIT_REQUEUE
            if state.nonfinite_in_row:
                raise TrainingError(self._streak_message(state, last_keys, "the end of the stage"))
            # End of stage: the next stage (or a later resume) starts from this checkpoint.
            state.stage_index += 1
            state.stage_step = 0
            state.stage_samples = 0
            if cfg.checkpoint.save_on_exit or state.stage_index < len(self.stages):
                # with the loader position, so that the stage can be extended later
                self._read_metrics(pending, state, health)
                self._save(engine, state, loader, meta_extra)
            return EXIT_OK
        finally:
            if loader is not None:
                loader.close()
            del engine
            gc.collect()

    @staticmethod
    def _read_metrics(pending: PendingSteps, state: TrainState, health: StepHealth) -> float | None:
        """Reads the queued steps' metrics (one device-to-host sync for all of them) into the
        loss history and the spike check; returns the wall seconds per step since the last read.
        """
        steps, step_seconds = pending.read()
        for global_step, _, result in steps:
            state.record(result.loss, step=global_step)
        health.spikes([(g, k, r.loss) for g, k, r in steps if not r.nonfinite])
        return step_seconds

    def _preview_due(self, state: TrainState) -> bool:
        interval = self.cfg.logging.preview_interval
        return bool(
            interval > 0 and self.cfg.logging.preview_prompts and state.global_step % interval == 0
        )

    def _preview(self, saved: Path, stage: ResolvedStage, state: TrainState) -> None:
        """Preview images of the checkpoint just saved (rank 0; logging.preview_*)."""
        if self.rank != 0:
            return
        from megatron_ts.training.preview import write_previews

        cfg = self.cfg
        write_previews(
            saved,
            cfg.tokenizer,
            cfg.sampling,
            cfg.logging.preview_prompts,
            stage,
            self.run_dir / "previews",
            state.global_step,
            self.metrics,
        )

    def _record_keys(self, step: int, keys: list[str]) -> None:
        """One line of run_dir/samples/dp_RRRRR.jsonl (logging.sample_keys) from the rank that
        represents its data-parallel group (TP rank 0 of the first pipeline stage)."""
        if (
            not keys
            or parallel_state.get_tensor_model_parallel_rank() != 0
            or parallel_state.get_pipeline_model_parallel_rank() != 0
        ):
            return
        path = self.run_dir / "samples" / f"dp_{parallel_state.get_data_parallel_rank():05d}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def _streak_message(self, state: TrainState, keys: list[str], reached: str) -> str:
        latest = latest_checkpoint(self.run_dir)
        where = (
            f"the latest checkpoint {latest} predates the streak; a plain restart resumes from it"
            if latest is not None
            else "no checkpoint was written; a restart begins again"
        )
        return (
            f"{state.nonfinite_in_row} non-finite steps in a row up to step {state.global_step}, "
            f"stopped at {reached} (run {self.run_dir}): none was applied and nothing was saved; "
            f"{where}; lower optim.lr or optim.grad_clip, or raise train.z_loss, before "
            f"restarting; last batch keys {keys[:8]}"
        )

    def _save(self, engine: StageEngine, state: TrainState, loader, meta_extra: dict) -> Path:
        return save_checkpoint(
            self.run_dir,
            engine,
            state,
            loader.state_dict() if loader is not None else None,
            meta_extra,
            self.cfg.checkpoint.keep_last,
        )

    def _sample_cost(self, stage: ResolvedStage, engine, loader) -> tuple[float, float]:
        """(training FLOPs, positions) of one sample of the stage, for throughput and MFU.

        With aspect-ratio buckets both are the means over the buckets, each weighted by the share
        of steps the loader draws from it (equal shares on a rank without a loader).
        """
        layouts = stage.layouts(self.cfg.tokenizer.downsample)
        shares = (loader.bucket_shares() if loader is not None else {}) or {
            name: 1.0 / len(layouts) for name in layouts
        }
        flops = positions = 0.0
        for name, layout in layouts.items():
            share = shares.get(name, 0.0)
            cost = layout_flops(
                self.cfg, engine.spec.padded_vocab, self.vocab.codebook_size, layout
            )
            flops += share * cost.training
            positions += share * layout.seq_len
        return flops, positions

    def _log(
        self, state, stage, result, lr, step_seconds, flops_per_sample, seq_len, loader
    ) -> None:
        """Writes the step's metrics (read already) and the throughput of the steps since the
        last read (`step_seconds` per step)."""
        images_per_s = stage.global_batch / step_seconds
        tflops = flops_per_sample * images_per_s / self.world / 1e12
        values = {
            "train/loss": result.loss,
            "train/loss_image": result.image_loss,
            "train/loss_text": result.text_loss,
            "train/z_loss": result.z_loss,
            "train/grad_norm": result.grad_norm,
            "train/lr": lr,
            "train/skipped_steps": state.skipped_steps,
            "train/stage": stage.index,
            "train/consumed_samples": state.consumed_samples,
            "perf/step_time_s": step_seconds,
            "perf/images_per_s": images_per_s,
            "perf/tokens_per_s": images_per_s * seq_len,
            "perf/tflops_per_device": tflops,
            "perf/mfu": tflops / self.peak if self.peak else None,
            "perf/peak_memory_gb": peak_memory_gb(),
        }
        if loader is not None:
            data = loader.metrics()
            values.update(
                {
                    "data/wait_fraction": data["data_wait_fraction"],
                    "data/samples_per_s": data["samples_per_s"],
                    "data/bytes_read": data["bytes_read"],
                    "data/retries": data["retries"],
                    "data/skipped_samples": data["skipped_samples"],
                }
            )
        self.metrics.scalars(state.global_step, values)


def run(cfg: Config) -> int:
    """Trains `cfg` to the end (or to a signal); returns the process exit code.

    Failures raise; `ts-train` reports them through megatron_ts.errors (one line and an exit code
    for known ones).
    """
    # groups that were up before (a caller that runs ts-train in its own process group) stay up
    owned, finished = not dist.is_initialized(), False
    try:
        code = Trainer(cfg).run()
        finished = True
        return code
    finally:
        if owned:
            shutdown_distributed(finished)
