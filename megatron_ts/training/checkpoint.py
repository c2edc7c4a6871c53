"""Atomic, layout-independent checkpoints of a training run.

A save is collective. Every rank writes into `checkpoints/.tmp-step_N/`: per-(layer, TP rank)
model files (megatron_ts.checkpoint.model_files), the AdamW state in the same layout
(megatron_ts.training.optimizer_state) and, with `train.ema_decay`, the weights' moving
average (`model_ema/`), the loader state of each DP rank and every rank's RNG state, all of it
safetensors or JSON. Rank 0 then writes meta.json, every rank hashes a share of the files into
checksums.json, rank 0 renames the directory to `step_N`, writes COMPLETE and moves `latest`.
A crash at any point leaves `latest` on the previous complete checkpoint; leftovers are removed
at the next start. Any layout (TP, PP, DP, ZeRO stage) resumes any checkpoint with its
optimizer state; docs/checkpoint.md specifies the format.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_ts.checkpoint.integrity import (
    CHECKSUMS_FILE,
    damaged_error,
    file_digest,
    list_files,
    problems,
    read_checksums,
    write_checksums,
)
from megatron_ts.checkpoint.model_files import (
    COMPLETE_FILE,
    EMA_DIR,
    MODEL_DIR,
    CheckpointError,
    has_ema,
    load_into_model,
    mark_complete,
    read_meta,
    resolve_checkpoint,
    write_layer_file,
    write_meta,
)
from megatron_ts.logging import get_logger
from megatron_ts.training.nonfinite import check_weights_finite
from megatron_ts.training.optimizer_state import (
    has_optimizer_state,
    load_optimizer_state,
    save_optimizer_state,
)

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
HISTORY_STEPS = 1000  # meta.json is rewritten at every save: keep it small at 10^6 steps


@dataclass
class TrainState:
    """Where the run is; saved in meta.json and restored on resume."""

    global_step: int = 0
    """Optimizer steps taken over all stages."""
    stage_index: int = 0
    """Curriculum stage the next step belongs to."""
    stage_step: int = 0
    """Steps taken inside the current stage."""
    consumed_samples: int = 0
    """Samples consumed over all stages."""
    stage_samples: int = 0
    """Samples consumed inside the current stage."""
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite loss or gradients)."""
    nonfinite_in_row: int = 0
    """Consecutive skipped steps at the time of the save."""
    history: list = field(default_factory=list)
    """(global_step, loss) of the last HISTORY_STEPS steps (metrics.jsonl keeps every step)."""

    def record(self, loss: float, step: int | None = None) -> None:
        """Appends a step's loss (default: this step's) to the bounded history."""
        self.history.append([self.global_step if step is None else step, loss])
        del self.history[:-HISTORY_STEPS]


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def clean_incomplete(run_dir: str | Path) -> None:
    """Rank 0 removes partial saves left by a crash (never a complete checkpoint)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir() or dist.get_rank() != 0:
        return
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith(".tmp-") or not (path / COMPLETE_FILE).exists()):
            log.warning("removing incomplete checkpoint %s (interrupted save)", path)
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run, or None for a fresh run."""
    root = checkpoint_root(run_dir)
    if not root.is_dir() or not any(p.name.startswith("step_") for p in root.iterdir()):
        return None
    return resolve_checkpoint(root)


RNG_FORMAT = "megatron_ts.rng/1"
"""Format tag in the metadata of `rng/rank_RRRRR.safetensors`."""


def rng_file(ckpt_dir: Path, rank: int) -> Path:
    """A rank's RNG state file of a step directory."""
    return Path(ckpt_dir) / "rng" / f"rank_{rank:05d}.safetensors"


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_rng(path: Path, state: dict) -> None:
    """Writes `_rng_state()` as safetensors: data, never code (a pickle runs code when read).

    Tensors: `torch` and `cuda` (the generators' uint8 state), `python_mt` (the 625 ints of
    `random.getstate()[1]`: 624 MT19937 words and the index) and `numpy_key` (the 624 words of the
    numpy MT19937 key), both int64. Metadata (JSON strings): `python` {version, gauss_next},
    `numpy` {bit_generator, pos, has_gauss, cached_gaussian}; JSON floats round-trip exactly.
    """
    version, words, gauss_next = state["python"]
    bit_generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
    tensors = {
        "torch": state["torch"].contiguous(),
        "python_mt": torch.tensor(words, dtype=torch.int64),
        "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
    }
    if "cuda" in state:
        tensors["cuda"] = state["cuda"].cpu().contiguous()
    metadata = {
        "format": RNG_FORMAT,
        "python": json.dumps({"version": version, "gauss_next": gauss_next}),
        "numpy": json.dumps(
            {
                "bit_generator": bit_generator,
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            }
        ),
    }
    save_file(tensors, str(path), metadata=metadata)


