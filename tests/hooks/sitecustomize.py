"""Fault injection for the tests, kept out of the package.

Python imports `sitecustomize` at start-up from sys.path, so every process started with this
directory on PYTHONPATH (`tests/ts_train.py`'s ENV, the Slurm tests, benchmarks/gpu_check.py)
runs this file, whatever launched it (a subprocess, torchrun, sbatch + srun). It patches nothing
and imports nothing unless one of these variables is set:

    MEGATRON_TS_STEP_DELAY=<seconds>  sleep before every training step (StageEngine.train_step),
                                      so signal and preemption tests can hit a run mid-way.
    MEGATRON_TS_KILL_IN_SAVE=<step>   SIGKILL the process in the save of that step, once its own
                                      files are in checkpoints/.tmp-step_N and before the barrier
                                      that publishes them (the atomicity tests).

The patch is applied right after the target module is first imported (an import hook), so a
process that never trains pays nothing.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


def _delay_steps(module) -> None:
    import time

    delay = float(os.environ["MEGATRON_TS_STEP_DELAY"])
    train_step = module.StageEngine.train_step

    def slowed(self, batches):
        time.sleep(delay)
        return train_step(self, batches)

    module.StageEngine.train_step = slowed


def _kill_in_save(module) -> None:
    import signal

    step = int(os.environ["MEGATRON_TS_KILL_IN_SAVE"])
    write_rng = module._write_rng  # the last file a rank writes into the save's directory

    def write_then_die(path, state):
        write_rng(path, state)
        # path = checkpoints/.tmp-step_NNNNNNNN/rng/rank_RRRRR.safetensors
        if path.parent.parent.name == f".tmp-step_{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)

    module._write_rng = write_then_die


_PATCHES = {}
if os.environ.get("MEGATRON_TS_STEP_DELAY"):
    _PATCHES["megatron_ts.training.engine"] = _delay_steps
if os.environ.get("MEGATRON_TS_KILL_IN_SAVE"):
    _PATCHES["megatron_ts.training.checkpoint"] = _kill_in_save


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of `_PATCHES` through the other finders and patches them once loaded."""

    def find_spec(self, name, path, target=None):
        patch = _PATCHES.pop(name, None)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
