"""Helpers that tests and the export checks share (scripts/hf_compat, tests/unit)."""

from __future__ import annotations

import os
import sys

import torch


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including the zero-initialised residual branches.

    At init the token-shuffle MLPs are the identity (fc2 = 0) and the norms are 1, so a parity
    check on fresh weights would not see them; norms get 1 + 0.1 N(0, 1), matrices N(0, 1/fan_in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


_HOST_SCALARS = os.path.join(os.path.dirname(torch.__file__), "optim", "")


class SyncCounter:
    """Counts the device-to-host syncs a region would make on a GPU, also where it runs on CPU.

    A sync is any conversion of a tensor's data into a host value or a host copy (`item`,
    `tolist`, `numpy`, `cpu`, `bool()`, `float()`, `int()`, `index()`) or an explicit
    `torch.cuda.synchronize` / accelerator `synchronize`. `torch.cuda.set_sync_debug_mode` sees
    the same events but only on CUDA; this counts them on any device by patching those entry
    points for the duration of the `with` block (one thread: not for concurrent use). On CPU a
    conversion of a tensor that would stay on the host on a GPU (a loader's batch) counts too,
    so measured regions should keep host data out of them. The one exception is torch.optim:
    its optimizers keep their step counters on the host (unless capturable or fused) and read
    them with `item()` on every device, so those reads are not counted.

    Example:
        with SyncCounter() as syncs:
            engine.train_step(batches)
        assert syncs.count <= 1, syncs.sites
    """

    _TENSOR_METHODS = (
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
    )

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self._saved: list[tuple[object, str, object, bool]] = []
        self._inside = False

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def sites(self) -> dict[str, int]:
        """{"what file:line": count} with the first caller outside torch, for messages."""
        out: dict[str, int] = {}
        for what, where in self.events:
            key = f"{what} {where}"
            out[key] = out.get(key, 0) + 1
        return out

    def _caller(self) -> str:
        torch_dir = os.path.dirname(torch.__file__)
        frame = sys._getframe(2)
        while frame is not None and (
            frame.f_code.co_filename.startswith(torch_dir) or frame.f_code.co_filename == __file__
        ):
            frame = frame.f_back
        if frame is None:
            return "?"
        return f"{frame.f_code.co_filename}:{frame.f_lineno}"

    def _wrap(self, what: str, fn):
        def counted(*args, **kwargs):
            if self._inside:  # one event per user-level call, not per nested conversion
                return fn(*args, **kwargs)
            self._inside = True
            try:
                if not sys._getframe(1).f_code.co_filename.startswith(_HOST_SCALARS):
                    self.events.append((what, self._caller()))
                return fn(*args, **kwargs)
            finally:
                self._inside = False

        return counted

    def _patch(self, owner, name: str, what: str) -> None:
        had_own = name in vars(owner)
        original = getattr(owner, name)
        self._saved.append((owner, name, vars(owner).get(name), had_own))
        setattr(owner, name, self._wrap(what, original))

    def __enter__(self) -> SyncCounter:
        for name in self._TENSOR_METHODS:
            self._patch(torch.Tensor, name, name.strip("_"))
        self._patch(torch.cuda, "synchronize", "cuda.synchronize")
        if "deepspeed" in sys.modules:  # its engines synchronize through the accelerator
            from deepspeed.accelerator import get_accelerator

            self._patch(get_accelerator(), "synchronize", "accelerator.synchronize")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original, had_own in reversed(self._saved):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()