def _read_rng(path: Path) -> dict:
    """The state `_write_rng` wrote, in `_rng_state()`'s form; ValueError when it is not one."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    if metadata.get("format") != RNG_FORMAT:
        raise ValueError(f"format {metadata.get('format')!r}, expected {RNG_FORMAT!r}")
    python = json.loads(metadata["python"])
    numpy = json.loads(metadata["numpy"])
    state = {
        "python": (
            python["version"],
            tuple(int(w) for w in tensors["python_mt"].tolist()),
            python["gauss_next"],
        ),
        "numpy": (
            numpy["bit_generator"],
            tensors["numpy_key"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        ),
        "torch": tensors["torch"],
    }
    if "cuda" in tensors:
        state["cuda"] = tensors["cuda"]
    return state


def _restore_rng(ckpt_dir: Path, rank: int) -> None:
    """Restores this rank's RNG state; never unpickles (an old `rng/*.pt` is tried as weights
    only and otherwise skipped with a warning: that resume is not bit-exact)."""
    path = rng_file(ckpt_dir, rank)
    if path.is_file():
        _set_rng_state(_read_part(path, ckpt_dir, _read_rng))
        return
    old = path.with_suffix(".pt")
    if not old.is_file():
        return
    try:
        # python tuples and numpy arrays are not among the types weights_only admits: this
        # fails for the files older versions wrote, and it never runs code from the file
        _set_rng_state(torch.load(old, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - refused pickles raise assorted errors
        log.warning(
            "%s is a pickle from an older version and is not unpickled (a pickle can run code; "
            "%s): the RNG state is not restored, so this resume is not bit-exact",
            old,
            type(err).__name__,
        )


def save_checkpoint(
    run_dir: str | Path,
    stage_engine,
    state: TrainState,
    loader_state: dict | None,
    meta_extra: dict,
    keep_last: int,
) -> Path:
    """Collective save of the current step; returns the final directory.

    Args:
        run_dir: the run directory.
        stage_engine: the StageEngine being trained.
        state: the train state after the last step.
        loader_state: this rank's loader state (None on ranks without a loader).
        meta_extra: config, stage and spec data for meta.json.
        keep_last: complete checkpoints kept; older ones are deleted after this save.
    """
    root = checkpoint_root(run_dir)
    name = f"step_{state.global_step:08d}"
    tmp = root / f".tmp-{name}"
    check_weights_finite(stage_engine.local_layers, f"checkpoint {root / name}")
    try:
        return _write_checkpoint(
            root, name, stage_engine, state, loader_state, meta_extra, keep_last
        )
    except Exception as err:
        # torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos");
        # name the condition so the one-line report says what to do. `latest` is untouched.
        if not isinstance(err, OSError) and _nearly_full(root):
            raise OSError(errno.ENOSPC, f"no space left saving {tmp}", str(tmp)) from err
        raise


def _nearly_full(path: Path) -> bool:
    """Less than 16 MiB (or 0.1%) free where `path` lives."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < max(16 << 20, usage.total // 1000)


