"""The sequence layout of one sample: which transformer positions hold text and which the image.

For caption length C, a G x G code grid (G = resolution / tokenizer.downsample) and shuffle
window s, one sample takes S = T + N positions:

    position  0        1 .. C          C+1      C+2 .. C+1+N
    token     <bos>    caption/<pad>   <boi>    image windows 0 .. N-1 (s x s codes each)

T = C + 2 text positions and N = (G/s)^2 image positions. `SequenceLayout` is the one place
these numbers, the prompt format and the window order are defined; the config's stages, the
dry run and FLOPs, the collator, the model's targets and the HF config builder ask it. The
files an HF export ships (`megatron_ts/hf/*_token_shuffle.py`) cannot import megatron_ts and keep
their own copy; `tests/unit/test_sequence_layout.py` checks that the copy agrees.

This module imports neither torch nor numpy at load time, so `megatron_ts.config` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from megatron_ts.vocab import VocabLayout


def grid_to_windows(x: torch.Tensor, s: int) -> torch.Tensor:
    """Regroups a code grid into s x s windows.

    Windows are taken in raster order over the grid and codes in raster order inside a window.
    This function and `windows_to_grid` are the only definition of that order; the model, the
    loss targets and the data pipeline go through them.

    Args:
        x: (B, G, G, *rest) grid (codes or embeddings), raster order.
        s: window side.

    Returns:
        (B, (G/s)^2, s^2, *rest): windows in raster order, codes in raster order inside.
    """
    b, gh, gw = x.shape[:3]
    rest = x.shape[3:]
    if gh % s or gw % s:
        raise ValueError(f"code grid {gh}x{gw} is not divisible by shuffle window {s}")
    x = x.reshape(b, gh // s, s, gw // s, s, *rest)  # (B, G/s, s, G/s, s, ...)
    x = x.transpose(2, 3)  # (B, G/s, G/s, s, s, ...)
    return x.reshape(b, (gh // s) * (gw // s), s * s, *rest)  # (B, (G/s)^2, s^2, ...)


def windows_to_grid(x: torch.Tensor, s: int, grid: int) -> torch.Tensor:
    """Inverse of `grid_to_windows`.

    Args:
        x: (B, (G/s)^2, s^2, *rest) windows in raster order.
        s: window side.
        grid: G, codes per image side.

    Returns:
        (B, G, G, *rest) grid in raster order.
    """
    b = x.shape[0]
    rest = x.shape[3:]
    g = grid // s
    x = x.reshape(b, g, g, s, s, *rest)  # (B, G/s, G/s, s, s, ...)
    x = x.transpose(2, 3)  # (B, G/s, s, G/s, s, ...)
    return x.reshape(b, grid, grid, *rest)  # (B, G, G, ...)


def build_prompts(
    captions: Sequence[Sequence[int]],
    caption_len: int,
    bos_id: int,
    pad_id: int,
    boi_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The text span of a batch: `<bos>`, caption ids truncated to C, `<pad>` up to C, `<boi>`.

    `SequenceLayout.prompts` is the usual entry; this form serves callers that hold the special
    ids but no layout (`data.batching.Collator`).

    Args:
        captions: one sequence of text ids per sample; an empty one (a dropped caption) gives the
            unconditional prompt `<bos> <pad> x C <boi>`.
        caption_len: C, caption tokens per prompt.
        bos_id: vocabulary id of `<bos>`.
        pad_id: vocabulary id of `<pad>`.
        boi_id: vocabulary id of `<boi>`.

    Returns:
        ids: (B, C+2) int64 vocabulary ids.
        mask: (B, C+2) float32, 1.0 on real caption tokens (not `<bos>`, `<pad>`, `<boi>`).
    """
    import numpy as np  # not at module level: config.py imports this module

    b, c = len(captions), caption_len
    ids = np.full((b, c + 2), pad_id, dtype=np.int64)
    ids[:, 0] = bos_id
    ids[:, c + 1] = boi_id
    mask = np.zeros((b, c + 2), dtype=np.float32)
    for i, caption in enumerate(captions):
        n = min(len(caption), c)
        ids[i, 1 : 1 + n] = caption[:n]
        mask[i, 1 : 1 + n] = 1.0
    return ids, mask


