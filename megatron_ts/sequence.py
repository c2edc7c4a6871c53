"""The sequence layout of one sample: which transformer positions hold text and which the image.

For caption length C, an H x W code grid (H = image height / tokenizer.downsample, W likewise;
H = W = G for the square images of a stage without aspect-ratio buckets) and shuffle window s,
one sample takes S = T + N positions:

    position  0        1 .. C          C+1      C+2 .. C+1+N
    token     <bos>    caption/<pad>   <boi>    image windows 0 .. N-1 (s x s codes each)

T = C + 2 text positions and N = (H/s)(W/s) image positions, windows in raster order (a row of
W/s windows, then the next row). `SequenceLayout` is the one place
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
        x: (B, H, W, *rest) grid (codes or embeddings), raster order.
        s: window side.

    Returns:
        (B, (H/s)(W/s), s^2, *rest): windows in raster order, codes in raster order inside.
    """
    b, gh, gw = x.shape[:3]
    rest = x.shape[3:]
    if gh % s or gw % s:
        raise ValueError(f"code grid {gh}x{gw} is not divisible by shuffle window {s}")
    x = x.reshape(b, gh // s, s, gw // s, s, *rest)  # (B, H/s, s, W/s, s, ...)
    x = x.transpose(2, 3)  # (B, H/s, W/s, s, s, ...)
    return x.reshape(b, (gh // s) * (gw // s), s * s, *rest)  # (B, N, s^2, ...)


def windows_to_grid(x: torch.Tensor, s: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """Inverse of `grid_to_windows`.

    Args:
        x: (B, (H/s)(W/s), s^2, *rest) windows in raster order.
        s: window side.
        grid: (H, W) codes per image column and row; an int G means G x G.

    Returns:
        (B, H, W, *rest) grid in raster order.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    b = x.shape[0]
    rest = x.shape[3:]
    x = x.reshape(b, gh // s, gw // s, s, s, *rest)  # (B, H/s, W/s, s, s, ...)
    x = x.transpose(2, 3)  # (B, H/s, s, W/s, s, ...)
    return x.reshape(b, gh, gw, *rest)  # (B, H, W, ...)


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
    """Positions of one sample: a text span of C+2 and an image span of (H/s)(W/s) windows."""

    caption_len: int
    """C: caption tokens per prompt (truncated or padded with `<pad>` to this length)."""
    grid: tuple[int, int]
    """(H, W): code rows and columns of the image (its pixel size / tokenizer.downsample). An int
    G given here means the square G x G."""
    shuffle_window: int = 1
    """s: each image position holds an s x s window of codes; 1 means no token-shuffle."""

    def __post_init__(self) -> None:
        given = self.grid
        grid = (given, given) if isinstance(given, int) else tuple(given)
        object.__setattr__(self, "grid", grid)
        if self.caption_len < 0:
            raise ValueError(f"caption_len = {self.caption_len}; use 0 or more")
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid = {given}; an image has at least 1 x 1 codes")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window = {self.shuffle_window}; use 1 or more")
        if grid[0] % self.shuffle_window or grid[1] % self.shuffle_window:
            raise ValueError(
                f"shuffle_window = {self.shuffle_window} does not divide the code grid "
                f"{grid[0]}x{grid[1]}; pick a window dividing both sides"
            )

    @classmethod
    def from_resolution(
        cls,
        resolution: int | tuple[int, int],
        downsample: int,
        *,
        caption_len: int,
        shuffle_window: int = 1,
    ) -> SequenceLayout:
        """The layout of images `resolution` pixels on a side under a `downsample`x tokenizer.

        Args:
            resolution: image side in pixels, or (height, width) of a non-square image.
            downsample: pixels per code along each side (tokenizer.downsample).
            caption_len: caption tokens per prompt.
            shuffle_window: token-shuffle window s.

        Raises:
            ValueError: a side is not a multiple of the downsample factor, or the grid is not
                divisible by the window.
        """
        sides = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if downsample < 1 or any(side % downsample for side in sides):
            size = "x".join(str(side) for side in sides[::-1])  # width x height
            raise ValueError(
                f"image size {size} is not a multiple of the tokenizer's downsample {downsample}"
            )
        grid = (sides[0] // downsample, sides[1] // downsample)
        return cls(caption_len, grid, shuffle_window)

    @property
    def rows(self) -> int:
        """H: code rows of the image."""
        return self.grid[0]

    @property
    def cols(self) -> int:
        """W: code columns of the image."""
        return self.grid[1]

    @property
    def window_grid(self) -> tuple[int, int]:
        """(H/s, W/s): image positions down and across the grid."""
        return self.rows // self.shuffle_window, self.cols // self.shuffle_window

    @property
    def image_codes(self) -> int:
        """H x W: VQ codes of one image."""
        return self.rows * self.cols

    @property
    def codes_per_position(self) -> int:
        """s^2: codes one image position holds (and predicts)."""
        return self.shuffle_window * self.shuffle_window

    @property
    def image_positions(self) -> int:
        """N = (H/s)(W/s): transformer positions of the image, and decoding steps of the sampler."""
        wh, ww = self.window_grid
        return wh * ww

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
        """(B, H, W, *rest) grid -> (B, N, s^2, *rest) windows; see `grid_to_windows`."""
        if tuple(x.shape[1:3]) != self.grid:
            raise ValueError(
                f"expected a (B, {self.rows}, {self.cols}, ...) code grid, got {tuple(x.shape)}"
            )
        return grid_to_windows(x, self.shuffle_window)

    def windows_to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, s^2, *rest) windows -> (B, H, W, *rest) grid; see `windows_to_grid`."""
        if tuple(x.shape[1:3]) != (self.image_positions, self.codes_per_position):
            raise ValueError(
                f"expected (B, {self.image_positions}, {self.codes_per_position}, ...) windows, "
                f"got {tuple(x.shape)}"
            )
        return windows_to_grid(x, self.shuffle_window, self.grid)
