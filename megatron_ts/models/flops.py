"""Model FLOPs of one sample: the numbers behind `--dry-run`, MFU and the shuffle speed-up.

Counts matrix multiplies as 2 * m * n * k. Causal attention is counted as such: query i attends
to i + 1 keys, so QK^T and AV cost 2 * 2 * d * L(L+1)/2 in total per layer. Token-shuffle and
token-unshuffle MLPs and the output head (the padded vocabulary at text positions, the codebook
rows at image positions when `image_head_rows` says so) are included; norms,
activations, RoPE and softmax are not (they are bandwidth, not FLOPs). Training FLOPs are
3x the forward (backward = 2x forward); activation recomputation is not counted (model FLOPs,
as MFU is defined by PaLM and Megatron).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_ts.models.flavors import ModelShape
from megatron_ts.sequence import SequenceLayout


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one sample by component."""

    shuffle: float
    attention_linear: float
    attention_core: float
    mlp: float
    unshuffle: float
    head: float

    @property
    def forward(self) -> float:
        return sum(asdict(self).values())

    @property
    def training(self) -> float:
        """Forward + backward model FLOPs of one sample."""
        return 3.0 * self.forward

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["forward"] = self.forward
        out["training"] = self.training
        return out


def sample_flops(
    shape: ModelShape,
    padded_vocab: int,
    caption_len: int,
    grid: int,
    shuffle_window: int,
    shuffle_mlp_blocks: int,
    image_head_rows: int | None = None,
) -> FlopsBreakdown:
    """Forward FLOPs of one training sample (sequence format of megatron_ts.models.model).

    Args:
        shape: transformer shape.
        padded_vocab: rows of the output head.
        caption_len: caption tokens; the text span is caption_len + 2 positions (<bos>, <boi>).
        grid: codes per image side.
        shuffle_window: s; 1 means no token-shuffle. The three make the `SequenceLayout`
            whose positions are counted.
        shuffle_mlp_blocks: residual MLP blocks on each side of the shuffle.
        image_head_rows: head rows each predicted code is scored against: the codebook size
            for the training model (`OutputLayer` in train mode); None counts the whole padded
            vocabulary (eval mode, the HF model).
    """
    d, f = shape.hidden_size, shape.ffn_hidden_size
    layout = SequenceLayout(caption_len, grid, shuffle_window)
    s2 = layout.codes_per_position
    codes = layout.image_codes
    n = layout.image_positions
    t = layout.text_positions
    seq = layout.seq_len
    kv = shape.num_kv_heads * shape.head_dim

    shuffle = unshuffle = 0.0
    if shuffle_window > 1:
        shuffle = 2.0 * codes * d * (d // s2) + shuffle_mlp_blocks * 4.0 * n * d * d
        unshuffle = shuffle_mlp_blocks * 4.0 * n * d * d + 2.0 * n * s2 * (d // s2) * d
    layers = shape.num_layers
    attention_linear = layers * (2.0 * seq * d * (d + 2 * kv) + 2.0 * seq * d * d)
    attention_core = layers * 2.0 * 2.0 * d * (seq * (seq + 1) / 2.0)
    mlp = layers * 6.0 * seq * d * f
    # text positions 0..t-2 predict text; the n positions from <boi> predict s^2 codes each
    rows = padded_vocab if image_head_rows is None else image_head_rows
    head = 2.0 * d * (padded_vocab * (t - 1) + rows * codes)
    return FlopsBreakdown(shuffle, attention_linear, attention_core, mlp, unshuffle, head)


def param_counts(
    shape: ModelShape,
    padded_vocab: int,
    shuffle_window: int,
    shuffle_mlp_blocks: int,
    max_windows_per_side: int = 0,
) -> dict[str, int]:
    """Parameters by component (embeddings, shuffle, transformer, unshuffle, head, and the
    window-position tables when `max_windows_per_side` > 0) and total."""
    d, f = shape.hidden_size, shape.ffn_hidden_size
    kv = shape.num_kv_heads * shape.head_dim
    s2 = shuffle_window**2
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d  # qkv, proj, SwiGLU, two norms
    shuffle = unshuffle = 0
    if shuffle_window > 1:
        shuffle = d * (d // s2) + shuffle_mlp_blocks * 2 * d * d
        unshuffle = shuffle_mlp_blocks * 2 * d * d + (d // s2) * d
    out = {
        "embeddings": padded_vocab * d,
        "shuffle": shuffle,
        "transformer": shape.num_layers * per_layer + d,  # + final norm
        "unshuffle": unshuffle,
        "head": padded_vocab * d,
    }
    if max_windows_per_side > 0:
        out["window_positions"] = 4 * max_windows_per_side * d  # row, col, rows, cols tables
    out["total"] = sum(out.values())
    return out