def _write_checkpoint(
    root: Path,
    name: str,
    stage_engine,
    state: TrainState,
    loader_state: dict | None,
    meta_extra: dict,
    keep_last: int,
) -> Path:
    tmp = root / f".tmp-{name}"
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "loader").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    start = time.perf_counter()
    engine = stage_engine.engine
    optimizer_meta = save_optimizer_state(stage_engine, tmp)

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    params = [p for m in stage_engine.local_layers.values() for p in m.parameters()]
    with _gathered(params, engine):
        if dp_rank == 0:
            for idx, module in stage_engine.local_layers.items():
                write_layer_file(module, idx, tp_rank, tmp / MODEL_DIR)
    ema = getattr(stage_engine, "ema", None)
    if ema is not None:  # partitioned over DP ranks: every one sends its slice, DP rank 0 writes
        with ema.swapped(to_rank=0):
            if dp_rank == 0:
                for idx, module in stage_engine.local_layers.items():
                    write_layer_file(module, idx, tp_rank, tmp / EMA_DIR)
    if (
        loader_state is not None
        and tp_rank == 0
        and parallel_state.get_pipeline_model_parallel_rank() == 0
    ):
        (tmp / "loader" / f"dp_{dp_rank:05d}.json").write_text(json.dumps(loader_state))
    _write_rng(rng_file(tmp, rank), _rng_state())
    dist.barrier()
    final = root / name
    if rank == 0:
        write_meta(
            tmp,
            {
                "step": state.global_step,
                "train_state": asdict(state),
                "layout": layout_of(stage_engine),
                "model_spec": stage_engine.spec.to_dict(),
                "optimizer": optimizer_meta,
                **({"ema": {"decay": ema.decay, "updates": ema.updates}} if ema else {}),
                **meta_extra,
            },
        )
    _record_checksums(tmp)
    if rank == 0:
        if final.exists():  # a re-save of the same step (e.g. the end-of-stage save)
            shutil.rmtree(final)
        tmp.rename(final)
        mark_complete(final, update_latest=True)
        _prune(root, keep_last)
        log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - start)
    dist.barrier()
    return final


