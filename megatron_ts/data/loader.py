"""The training data loader: deterministic, exactly resumable micro-batches per DP rank.

    loader = build_loader(cfg.data, stage, vocab, seed=cfg.job.seed, dp_rank=r, dp_size=n,
                          downsample=cfg.tokenizer.downsample)
    loader.load_state_dict(saved)        # optional, before or after iterating
    batch = next(loader)                 # one micro-batch (see megatron_ts.data.batching)
    ckpt["loader"] = loader.state_dict() # per DP rank
    loader.metrics()                     # samples/s, data-wait fraction, bytes, retries, skipped

The sample stream of a rank is a pure function of (seed, stage, dp_rank, dp_size, num_workers)
and the data: every TP rank and pipeline stage of one DP group that builds a loader gets the same
batches. Logical worker w produces micro-batches w, w + W, w + 2W, ... of its rank; the main
process takes them in that fixed round-robin order (torch DataLoader's in-order delivery, or a
plain loop when `num_workers = 0` / `processes=False`), never in order of arrival.
"""

from __future__ import annotations

import atexit
import inspect
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_ts.config import DataConfig, ResolvedStage
from megatron_ts.data.batching import Collator
from megatron_ts.data.pipeline import (
    ErrorTracker,
    SourceStream,
    StreamContext,
    SyntheticStream,
    mixed_samples,
)
from megatron_ts.data.s3_stream import IOCounters, register_s3_scheme
from megatron_ts.data.sources import DataSourceError, SourceSpec, epoch_order, read_source
from megatron_ts.data.state import STATE_FORMAT, LoaderStateError, WorkerState
from megatron_ts.logging import get_logger
from megatron_ts.vocab import VocabLayout

logger = get_logger(__name__)

ON_DP_CHANGE = ("error", "next_epoch")

# Loaders with live worker processes, closed at interpreter exit before torch's own handlers run
# (atexit is last-in first-out), so that exiting never waits on a worker.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


@dataclass(frozen=True)
class LoaderPlan:
    """What a worker process needs to rebuild its stream (picklable)."""

    ctx: StreamContext
    specs: tuple[SourceSpec, ...]
    weights: tuple[float, ...]
    collator: Collator
    micro_batch: int
    synthetic: bool


def worker_batches(plan: LoaderPlan, worker: int, state: WorkerState) -> Iterator[dict]:
    """Micro-batches of one logical worker from `state` on; each carries `_state` after it."""
    register_s3_scheme(plan.ctx.endpoint_url)
    tracker = ErrorTracker(
        plan.ctx.max_error_rate,
        seen=state.seen,
        skipped=state.skipped,
        missing_shards=state.missing_shards,
        counters=IOCounters(state.bytes_read, state.retries),
    )
    if plan.synthetic:
        streams: list = [SyntheticStream(plan.ctx, worker, tracker)]
        weights = [1.0]
    else:
        streams = [
            SourceStream(plan.ctx, spec, i, worker, tracker) for i, spec in enumerate(plan.specs)
        ]
        weights = list(plan.weights)
    cursors = [list(c) for c in state.cursors]
    n = state.samples
    c = plan.ctx
    gen = mixed_samples(streams, weights, cursors, n, [c.seed, c.stage, c.dp_rank, worker])
    while True:
        group = []
        for _ in range(plan.micro_batch):
            sample, src, cur = next(gen)
            cursors[src] = list(cur)
            group.append(sample)
            n += 1
        batch = _pack(plan.collator(group))
        batch["_state"] = WorkerState(
            samples=n,
            cursors=[list(x) for x in cursors],
            seen=tracker.seen,
            skipped=tracker.skipped,
            missing_shards=tracker.missing_shards,
            bytes_read=tracker.counters.bytes_read,
            retries=tracker.counters.retries,
        ).to_dict()
        yield batch


_PACKED = ("text", "text_mask", "codes", "dropped")


def _pack(batch: dict) -> dict:
    """Moves the batch's tensors into one byte buffer (8-byte aligned slices).

    A worker process hands every tensor to the trainer process through its own shared-memory
    segment and file descriptor; one buffer per batch instead of four halves that cost.
    """
    parts, layout, offset = [], [], 0
    for name in _PACKED:
        t = batch.pop(name).contiguous()
        raw = (
            t.view(torch.uint8).reshape(-1)
            if t.dtype != torch.bool
            else t.to(torch.uint8).reshape(-1)
        )
        pad = -raw.numel() % 8
        parts.append(raw)
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
        layout.append(
            (name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, raw.numel())
        )
        offset += raw.numel() + pad
    batch["_packed"] = torch.cat(parts)
    batch["_layout"] = layout
    return batch


