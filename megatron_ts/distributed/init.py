"""Process-group set-up shared by training, conversion and tests.

Launch modes: a plain process (world of one on a loopback TCP store), `torchrun` (RANK,
WORLD_SIZE, MASTER_ADDR/PORT set), or `srun` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID mapped
to the torch variables; the sbatch script exports MASTER_ADDR/PORT of the head node).
Then megatron-core's parallel state is created (tp fastest, then dp, then pp), and DeepSpeed
gets an `mpu` view of the same groups.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ts.logging import get_logger

log = get_logger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _map_slurm_env() -> None:
    """Fills torch.distributed variables from SLURM's when launched by srun without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 and "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault(
        "LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    )


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialises torch.distributed once; returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    _map_slurm_env()
    backend = resolve_backend(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    log.info("torch.distributed up: backend=%s world=%d", backend, dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


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