@dataclass(frozen=True)
class SequenceLayout:
    """Positions of one sample: a text span of C+2 and an image span of (G/s)^2 windows."""

    caption_len: int
    """C: caption tokens per prompt (truncated or padded with `<pad>` to this length)."""
    grid: int
    """G: codes per image side (resolution / tokenizer.downsample)."""
    shuffle_window: int = 1
    """s: each image position holds an s x s window of codes; 1 means no token-shuffle."""

    def __post_init__(self) -> None:
        if self.caption_len < 0:
            raise ValueError(f"caption_len = {self.caption_len}; use 0 or more")
        if self.grid < 1:
            raise ValueError(f"grid = {self.grid}; an image has at least 1 x 1 codes")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window = {self.shuffle_window}; use 1 or more")
        if self.grid % self.shuffle_window:
            raise ValueError(
                f"shuffle_window = {self.shuffle_window} does not divide the code grid "
                f"{self.grid}x{self.grid}; pick a window dividing {self.grid}"
            )

    @classmethod
    def from_resolution(
        cls, resolution: int, downsample: int, *, caption_len: int, shuffle_window: int = 1
    ) -> SequenceLayout:
        """The layout of images `resolution` pixels on a side under a `downsample`x tokenizer.

        Args:
            resolution: image side in pixels.
            downsample: pixels per code along each side (tokenizer.downsample).
            caption_len: caption tokens per prompt.
            shuffle_window: token-shuffle window s.

        Raises:
            ValueError: the resolution is not a multiple of the downsample factor, or the grid
                is not divisible by the window.
        """
        if downsample < 1 or resolution % downsample:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the tokenizer's downsample "
                f"{downsample}"
            )
        return cls(caption_len, resolution // downsample, shuffle_window)

    @property
    def windows_per_side(self) -> int:
        """G/s: image positions along each side of the grid."""
        return self.grid // self.shuffle_window

    @property
    def image_codes(self) -> int:
        """G^2: VQ codes of one image."""
        return self.grid * self.grid

    @property
    def codes_per_position(self) -> int:
        """s^2: codes one image position holds (and predicts)."""
        return self.shuffle_window * self.shuffle_window

    @property
    def image_positions(self) -> int:
        """N = (G/s)^2: transformer positions of the image, and decoding steps of the sampler."""
        return self.windows_per_side * self.windows_per_side

    @property
    def text_positions(self) -> int:
        """T = C + 2: `<bos>`, the caption span and `<boi>`."""
        return self.caption_len + 2

    @property
    def seq_len(self) -> int:
        """S = T + N: transformer positions of one sample."""
        return self.text_positions + self.image_positions

    @property
    def text_span(self) -> slice:
        """Positions of the text span, `<bos>` through `<boi>`."""
        return slice(0, self.text_positions)

    @property
    def image_span(self) -> slice:
        """Positions of the image windows."""
        return slice(self.text_positions, self.seq_len)

    def prompts(
        self, captions: Sequence[Sequence[int]], vocab: VocabLayout
    ) -> tuple[np.ndarray, np.ndarray]:
        """Text-span ids and caption mask of a batch, in the format the model was trained on.

        Args:
            captions: one sequence of text ids per sample (truncated to `caption_len`); an
                empty one gives the unconditional prompt.
            vocab: the vocabulary the special ids come from.

        Returns:
            ids: (B, T) int64 `<bos>` caption `<pad>`... `<boi>`.
            mask: (B, T) float32, 1.0 on real caption tokens.
        """
        return build_prompts(captions, self.caption_len, vocab.bos_id, vocab.pad_id, vocab.boi_id)

    def grid_to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, G, *rest) grid -> (B, N, s^2, *rest) windows; see `grid_to_windows`."""
        if tuple(x.shape[1:3]) != (self.grid, self.grid):
            raise ValueError(
                f"expected a (B, {self.grid}, {self.grid}, ...) code grid, got {tuple(x.shape)}"
            )
        return grid_to_windows(x, self.shuffle_window)

    def windows_to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, s^2, *rest) windows -> (B, G, G, *rest) grid; see `windows_to_grid`."""
        if tuple(x.shape[1:3]) != (self.image_positions, self.codes_per_position):
            raise ValueError(
                f"expected (B, {self.image_positions}, {self.codes_per_position}, ...) windows, "
                f"got {tuple(x.shape)}"
            )
        return windows_to_grid(x, self.shuffle_window, self.grid)
