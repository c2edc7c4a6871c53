"""Helpers that tests and the export checks share (scripts/hf_compat, tests/unit)."""

from __future__ import annotations

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
