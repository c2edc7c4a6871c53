"""Runs a function on N gloo ranks in fresh processes and returns every rank's result.

Each rank imports torch/megatron once (about 7 s on 2 cores), so tests should put several
checks into one world instead of spawning many.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int, world: int, port: int, outdir: str, fn: Callable, args: tuple, env: dict
) -> None:
    os.environ.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    os.environ.update(env)  # may choose another accelerator (the CUDA tests)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    path = os.path.join(outdir, f"rank{rank}.pkl")
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        result = ("error", traceback.format_exc())
    with open(path, "wb") as f:
        pickle.dump(result, f)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_distributed(
    fn: Callable, world: int, *args: Any, env: dict | None = None, timeout: float = 600
) -> list[Any]:
    """Runs fn(rank, world, *args) on `world` spawned ranks; returns results in rank order.

    Raises:
        RuntimeError: with the failing rank's traceback.
    """
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _entry,
            args=(world, port, outdir, fn, args, env or {}),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        while not ctx.join(timeout=timeout):
            pass
        results = []
        for rank in range(world):
            path = os.path.join(outdir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} produced no result (crashed?)")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