def _unpack(batch: dict) -> dict:
    """Inverse of `_pack`: views into the one buffer (no copy)."""
    buf = batch.pop("_packed")
    for name, dtype, shape, offset, nbytes in batch.pop("_layout"):
        raw = buf[offset : offset + nbytes]
        if dtype == "bool":
            batch[name] = raw.view(torch.bool).view(shape)
        else:
            batch[name] = raw.view(getattr(torch, dtype)).view(shape)
    return batch


class _WorkerDataset(IterableDataset):
    """DataLoader worker i plays logical worker (i + rotation) % W, starting from its state."""

    def __init__(self, plan: LoaderPlan, states: list[dict], rotation: int):
        super().__init__()
        self.plan, self.states, self.rotation = plan, states, rotation

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        w = (wid + self.rotation) % self.plan.ctx.num_workers
        # One thread per worker: several torch intra-op threads per worker only contend on
        # the CPU cores the trainer needs.
        torch.set_num_threads(1)
        return worker_batches(self.plan, w, WorkerState.from_dict(self.states[w]))


class TokenLoader:
    """Iterator over fixed-shape micro-batches of one DP rank, with exact resume.

    Build it with `build_loader`. Not thread-safe; one per process and stage.
    """

    def __init__(
        self,
        plan: LoaderPlan,
        *,
        stage_name: str,
        processes: bool,
        timeout: float,
        prefetch_factor: int,
        mp_context: str | None,
        on_dp_change: str,
    ):
        self.plan = plan
        self.stage_name = stage_name
        self.processes = processes
        self.timeout = timeout
        self.prefetch_factor = prefetch_factor
        self.mp_context = mp_context
        self.on_dp_change = on_dp_change
        self.num_workers = plan.ctx.num_workers
        nsrc = 1 if plan.synthetic else len(plan.specs)
        self._workers = [WorkerState.fresh(nsrc).to_dict() for _ in range(self.num_workers)]
        self._batches = 0
        self._it: Iterator[dict] | None = None
        self._dl_iter = None
        # Metrics since the last metrics() call.
        self._t_wait = 0.0
        self._t_busy = 0.0
        self._n_samples = 0
        self._t_mark = time.perf_counter()
        self._last_return: float | None = None

    # -- iteration ------------------------------------------------------------------------------

    def _start(self) -> None:
        rotation = self._batches % self.num_workers
        if self.processes:
            dataset = _WorkerDataset(self.plan, [dict(s) for s in self._workers], rotation)
            kwargs = {}
            if "in_order" in inspect.signature(DataLoader).parameters:  # torch >= 2.6
                kwargs["in_order"] = True  # batch i from worker i % W, whatever finishes first
            loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                timeout=self.timeout,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.mp_context,
                persistent_workers=False,
                **kwargs,
            )
            self._dl_iter = iter(loader)
            _LIVE.add(self)
            self._it = self._dl_iter
        else:
            gens = [
                worker_batches(self.plan, w, WorkerState.from_dict(self._workers[w]))
                for w in range(self.num_workers)
            ]

            def round_robin() -> Iterator[dict]:
                w = rotation
                while True:
                    yield next(gens[w])
                    w = (w + 1) % self.num_workers

            self._it = round_robin()

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        if self._last_return is not None:
            self._t_busy += t0 - self._last_return
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except BaseException:
            self.close()  # stop worker processes now, not whenever the loader is collected
            raise
        t1 = time.perf_counter()
        self._t_wait += t1 - t0
        self._last_return = t1
        self._workers[self._batches % self.num_workers] = dict(batch.pop("_state"))
        batch = _unpack(batch)
        self._batches += 1
        self._n_samples += len(batch["keys"])
        return batch

    def close(self) -> None:
        """Stops worker processes (also done on garbage collection and at interpreter exit)."""
        if self._dl_iter is not None:
            shutdown = getattr(self._dl_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._dl_iter = None
        self._it = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position after the last micro-batch returned by `next()` (JSON-able)."""
        c = self.plan.ctx
        return {
            "format": STATE_FORMAT,
            "seed": c.seed,
            "stage": c.stage,
            "stage_name": self.stage_name,
            "dp_rank": c.dp_rank,
            "dp_size": c.dp_size,
            "num_workers": c.num_workers,
            "micro_batch": self.plan.micro_batch,
            "sources": [s.url for s in self.plan.specs],
            "synthetic": self.plan.synthetic,
            "batches": self._batches,
            "workers": [dict(w, cursors=[list(x) for x in w["cursors"]]) for w in self._workers],
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restores a position saved by `state_dict`.

        Args:
            state: this rank's saved state, or the list of every old rank's states (needed only
                when the DP size or worker count changed and `on_dp_change = "next_epoch"`).

        Raises:
            LoaderStateError: the state belongs to another seed, stage or source list, or the
                DP size / worker count changed and `on_dp_change = "error"`.
        """
        states = state if isinstance(state, list) else [state]
        if not states:
            raise LoaderStateError("empty loader state list")
        c = self.plan.ctx
        for st in states:
            if st.get("format") != STATE_FORMAT:
                raise LoaderStateError(
                    f"loader state format {st.get('format')!r}; this loader reads {STATE_FORMAT!r}"
                )
            for name, mine in (
                ("seed", c.seed),
                ("stage", c.stage),
                ("sources", [s.url for s in self.plan.specs]),
                ("synthetic", self.plan.synthetic),
            ):
                if st.get(name) != mine:
                    raise LoaderStateError(
                        f"loader state has {name} = {st.get(name)!r} but this loader has "
                        f"{mine!r}; resume with the configuration the checkpoint was saved with "
                        "(or start the stage's data afresh without loading the loader state)"
                    )
        old = states[0]
        same_layout = old["dp_size"] == c.dp_size and old["num_workers"] == c.num_workers
        if same_layout and old.get("micro_batch") == self.plan.micro_batch:
            mine = [s for s in states if s["dp_rank"] == c.dp_rank]
            if not mine:
                have = sorted(s["dp_rank"] for s in states)
                raise LoaderStateError(
                    f"loader state for dp_rank {c.dp_rank} needed, got states of dp ranks {have}; "
                    "pass this rank's own saved state"
                )
            self._restore(mine[0]["batches"], mine[0]["workers"])
            return
        change = (
            f"dp_size {old['dp_size']} -> {c.dp_size}, num_workers {old['num_workers']} -> "
            f"{c.num_workers}, micro_batch {old.get('micro_batch')} -> {self.plan.micro_batch}"
        )
        if self.on_dp_change != "next_epoch":
            raise LoaderStateError(
                f"the data layout changed since the checkpoint ({change}); the loader cannot "
                "continue the same sample stream. Resume with the old data-parallel size, "
                "data.num_workers and micro_batch, or build the loader with on_dp_change="
                "'next_epoch' and pass every old rank's state to start each source at the next "
                "epoch boundary (no sample repeats within an epoch; the rest of the interrupted "
                "epoch is not read)"
            )
        if len(states) != old["dp_size"]:
            raise LoaderStateError(
                f"on_dp_change='next_epoch' needs the states of all {old['dp_size']} old DP "
                f"ranks; got {len(states)}"
            )
        nsrc = len(self._workers[0]["cursors"])
        next_epoch = [
            1 + max(w["cursors"][s][0] for st in states for w in st["workers"]) for s in range(nsrc)
        ]
        logger.warning(
            "data layout changed (%s); every source restarts at epoch %s", change, next_epoch
        )
        fresh = WorkerState(cursors=[[e, 0, 0] for e in next_epoch]).to_dict()
        self._restore(0, [dict(fresh) for _ in range(self.num_workers)])

    def _restore(self, batches: int, workers: list[dict]) -> None:
        self.close()
        self._batches = int(batches)
        self._workers = [WorkerState.from_dict(w).to_dict() for w in workers]

    # -- metrics --------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Loader metrics; rates cover the time since the previous call.

        Returns:
            samples_per_s, data_wait_fraction (time in `next()` / time between first and last
            `next()` of the interval), bytes_read, retries, skipped_samples, missing_shards,
            samples_read, batches, epoch (lowest current epoch over workers and sources).
        """
        now = time.perf_counter()
        elapsed = max(now - self._t_mark, 1e-9)
        total = self._t_wait + self._t_busy
        out = {
            "samples_per_s": self._n_samples / elapsed,
            "data_wait_fraction": self._t_wait / total if total > 0 else 0.0,
            "bytes_read": sum(w["bytes_read"] for w in self._workers),
            "retries": sum(w["retries"] for w in self._workers),
            "skipped_samples": sum(w["skipped"] for w in self._workers),
            "missing_shards": sum(w["missing_shards"] for w in self._workers),
            "samples_read": sum(w["seen"] for w in self._workers),
            "batches": self._batches,
            "epoch": min(c[0] for w in self._workers for c in w["cursors"]),
        }
        self._t_wait = self._t_busy = 0.0
        self._n_samples = 0
        self._t_mark = now
        return out


def build_loader(
    data_cfg: DataConfig,
    stage: ResolvedStage,
    vocab: VocabLayout,
    *,
    seed: int,
    dp_rank: int,
    dp_size: int,
    downsample: int,
    processes: bool | None = None,
    shards_per_window: int = 4,
    timeout: float = 900.0,
    prefetch_factor: int = 4,
    mp_context: str | None = None,
    on_dp_change: str = "error",
) -> TokenLoader:
    """Builds the loader of one DP rank for one stage; checks the data before any step.

    Args:
        data_cfg: the [data] section (workers, shuffle buffer, dropout, error rate, S3 endpoint).
        stage: the resolved stage (resolution, caption_len, micro_batch, sources).
        vocab: the model's vocabulary layout; every source's manifest must match it.
        seed: run seed (job.seed).
        dp_rank: this rank's data-parallel rank.
        dp_size: data-parallel size.
        downsample: pixels per code (tokenizer.downsample); grid = resolution // downsample.
        processes: use worker processes (default: when data_cfg.num_workers > 0). With False the
            same `max(1, num_workers)` logical workers run in this process: same batches.
        shards_per_window: shards read interleaved (and replayed on resume) per worker.
        timeout: seconds a worker process may take for one batch before the loader raises
            instead of hanging.
        prefetch_factor: batches each worker process prepares ahead.
        mp_context: multiprocessing start method for workers (None: torch's default).
        on_dp_change: "error" (default) or "next_epoch"; see `TokenLoader.load_state_dict`.

    Returns:
        The loader, positioned at the start of the stage's stream.

    Raises:
        DataSourceError: unreadable manifest, wrong grid, too few shards for ranks x workers.
        VocabMismatchError: a source was tokenized with another vocabulary than the model's.
    """
    if on_dp_change not in ON_DP_CHANGE:
        raise ValueError(f"on_dp_change = {on_dp_change!r}; use one of {list(ON_DP_CHANGE)}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size = {dp_size})")
    if not 0.0 <= data_cfg.caption_dropout < 1.0:
        raise ValueError(f"data.caption_dropout = {data_cfg.caption_dropout}; use 0 <= p < 1")
    if stage.resolution % downsample:
        raise ValueError(
            f"stage {stage.name}: resolution {stage.resolution} is not a multiple of downsample {downsample}"
        )
    grid = stage.resolution // downsample
    num_workers = max(1, data_cfg.num_workers)
    register_s3_scheme(data_cfg.s3_endpoint)
    ctx = StreamContext(
        seed=seed,
        stage=stage.index,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=num_workers,
        grid=grid,
        text_size=vocab.text_size,
        codebook_size=vocab.codebook_size,
        caption_len=stage.caption_len,
        shuffle_buffer=data_cfg.shuffle_buffer,
        shards_per_window=shards_per_window,
        max_error_rate=data_cfg.max_error_rate,
        resample_shards=data_cfg.resample_shards,
        endpoint_url=data_cfg.s3_endpoint,
    )
    specs: list[SourceSpec] = []
    if not data_cfg.synthetic:
        if not stage.sources:
            raise DataSourceError(
                f"stage {stage.name} has no data sources; add [[curriculum.stages.sources]] "
                "(or data.sources) or set data.synthetic = true"
            )
        for i, src in enumerate(stage.sources):
            if src.weight <= 0:
                raise DataSourceError(
                    f"stage {stage.name} source {src.url}: weight {src.weight} must be > 0"
                )
            spec = read_source(src.url, src.weight, endpoint_url=data_cfg.s3_endpoint, grid=grid)
            if spec.vocab is None:
                raise DataSourceError(
                    f"source {src.url}: manifest has no vocab layout; re-tokenize with ts-data"
                )
            vocab.check_compatible(spec.vocab, what=f"token shards {src.url}")
            # Raises now, not in a worker, when there are too few shards for ranks x workers.
            epoch_order(
                len(spec.shards),
                dp_size * num_workers,
                seed=seed,
                stage=stage.index,
                source=i,
                epoch=0,
                resample=data_cfg.resample_shards,
            )
            specs.append(spec)
        logger.info(
            "stage %s data: %s",
            stage.name,
            ", ".join(f"{s.url} ({len(s.shards)} shards, weight {s.weight})" for s in specs),
        )
    collator = Collator(
        caption_len=stage.caption_len,
        grid=grid,
        bos_id=vocab.bos_id,
        pad_id=vocab.pad_id,
        boi_id=vocab.boi_id,
        caption_dropout=data_cfg.caption_dropout,
        seed=seed,
        stage=stage.index,
    )
    plan = LoaderPlan(
        ctx=ctx,
        specs=tuple(specs),
        weights=tuple(s.weight for s in specs),
        collator=collator,
        micro_batch=stage.micro_batch,
        synthetic=data_cfg.synthetic,
    )
    return TokenLoader(
        plan,
        stage_name=stage.name,
        processes=data_cfg.num_workers > 0 if processes is None else processes,
        timeout=timeout,
        prefetch_factor=prefetch_factor,
        mp_context=mp_context,
        on_dp_change=on_dp_change,
    )
