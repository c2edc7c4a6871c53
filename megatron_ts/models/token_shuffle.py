"""Token-shuffle and token-unshuffle (Ma et al., 2025).

Input side: each image-code embedding is compressed d -> d/s^2, the s x s window is concatenated
along channels into one position of width d, and residual MLP blocks refine it. Output side
mirrors it: residual MLP blocks, a split of width d into s^2 parts of d/s^2, and a linear
expansion of each part back to d, so every image position yields s^2 code predictions.

The window order (raster over the grid, raster inside a window) is defined once, by
`grid_to_windows` / `windows_to_grid` in `megatron_ts.sequence` (re-exported here); the layers,
the loss targets and the tests go through them, and the export's sampler keeps a tested copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_ts.models.linear import ColumnLinear, RowLinear
from megatron_ts.sequence import grid_to_windows, windows_to_grid

__all__ = ["ResidualMLP", "TokenShuffle", "TokenUnshuffle", "grid_to_windows", "windows_to_grid"]


class ResidualMLP(nn.Module):
    """x + W2 silu(W1 x), tensor-parallel (W1 column-, W2 row-parallel), width d -> d -> d.

    W2 starts at zero, so a new block is the identity: a model gaining token-shuffle at a
    curriculum transition (s = 1 -> 2) starts from the plain compress/concat path, and the first
    steps of the new stage do not see a random residual on top of the carried transformer.
    """

    def __init__(self, width: int, config: TransformerConfig):
        super().__init__()
        self.fc1 = ColumnLinear(
            width,
            width,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.fc2 = RowLinear(
            width,
            width,
            config=config,
            init_method=torch.nn.init.zeros_,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        h, _ = self.fc2(F.silu(h))
        return x + h


class TokenShuffle(nn.Module):
    """Merges each s x s window of image-token embeddings into one position of width d."""

    def __init__(self, hidden: int, window: int, blocks: int, config: TransformerConfig):
        super().__init__()
        self.window = window
        # Replicated on every TP rank: it is small (d x d/s^2) and its input is replicated.
        self.compress = nn.Linear(hidden, hidden // window**2, bias=False)
        config.init_method(self.compress.weight)
        self.blocks = nn.ModuleList(ResidualMLP(hidden, config) for _ in range(blocks))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, G, G, d) code embeddings -> (B, N, d) window positions, N = (G/s)^2."""
        x = self.compress(emb)  # (B, G, G, d/s^2)
        x = grid_to_windows(x, self.window)  # (B, N, s^2, d/s^2)
        x = x.flatten(2)  # (B, N, d): window concatenated along channels, raster order
        for block in self.blocks:
            x = block(x)
        return x


class TokenUnshuffle(nn.Module):
    """Expands each output position back into s^2 positions of width d for the head."""

    def __init__(self, hidden: int, window: int, blocks: int, config: TransformerConfig):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(ResidualMLP(hidden, config) for _ in range(blocks))
        self.expand = nn.Linear(hidden // window**2, hidden, bias=False)
        config.init_method(self.expand.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, B, d) -> (N, B, s^2, d)."""
        for block in self.blocks:
            h = block(h)
        n, b, d = h.shape
        h = h.reshape(n, b, self.window**2, d // self.window**2)  # (N, B, s^2, d/s^2)
        return self.expand(h)  # (N, B, s^2, d)
