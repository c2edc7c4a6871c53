"""The training data loader: elastic, deterministic, exactly resumable micro-batches per DP rank.

    loader = build_loader(cfg.data, stage, vocab, seed=cfg.job.seed, dp_rank=r, dp_size=n,
                          downsample=cfg.tokenizer.downsample)
    loader.load_state_dict(saved)        # this rank's state, or the list of all old ranks'
    batch = next(loader)                 # one micro-batch (see megatron_ts.data.batching)
    ckpt["loader"] = loader.state_dict() # per DP rank
    loader.metrics()                     # samples/s, data-wait fraction, bytes, retries, skipped

The global sample order of a stage is a function of (seed, stage, data.streams) and the data
only (`megatron_ts.data.order`): optimizer step t consumes the same set of samples whatever the
DP size, micro-batch and worker count, and a resume at another layout continues right after
the last consumed sample. Every TP rank and pipeline stage of one DP group that builds a loader
gets the same batches. Each logical worker reads the lanes it owns and contributes their
samples to every micro-batch; the main process takes one chunk per worker, in worker order
(torch DataLoader's in-order delivery, or a plain loop when `num_workers = 0` /
`processes=False`), never in order of arrival, and collates the micro-batch.
"""

from __future__ import annotations

import atexit
import inspect
import itertools
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_ts.config import DataConfig, ResolvedStage
from megatron_ts.data.batching import Collator
from megatron_ts.data.order import LaneCounter, Layout, Mixture, lane_positions_before
from megatron_ts.data.pipeline import (
    ErrorTracker,
    SourceStream,
    StreamContext,
    StreamReader,
    synthetic_sample,
)
from megatron_ts.data.sources import DataSourceError, SourceSpec, epoch_order, read_source
from megatron_ts.data.state import STATE_FORMAT, LoaderStateError, WorkerState
from megatron_ts.logging import get_logger
from megatron_ts.storage import IOCounters, register_s3_scheme
from megatron_ts.vocab import VocabLayout

logger = get_logger(__name__)

AUTO_STREAMS_MAX = 64
"""`data.streams = 0` picks the largest power of two <= min(shards of any source, this)."""

# Loaders with live worker processes, closed at interpreter exit before torch's own handlers run
# (atexit is last-in first-out), so that exiting never waits on a worker.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


def auto_streams(shard_counts: list[int]) -> int:
    """The lane count for `data.streams = 0`: from the data only, never from the layout.

    A power of two so that the usual DP sizes divide it (then no lane is read by two ranks).
    """
    n = min([AUTO_STREAMS_MAX, *shard_counts])
    return 1 << (max(1, n).bit_length() - 1)


@dataclass(frozen=True)
class LoaderPlan:
    """What a worker process needs to rebuild its streams (picklable)."""

    ctx: StreamContext
    specs: tuple[SourceSpec, ...]
    mixture: Mixture
    """Weights of the (sub-)sources, and the bucket of each with aspect-ratio buckets."""
    collator: Collator
    micro_batch: int
    synthetic: bool
    synthetic_grids: tuple[tuple[int, int], ...] = ()
    """Synthetic data with buckets: the grid of each bucket (`mixture` draws one per step)."""