def _record_checksums(tmp: Path) -> None:
    """Collective: every rank hashes its share of the files; rank 0 writes checksums.json."""
    listing = [list_files(tmp) if dist.get_rank() == 0 else None]  # rank 0 lists, all agree
    dist.broadcast_object_list(listing, src=0)
    mine = listing[0][dist.get_rank() :: dist.get_world_size()]
    digests = {rel: file_digest(tmp / rel) for rel in mine}
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    if dist.get_rank() == 0:
        write_checksums(tmp, {k: v for part in gathered for k, v in part.items()})


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Collective: every file of `ckpt_dir` against checksums.json, each rank a share of them.

    Raises:
        CheckpointError: on every rank, naming the damaged files and the checkpoint to fall
            back to.
    """
    recorded: list = [None]
    if dist.get_rank() == 0:
        try:
            recorded[0] = read_checksums(ckpt_dir) or {}
        except CheckpointError as err:
            recorded[0] = str(err)  # every rank raises it, none waits in a collective
    dist.broadcast_object_list(recorded, src=0)
    if isinstance(recorded[0], str):
        raise CheckpointError(recorded[0])
    if not recorded[0]:
        log.warning("%s has no %s: its files are read unverified", ckpt_dir, CHECKSUMS_FILE)
        return
    paths = sorted(recorded[0])[dist.get_rank() :: dist.get_world_size()]
    found = problems(ckpt_dir, recorded[0], paths)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, found)
    found = [p for part in gathered for p in part]
    if found:
        raise damaged_error(ckpt_dir, found)


class _gathered:
    """ZeRO-3 partitions parameters; gather them (collectively) to write full layer files."""

    def __init__(self, params, engine):
        self.ctx = None
        if engine.zero_optimization_stage() == 3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(
        p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE_FILE).exists()
    )
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def layout_of(stage_engine) -> dict:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
        "zero_stage": stage_engine.engine.zero_optimization_stage(),
    }


def _rank_layout(layout: dict) -> tuple:
    """What decides which rank holds which RNG streams and data: (TP, PP, DP). The ZeRO stage is
    not part of it: the optimizer state is layout-free either way, and the stage in effect may
    differ for the same config (stage 0 at DP = 1, `effective_zero_stage`)."""
    return layout["tensor"], layout["pipeline"], layout["data"]


def load_checkpoint(
    ckpt_dir: Path,
    stage_engine,
    load_optimizer: bool,
    allow_missing: tuple[str, ...] = (),
    load_average: bool = False,
    load_rng: bool = True,
    verified: bool = False,
) -> tuple[list[dict], str]:
    """Restores weights, and the optimizer when asked, into `stage_engine` on any layout.

    The per-layer files are resharded into this run's layout (TP merge/split, this rank's
    pipeline layers, ZeRO partitions), for the weights and for the AdamW state alike. An
    engine with a weight average (`stage_engine.ema`) reads it from `model_ema/` when
    `load_average` (a resume inside a stage) and the checkpoint has one; otherwise the average
    restarts at the loaded weights. Every rank's RNG state is restored when the layout is the
    one saved, unless `load_rng` is False (a `checkpoint.load` of another run).

    Returns:
        (every saved DP rank's loader state, ordered by DP rank; [] when none was saved,
        mode): mode is "exact" (same layout: weights, optimizer, RNG), "resharded" (another
        layout: weights and optimizer) or "weights". The train state is the caller's to read
        from meta.json (`Trainer.run` does, before building the engine).

    `verified`: the caller has just run `verify_checkpoint(ckpt_dir)` (the trainer does at
    start, before it builds anything, so a damaged checkpoint fails in seconds); the files are
    not hashed again.
    """
    if not verified:
        verify_checkpoint(ckpt_dir)
    meta = read_meta(ckpt_dir)
    same_layout = _rank_layout(meta["layout"]) == _rank_layout(layout_of(stage_engine)) and (
        meta["model_spec"] == stage_engine.spec.to_dict()
    )
    ema = getattr(stage_engine, "ema", None)
    average_loaded = False
    if ema is not None and load_average:
        if has_ema(ckpt_dir):
            _load_weights(stage_engine, ckpt_dir, allow_missing, "ema")
            ema.capture()
            ema.updates = int((meta.get("ema") or {}).get("updates", 0))
            average_loaded = True
        else:
            log.warning(
                "%s holds no %s/: the weight average restarts from the resumed weights",
                ckpt_dir,
                EMA_DIR,
            )
    _load_weights(stage_engine, ckpt_dir, allow_missing, "raw")
    _refresh_optimizer_master(stage_engine.engine)
    mode = "weights"
    if load_optimizer and has_optimizer_state(ckpt_dir, meta):
        left = load_optimizer_state(stage_engine, ckpt_dir, meta, allow_missing)
        if left:
            log.info("optimizer state starts fresh for %d new parameters: %s", len(left), left[:4])
        engine = stage_engine.engine
        engine.global_steps = int(meta["train_state"]["global_step"])
        engine.global_samples = int(meta["train_state"]["consumed_samples"])
        mode = "exact" if same_layout else "resharded"
        if not same_layout:
            log.info(
                "layout %s -> %s: optimizer state resharded",
                meta["layout"],
                layout_of(stage_engine),
            )
    elif load_optimizer and (ckpt_dir / "deepspeed").is_dir():
        log.warning(
            "%s keeps its optimizer state in DeepSpeed's pickle files (format %s), which are "
            "not unpickled (a pickle can run code): the weights are loaded and the optimizer "
            "state starts fresh",
            ckpt_dir,
            meta.get("format"),
        )
    elif load_optimizer:
        log.warning("%s holds no optimizer state: the optimizer starts fresh", ckpt_dir)
    if ema is not None and not average_loaded:
        ema.capture()
    if mode == "exact" and load_rng:
        _restore_rng(ckpt_dir, dist.get_rank())
    loader_states = [
        _read_part(path, ckpt_dir, lambda f: json.loads(f.read_text()))
        for path in sorted((ckpt_dir / "loader").glob("dp_*.json"))
    ]
    return loader_states, mode


def _read_part(path: Path, ckpt_dir: Path, read):
    """`read(path)`, with a damaged file reported as a CheckpointError naming the way back."""
    try:
        return read(path)
    except Exception as err:  # noqa: BLE001 - torch/json raise assorted errors for damaged files
        raise CheckpointError(
            f"checkpoint file damaged ({path}: {type(err).__name__}: {err}): delete {ckpt_dir} "
            "(the run then resumes from the previous checkpoint) or set checkpoint.load to an "
            "earlier step directory"
        ) from err


def _load_weights(stage_engine, ckpt_dir: Path, allow_missing: tuple[str, ...], weights: str):
    """Loads one weight set (`raw` or `ema`) of the layer files into the engine's modules (not
    into the optimizer's master copy: see `_refresh_optimizer_master`)."""
    params = [p for m in stage_engine.local_layers.values() for p in m.parameters()]
    import deepspeed

    ctx = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        if stage_engine.engine.zero_optimization_stage() == 3
        else _gathered([], stage_engine.engine)
    )
    with ctx:
        load_into_model(
            stage_engine.local_layers,
            ckpt_dir,
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            allow_missing=allow_missing,
            weights=weights,
        )


def _refresh_optimizer_master(engine) -> None:
    """After writing weights into the module, copy them into ZeRO's fp32 master partitions."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()
    elif hasattr(optimizer, "_restore_from_bit16_weights"):
        optimizer._restore_from_bit16_weights()
