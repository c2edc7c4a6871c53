"""Process-group set-up shared by training, conversion and tests.

Launch modes: a plain process (world of one on an in-memory store), `torchrun` (RANK,
WORLD_SIZE, MASTER_ADDR/PORT set), or one `srun` task per device (SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID mapped to the torch variables; MASTER_ADDR/PORT as exported by
slurm/train.sbatch, else the step's first node and a port derived from the job id). A process in
an sbatch script but outside any srun step is a world of one: SLURM_NTASKS there describes the
allocation, not the processes that were started (docs/slurm.md).
Then megatron-core's parallel state is created (tp fastest, then dp, then pp), and DeepSpeed
gets an `mpu` view of the same groups.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ts.logging import get_logger

log = get_logger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tasks_on_node(spec: str, node_index: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE ('4(x2),3') -> the task count of node `node_index`."""
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(node_index, len(counts) - 1)]


def _first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list ('gpu[003-004,9]' -> 'gpu003')."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(
            f"MASTER_ADDR is not set and `scontrol show hostnames {nodelist}` failed ({err}); "
            "export MASTER_ADDR (the first node's address) before srun, as slurm/train.sbatch does"
        ) from err
    if not out:
        raise RuntimeError(
            f"`scontrol show hostnames {nodelist}` printed no host; export MASTER_ADDR"
        )
    return out[0]


def _map_slurm_env() -> None:
    """Fills torch.distributed variables from SLURM's in a task started by srun (not torchrun)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if "SLURM_STEP_ID" not in os.environ:
        # The batch script itself (or an salloc shell): one process, whatever the allocation.
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            log.warning(
                "started outside srun in a %s-task allocation: this is a world of one process; "
                "launch one task per device with srun (slurm/train.sbatch)",
                os.environ["SLURM_NTASKS"],
            )
        return
    world = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    if world <= 1 and "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE"))
    if per_node:
        node = int(os.environ.get("SLURM_NODEID", "0"))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(_tasks_on_node(per_node, node)))
    if "MASTER_ADDR" not in os.environ:
        # Every task computes the same head and port; without this each task would be a world
        # of one (the "silent single-process world").
        nodelist = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST"))
        if not nodelist:
            raise RuntimeError("srun task without SLURM_STEP_NODELIST: export MASTER_ADDR")
        os.environ["MASTER_ADDR"] = _first_host(nodelist)
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        step = int(os.environ.get("SLURM_STEP_ID", "0"))
        # below Linux's ephemeral range (32768-60999), where other sockets take their ports
        os.environ["MASTER_PORT"] = str(10000 + (job * 7 + step) % 20000)


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def _local_device(local_rank: int) -> int:
    """The CUDA device of this process: its local rank, or 0 where each task sees one GPU."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:  # srun --gpus-per-task=1 / a per-task CUDA_VISIBLE_DEVICES
        return 0
    raise RuntimeError(
        f"LOCAL_RANK {local_rank} but this process sees {count} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); start one task per "
        "GPU and give each task either all GPUs of its node or exactly one (docs/slurm.md)"
    )


STALE_BUILD_LOCK_S = 600
"""A torch-extension build lock older than this is left by a killed build (DeepSpeed's CPU comm
op builds in 26-66 s here), not held by a running one."""


def _clear_stale_build_lock(name: str = "deepspeed_shm_comm") -> None:
    """Removes the lock a killed extension build left behind, with a warning naming it.

    torch marks a JIT build with an empty `lock` file in the extension's build directory and
    waits, without a timeout, for it to disappear; a process killed mid-build (a preempted job,
    `kill -9`) leaves it there, and every later start then hangs in `deepspeed.init_distributed`
    with no message.
    """
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.stat(lock).st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_S:
        log.warning(
            "removing %s, left %.0f s ago by a build of %s that was killed (torch would wait "
            "for it forever)", lock, age, name,
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def environment_build_cache() -> str | None:
    """The torch-extensions build directory of this Python environment, or None for torch's
    shared default (`~/.cache/torch_extensions`).

    DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op on first use. torch keys the
    build only by Python version and device, so two environments (two venvs, a CI clone's venv,
    another torch version) share one directory and each rebuilds what the other built: 26-66 s
    (200 s under load) before every first step. Inside a virtual or conda environment the build
    goes into `<prefix>/torch_extensions` instead, as `scripts/env.sh` sets it for the scripts;
    an explicit TORCH_EXTENSIONS_DIR always wins.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    in_env = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix
    if in_env and os.access(sys.prefix, os.W_OK):
        return os.path.join(sys.prefix, "torch_extensions")
    return None


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialises torch.distributed once; returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    _map_slurm_env()
    backend = resolve_backend(backend)
    if torch.cuda.is_available() and backend != "gloo":
        torch.cuda.set_device(_local_device(int(os.environ.get("LOCAL_RANK", "0"))))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        # A world of one needs no rendezvous: an in-memory store cannot collide on a port
        # with other processes on the machine (a TCP store on a "free" port can).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    import deepspeed

    # DeepSpeed's comm layer (used by its pipeline engine) wraps the torch process group.
    from deepspeed.accelerator import get_accelerator

    if get_accelerator()._name == "cpu":
        # DeepSpeed's CPU comm builds its shm op on first use: once per environment
        build_cache = environment_build_cache()
        if build_cache is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = build_cache
        _clear_stale_build_lock()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    log.info(
        "torch.distributed up: backend=%s world=%d deepspeed_accelerator=%s",
        backend, dist.get_world_size(), get_accelerator()._name,
    )  # fmt: skip
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed(finished: bool) -> None:
    """Tears the process groups down before the interpreter exits.

    Leaving them to interpreter shutdown let gloo's threads be destroyed while joinable: about
    one exit in twelve aborted ("terminate called without an active exception", exit 134) and
    replaced the run's documented exit code. NCCL groups are destroyed only after a finished run:
    after a failure the other ranks may sit in a collective and destroying could wait on them.
    """
    if not dist.is_initialized():
        return
    if not finished and dist.get_backend() != "gloo":
        return
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def init_model_parallel(tensor: int, pipeline: int) -> None:
    """(Re)creates megatron-core's TP/PP/DP groups for this layout."""
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tensor
            and parallel_state.get_pipeline_model_parallel_world_size() == pipeline
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline
    )


class DeepSpeedMPU:
    """The `mpu` interface DeepSpeed asks for, backed by megatron-core's parallel state."""

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    # names some DeepSpeed paths use
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def any_rank(flag: bool | torch.Tensor) -> bool:
    """Collective: True on every rank when `flag` is true (non-zero) on any rank.

    Args:
        flag: a Python bool or a 0-d tensor (on any device; NCCL reduces it on the GPU).
    """
    value = torch.as_tensor(flag, dtype=torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.cuda() if dist.get_backend() == "nccl" else value.cpu()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