def worker_chunks(
    plan: LoaderPlan, layout: Layout, worker: int, state: WorkerState, batch: int
) -> Iterator[dict]:
    """This worker's part of every micro-batch from number `batch` on.

    Yields {"samples": [(slot j, Sample), ...], "_state": the worker state after it}; the
    samples are those of the micro-batch's positions whose lane this worker owns.
    """
    register_s3_scheme(plan.ctx.endpoint_url)
    ctx = plan.ctx
    tracker = ErrorTracker(
        ctx.max_error_rate,
        seen=state.seen,
        skipped=state.skipped,
        missing_shards=state.missing_shards,
        counters=IOCounters(state.bytes_read, state.retries),
    )

    def new_lane(c: int, n: int = 0, counts: list[int] | None = None) -> LaneCounter:
        return LaneCounter(c, ctx.streams, plan.mixture, ctx.seed, ctx.stage, n, counts)

    def new_reader(s: int, c: int, index: int = 0, cursor=(0, 0, 0)) -> StreamReader:
        return StreamReader(SourceStream(ctx, plan.specs[s], s, c, tracker), index, cursor)

    lanes = {c: new_lane(c, n, counts) for c, n, counts in state.lanes}
    readers = {(s, c): new_reader(s, c, i, (e, w, o)) for s, c, i, e, w, o in state.readers}
    mine = set(layout.worker_lanes(worker))
    for k in itertools.count(batch):
        chunk = []
        for j in range(plan.micro_batch):
            p = layout.position(k, j)
            c = p % ctx.streams
            if c not in mine:
                continue
            if plan.synthetic:
                tracker.ok()
                grid = None
                if plan.synthetic_grids:
                    grid = plan.synthetic_grids[plan.mixture.bucket_of(p, ctx.seed, ctx.stage)]
                chunk.append((j, synthetic_sample(ctx, p, grid)))
                continue
            if c not in lanes:
                lanes[c] = new_lane(c)  # counting from lane position 0 is always right
            s, i = lanes[c].take(p)
            if (s, c) not in readers:
                readers[(s, c)] = new_reader(s, c)  # reads forward from the stream's start
            chunk.append((j, readers[(s, c)].get(i)))
        yield {
            "samples": chunk,
            "_state": WorkerState(
                lanes=[lanes[c].entry() for c in sorted(lanes)],
                readers=[[s, c, r.index, *r.cursor] for (s, c), r in sorted(readers.items())],
                seen=tracker.seen,
                skipped=tracker.skipped,
                missing_shards=tracker.missing_shards,
                bytes_read=tracker.counters.bytes_read,
                retries=tracker.counters.retries,
            ).to_dict(),
        }


def _as_is(item):
    """DataLoader collate_fn: keep the chunk as the worker built it (numpy, no tensors)."""
    return item


class _WorkerDataset(IterableDataset):
    """DataLoader worker i plays logical worker i, from its state and micro-batch `batch` on."""

    def __init__(self, plan: LoaderPlan, layout: Layout, states: list[dict], batch: int):
        super().__init__()
        self.plan, self.layout, self.states, self.batch = plan, layout, states, batch

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        # One thread per worker: several torch intra-op threads per worker only contend on
        # the CPU cores the trainer needs.
        torch.set_num_threads(1)
        state = WorkerState.from_dict(self.states[w])
        return worker_chunks(self.plan, self.layout, w, state, self.batch)


