"""The device the gpu-marked tests run on.

On a CUDA machine: "cuda". Elsewhere these tests are skipped (tests/conftest.py) unless
TS_GPU_TESTS_ON_CPU=1, which runs them on "cpu" so that `scripts/gpu_check.sh --smoke` (CI)
exercises their code between GPU visits; checks that only mean something on CUDA (its kernels,
NCCL, CPU-vs-CUDA parity) skip themselves there with the reason shown.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture()
def cuda_only(device: str) -> None:
    if device != "cuda":
        pytest.skip("CUDA-only check (TS_GPU_TESTS_ON_CPU runs the others on CPU)")


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core layers need a (TP = 1) parallel state: a world of one rank."""
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