class TokenLoader:
    """Iterator over fixed-shape micro-batches of one DP rank, with exact and elastic resume.

    Build it with `build_loader`. Not thread-safe; one per process and stage.
    """

    def __init__(
        self,
        plan: LoaderPlan,
        layout: Layout,
        *,
        stage_name: str,
        processes: bool,
        timeout: float,
        prefetch_factor: int,
        mp_context: str | None,
    ):
        self.plan = plan
        self.layout = layout
        self.stage_name = stage_name
        self.processes = processes
        self.timeout = timeout
        self.prefetch_factor = prefetch_factor
        self.mp_context = mp_context
        self.num_workers = layout.num_workers
        self._workers = [WorkerState().to_dict() for _ in range(self.num_workers)]
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
        if self.processes:
            dataset = _WorkerDataset(
                self.plan, self.layout, [dict(s) for s in self._workers], self._batches
            )
            kwargs = {}
            if "in_order" in inspect.signature(DataLoader).parameters:  # torch >= 2.6
                kwargs["in_order"] = True  # item i from worker i % W, whatever finishes first
            loader = DataLoader(
                dataset,
                batch_size=None,
                collate_fn=_as_is,
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
                worker_chunks(
                    self.plan,
                    self.layout,
                    w,
                    WorkerState.from_dict(self._workers[w]),
                    self._batches,
                )
                for w in range(self.num_workers)
            ]

            def round_robin() -> Iterator[dict]:
                while True:
                    for gen in gens:
                        yield next(gen)

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
            chunks = [next(self._it) for _ in range(self.num_workers)]
        except BaseException:
            self.close()  # stop worker processes now, not whenever the loader is collected
            raise
        group: list = [None] * self.plan.micro_batch
        for chunk in chunks:
            for j, sample in chunk["samples"]:
                group[j] = sample
        if any(s is None for s in group):  # a bug in the lane ownership, never the data
            raise RuntimeError(f"micro-batch {self._batches}: slots without a sample")
        batch = self.plan.collator(group)
        t1 = time.perf_counter()
        self._t_wait += t1 - t0
        self._last_return = t1
        self._workers = [dict(chunk["_state"]) for chunk in chunks]
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

    def bucket_shares(self) -> dict[str, float]:
        """{bucket: share of the steps drawn from it}; {} for a stage without buckets."""
        names = [s.bucket for s in self.plan.specs]
        if self.plan.synthetic or not self.plan.mixture.groups or None in names:
            return {}
        total = sum(self.plan.mixture.weights)
        out: dict[str, float] = {}
        for name, weight in zip(names, self.plan.mixture.weights):
            out[name] = out.get(name, 0.0) + weight / total
        return out

    # -- state ----------------------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Samples of the stage taken by all DP ranks up to this rank's last micro-batch."""
        lay = self.layout
        return lay.start + self._batches * lay.dp_size * lay.micro_batch

    def state_dict(self) -> dict:
        """The position after the last micro-batch returned by `next()` (JSON-able)."""
        c, lay = self.plan.ctx, self.layout
        return {
            "format": STATE_FORMAT,
            "seed": c.seed,
            "stage": c.stage,
            "stage_name": self.stage_name,
            "sources": [s.label for s in self.plan.specs],
            "synthetic": self.plan.synthetic,
            "streams": c.streams,
            "dp_rank": lay.dp_rank,
            "dp_size": lay.dp_size,
            "num_workers": lay.num_workers,
            "micro_batch": lay.micro_batch,
            "start": lay.start,
            "batches": self._batches,
            "consumed": self.consumed,
            "workers": [WorkerState.from_dict(w).to_dict() for w in self._workers],
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restores a position saved by `state_dict`, at this layout or another one.

        Args:
            state: this rank's saved state (same layout), or the list of every old DP rank's
                state (any DP size, micro-batch and worker count; the checkpoint's
                `loader/dp_*.json`).

        Raises:
            LoaderStateError: the state belongs to another seed, stage, source list or
                `data.streams`, is of the old format, or (at another layout) the list is
                incomplete or its ranks disagree on the consumed position.
        """
        states = state if isinstance(state, list) else [state]
        if not states:
            raise LoaderStateError("empty loader state list")
        c, lay = self.plan.ctx, self.layout
        for st in states:
            _check_format(st)
            for name, mine in (
                ("seed", c.seed),
                ("stage", c.stage),
                ("sources", [s.label for s in self.plan.specs]),
                ("synthetic", self.plan.synthetic),
                ("streams", c.streams),
            ):
                if st.get(name) != mine:
                    what = "data.streams" if name == "streams" else name
                    raise LoaderStateError(
                        f"loader state has {what} = {st.get(name)!r} but this loader has "
                        f"{mine!r}; resume with the configuration the checkpoint was saved with "
                        "(or start the stage's data afresh without loading the loader state)"
                    )
        layouts = {(st["dp_size"], st["num_workers"], st["micro_batch"]) for st in states}
        if len(layouts) > 1:
            raise LoaderStateError(f"loader states of different layouts {sorted(layouts)}")
        old_dp, old_w, old_mb = layouts.pop()
        if (old_dp, old_w, old_mb) == (lay.dp_size, lay.num_workers, lay.micro_batch):
            mine = [s for s in states if s["dp_rank"] == lay.dp_rank]
            if not mine:
                have = sorted(s["dp_rank"] for s in states)
                raise LoaderStateError(
                    f"loader state for dp_rank {lay.dp_rank} needed, got states of dp ranks "
                    f"{have}; pass this rank's own saved state or the list of all ranks' states"
                )
            self._restore(mine[0]["start"], mine[0]["batches"], mine[0]["workers"])
            return
        change = (
            f"dp_size {old_dp} -> {lay.dp_size}, num_workers {old_w} -> {lay.num_workers}, "
            f"micro_batch {old_mb} -> {lay.micro_batch}"
        )
        ranks = sorted(s["dp_rank"] for s in states)
        if ranks != list(range(old_dp)):
            raise LoaderStateError(
                f"the data layout changed ({change}): pass the list of all {old_dp} old DP "
                f"ranks' loader states (checkpoint loader/dp_*.json); got dp ranks {ranks}"
            )
        consumed = {s["consumed"] for s in states}
        if len(consumed) > 1:
            raise LoaderStateError(
                f"the old DP ranks' loader states are at different positions {sorted(consumed)} "
                "(consumed samples); they were not saved at the same optimizer step"
            )
        start = consumed.pop()
        self.layout = Layout(
            lay.dp_rank, lay.dp_size, lay.micro_batch, lay.num_workers, c.streams, start
        )
        logger.info(
            "data layout changed (%s): continuing the stage's sample order at position %d",
            change,
            start,
        )
        self._restore(start, 0, self._relayout(states))

    def _relayout(self, states: list[dict]) -> list[dict]:
        """Worker states of this layout at `self.layout.start` from the old ranks' states.

        Each lane this rank's workers read starts from the old lane entry with the largest n at
        or before the resume point, and each stream from the old reader entry with the largest
        index at or before the one needed next (a stream without one starts at its beginning);
        readers read forward from there.

        The old workers' counters (samples seen, skipped, missing shards, bytes, retries) are
        dealt out over the new layout's dp_size x num_workers workers, so that their sums over
        all ranks are unchanged and each worker's error rate starts where the run's was.
        """
        c, lay = self.plan.ctx, self.layout
        lane_entries: dict[int, list[tuple[int, list[int]]]] = {}
        reader_entries: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
        totals = dict.fromkeys(WorkerState.COUNTERS, 0)
        for st in states:
            for w in st["workers"]:
                ws = WorkerState.from_dict(w)
                for name in totals:
                    totals[name] += getattr(ws, name)
                for lane, n, counts in ws.lanes:
                    lane_entries.setdefault(lane, []).append((n, counts))
                for s, lane, index, *cursor in ws.readers:
                    reader_entries.setdefault((s, lane), []).append((index, cursor))
        out = []
        slots = lay.dp_size * lay.num_workers
        for w in range(lay.num_workers):
            slot = lay.dp_rank * lay.num_workers + w
            ws = WorkerState(**{k: v // slots + (slot < v % slots) for k, v in totals.items()})
            for lane in [] if self.plan.synthetic else lay.worker_lanes(w):
                target = lane_positions_before(lay.start, lane, c.streams)
                known = [e for e in lane_entries.get(lane, []) if e[0] <= target]
                n, counts = max(known, key=lambda e: e[0]) if known else (0, None)
                counter = LaneCounter(
                    lane, c.streams, self.plan.mixture, c.seed, c.stage, n, counts
                )
                counter.advance(target)
                ws.lanes.append(counter.entry())
                for s, need in enumerate(counter.counts):
                    known_r = [e for e in reader_entries.get((s, lane), []) if e[0] <= need]
                    if known_r:
                        index, cursor = max(known_r, key=lambda e: e[0])
                        ws.readers.append([s, lane, index, *cursor])
            out.append(ws.to_dict())
        return out

    def _restore(self, start: int, batches: int, workers: list[dict]) -> None:
        self.close()
        lay = self.layout
        self.layout = Layout(
            lay.dp_rank, lay.dp_size, lay.micro_batch, lay.num_workers, lay.lanes, int(start)
        )
        self._batches = int(batches)
        self._workers = [WorkerState.from_dict(w).to_dict() for w in workers]

    # -- metrics --------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Loader metrics; rates cover the time since the previous call.

        Returns:
            samples_per_s, data_wait_fraction (time in `next()` / time between first and last
            `next()` of the interval), bytes_read, retries, skipped_samples, missing_shards,
            samples_read, batches, epoch (lowest current epoch over the streams being read).
        """
        now = time.perf_counter()
        elapsed = max(now - self._t_mark, 1e-9)
        total = self._t_wait + self._t_busy
        epochs = [r[3] for w in self._workers for r in w["readers"]]
        out = {
            "samples_per_s": self._n_samples / elapsed,
            "data_wait_fraction": self._t_wait / total if total > 0 else 0.0,
            "bytes_read": sum(w["bytes_read"] for w in self._workers),
            "retries": sum(w["retries"] for w in self._workers),
            "skipped_samples": sum(w["skipped"] for w in self._workers),
            "missing_shards": sum(w["missing_shards"] for w in self._workers),
            "samples_read": sum(w["seen"] for w in self._workers),
            "batches": self._batches,
            "epoch": min(epochs) if epochs else 0,
        }
        self._t_wait = self._t_busy = 0.0
        self._n_samples = 0
        self._t_mark = now
        return out


def _check_format(state: dict) -> None:
    fmt = state.get("format")
    if fmt == "megatron_ts.loader/1":
        raise LoaderStateError(
            "loader state format 'megatron_ts.loader/1' was saved by an older version whose "
            "sample order depended on the DP size and worker count; this loader reads "
            f"{STATE_FORMAT!r} and cannot continue that order. Finish the stage with the "
            "version that saved it, or start the stage's data afresh from the checkpoint's "
            "weights and optimizer (checkpoint.load = that checkpoint, "
            "checkpoint.load_optimizer = true)"
        )
    if fmt != STATE_FORMAT:
        raise LoaderStateError(f"loader state format {fmt!r}; this loader reads {STATE_FORMAT!r}")


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
    shards_per_group: int = 4,
    timeout: float = 900.0,
    prefetch_factor: int = 4,
    mp_context: str | None = None,
) -> TokenLoader:
    """Builds the loader of one DP rank for one stage; checks the data before any step.

    Args:
        data_cfg: the [data] section (workers, streams, shuffle buffer, dropout, error rate, S3).
        stage: the resolved stage (resolution, caption_len, micro_batch, sources).
        vocab: the model's vocabulary layout; every source's manifest must match it.
        seed: run seed (job.seed).
        dp_rank: this rank's data-parallel rank.
        dp_size: data-parallel size.
        downsample: pixels per code (tokenizer.downsample); grid = resolution // downsample, or
            each bucket's size // downsample with aspect-ratio buckets.
        processes: use worker processes (default: when data_cfg.num_workers > 0). With False the
            same `max(1, num_workers)` logical workers run in this process: same batches.
        shards_per_group: shards read interleaved (and replayed on resume) per stream.
        timeout: seconds a worker process may take for one chunk before the loader raises
            instead of hanging.
        prefetch_factor: chunks each worker process prepares ahead.
        mp_context: multiprocessing start method for workers (None: torch's default).

    Returns:
        The loader, positioned at the start of the stage's sample order.

    Raises:
        DataSourceError: unreadable manifest, wrong grid, fewer shards than data.streams.
        VocabMismatchError: a source was tokenized with another vocabulary than the model's.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size = {dp_size})")
    if not 0.0 <= data_cfg.caption_dropout < 1.0:
        raise ValueError(f"data.caption_dropout = {data_cfg.caption_dropout}; use 0 <= p < 1")
    if data_cfg.streams < 0:
        raise ValueError(f"data.streams = {data_cfg.streams}; use 0 (auto) or more")
    try:
        sequence = stage.layout(downsample)  # grid and prompt format (not the DP `Layout`)
        grids = {name: lay.grid for name, lay in stage.layouts(downsample).items()}
    except ValueError as exc:
        raise ValueError(f"stage {stage.name}: {exc}") from exc
    grid = sequence.grid
    bucket_names = list(grids) if stage.buckets else []
    num_workers = max(1, data_cfg.num_workers)
    register_s3_scheme(data_cfg.s3_endpoint)
    specs: list[SourceSpec] = []
    if not data_cfg.synthetic:
        if not stage.sources:
            raise DataSourceError(
                f"stage {stage.name} has no data sources; add [[curriculum.stages.sources]] "
                "(or data.sources) or set data.synthetic = true"
            )
        for src in stage.sources:
            if src.weight <= 0:
                raise DataSourceError(
                    f"stage {stage.name} source {src.url}: weight {src.weight} must be > 0"
                )
            got = read_source(
                src.url,
                src.weight,
                endpoint_url=data_cfg.s3_endpoint,
                grid=None if bucket_names else grid,
                buckets=grids if bucket_names else None,
                buckets_field=f"the buckets of stage {stage.name}",
            )
            vocab.check_compatible(got[0].vocab, what=f"token shards {src.url}")
            specs.extend(got)
    streams = data_cfg.streams or (
        auto_streams([len(s.shards) for s in specs]) if specs else AUTO_STREAMS_MAX
    )
    for i, spec in enumerate(specs):
        try:  # raises now, not in a worker, when a source has too few shards for the streams
            epoch_order(
                len(spec.shards),
                streams,
                seed=seed,
                stage=stage.index,
                source=i,
                epoch=0,
                resample=data_cfg.resample_shards,
            )
        except DataSourceError as exc:
            raise DataSourceError(f"source {spec.label}: {exc}") from exc
    if specs:
        logger.info(
            "stage %s data (%d streams): %s",
            stage.name,
            streams,
            ", ".join(f"{s.label} ({len(s.shards)} shards, weight {s.weight:.4g})" for s in specs),
        )
    layout = Layout(dp_rank, dp_size, stage.micro_batch, num_workers, streams, 0)
    if layout.read_amplification > 1 and dp_rank == 0:
        logger.warning(
            "data.streams = %d is not a multiple of the DP size %d: every stream is read by %d "
            "ranks (read amplification %dx); use a multiple of the DP size for data.streams "
            "(it changes the sample order like the seed)",
            streams,
            dp_size,
            layout.read_amplification,
            layout.read_amplification,
        )
    busy = len(layout.rank_lanes())
    if busy < num_workers and dp_rank == 0:
        logger.warning(
            "%d of data.num_workers = %d workers per rank have streams to read (%d streams, DP "
            "size %d); the others idle",
            busy,
            num_workers,
            streams,
            dp_size,
        )
    ctx = StreamContext(
        seed=seed,
        stage=stage.index,
        streams=streams,
        grid=grid,
        text_size=vocab.text_size,
        codebook_size=vocab.codebook_size,
        caption_len=stage.caption_len,
        shuffle_buffer=data_cfg.shuffle_buffer,
        shards_per_group=shards_per_group,
        max_error_rate=data_cfg.max_error_rate,
        resample_shards=data_cfg.resample_shards,
        endpoint_url=data_cfg.s3_endpoint,
    )
    collator = Collator(
        layout=sequence,
        vocab=vocab,
        caption_dropout=data_cfg.caption_dropout,
        seed=seed,
        stage=stage.index,
    )
    if data_cfg.synthetic:  # buckets equally likely
        groups = tuple(range(len(bucket_names)))
        mixture = Mixture((1.0,) * len(groups) or (1.0,), groups, stage.global_batch)
    else:
        groups = tuple(bucket_names.index(s.bucket) for s in specs) if bucket_names else ()
        mixture = Mixture(tuple(s.weight for s in specs) or (1.0,), groups, stage.global_batch)
    plan = LoaderPlan(
        ctx=ctx,
        specs=tuple(specs),
        mixture=mixture,
        synthetic_grids=tuple(grids.values()) if data_cfg.synthetic and bucket_names else (),
        collator=collator,
        micro_batch=stage.micro_batch,
        synthetic=data_cfg.synthetic,
    )
    return TokenLoader(
        plan,
        layout,
        stage_name=stage.name,
        processes=data_cfg.num_workers > 0 if processes is None else processes,
        timeout=timeout,
        prefetch_factor=prefetch_factor,
        mp_context=mp_context,
    )
