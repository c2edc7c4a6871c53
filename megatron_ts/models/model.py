"""The Token-Shuffle decoder as a list of pipeline-ready layer modules.

Sequence format of one sample (T = caption_len + 2 text positions, N image positions; the
numbers and the window order are `megatron_ts.sequence.SequenceLayout`'s):

    position  0        1 .. C        C+1      C+2 .. C+1+N
    token     <bos>    caption/pad   <boi>    image windows (s x s codes each, raster order)

Position t predicts the token at t+1: text positions 0..T-2 predict the caption (masked by
text_mask), and positions T-1..T+N-2 (<boi> and the first N-1 windows) each predict the s^2
codes of the next window through token-unshuffle and the shared output head. Inside the image
span only codebook logits compete, so in training the head scores image positions against the
codebook rows only (`OutputHead`, `vocab_columns`): a third of the paper's vocabulary.

The model is the list [InputLayer, BlockLayer x L, OutputLayer]. Each element takes and returns
the tuple (hidden (S, B, d), text_len (1,) int64), the shape DeepSpeed's pipeline engine passes
between stages; only the first stage builds the embedding and token-shuffle, only the last the
final norm, token-unshuffle and head. `TokenShuffleLM` chains them in one process and passes
text_len on as a Python int, which the output layer reads without a device-to-host sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_ts.config import ModelConfig
from megatron_ts.models.attention import resolve_backend
from megatron_ts.models.flavors import ModelShape
from megatron_ts.models.kernels import select_kernels
from megatron_ts.models.layer_specs import llama_layer_spec
from megatron_ts.models.linear import ColumnLinear
from megatron_ts.models.token_shuffle import TokenShuffle, TokenUnshuffle
from megatron_ts.sequence import grid_to_windows
from megatron_ts.vocab import VocabLayout


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the model; stored in checkpoints and HF exports."""

    shape: ModelShape
    vocab: VocabLayout
    shuffle_window: int
    shuffle_mlp_blocks: int
    rope_theta: float
    norm_eps: float
    init_std: float
    vocab_multiple: int = 128
    tensor_parallel: int = 1
    attention_backend: str = "auto"
    activation_checkpointing: str = "none"
    max_windows_per_side: int = 0
    """Window-position tables cover image grids up to this many windows down and across
    (`WindowPositions`); 0 builds none: a model of square images only, as before buckets."""

    @property
    def padded_vocab(self) -> int:
        return self.vocab.padded_size(self.vocab_multiple)

    def to_dict(self) -> dict:
        """JSON-able form, stored in checkpoint meta.json and HF config.json."""
        out = dataclasses.asdict(self)
        out["vocab"] = self.vocab.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        data = dict(data)
        data["shape"] = ModelShape(**data["shape"])
        data["vocab"] = VocabLayout.from_dict(data["vocab"])
        return cls(**data)

    @classmethod
    def from_config(
        cls,
        model: ModelConfig,
        vocab: VocabLayout,
        shuffle_window: int,
        tensor_parallel: int = 1,
        activation_checkpointing: str = "none",
    ) -> ModelSpec:
        return cls(
            shape=model.shape(),
            vocab=vocab,
            shuffle_window=shuffle_window,
            shuffle_mlp_blocks=model.shuffle_mlp_blocks,
            rope_theta=model.rope_theta,
            norm_eps=model.norm_eps,
            init_std=model.init_std,
            vocab_multiple=model.vocab_multiple,
            tensor_parallel=tensor_parallel,
            attention_backend=model.attention_backend,
            activation_checkpointing=activation_checkpointing,
            max_windows_per_side=model.max_windows_per_side,
        )


def transformer_config(spec: ModelSpec) -> TransformerConfig:
    """megatron-core TransformerConfig for a Llama block: RMSNorm, SwiGLU, no biases, no dropout.

    Dropout is 0 as in LLM pretraining (megatron's default 0.1 also needs its CUDA RNG tracker
    to keep TP ranks in step). Pipeline parallelism is DeepSpeed's, so megatron sees PP = 1.
    Weights are initialised on CPU from the full master matrix, so every TP/PP layout with the
    same seed starts from the same weights.
    """
    shape = spec.shape
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        ffn_hidden_size=shape.ffn_hidden_size,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        tensor_model_parallel_size=spec.tensor_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


@contextlib.contextmanager
def _seeded(seed: int):
    """Runs a block under a fixed torch seed, restoring the global RNG after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


class WindowPositions(nn.Module):
    """Tells each position predicting an image window where that window lies and the image's shape.

    The position predicting window k of an R x C window grid (R = H/s rows, C = W/s columns; `<boi>`
    predicts window 0) gets row[k // C] + col[k % C] + rows[R - 1] + cols[C - 1] added to its input.
    So the first window is drawn knowing the shape asked for, and every step knows where a row
    ends, without extra positions (token-shuffle's point is fewer of them). The tables start at
    zero: a model gaining them (square checkpoint, bucketed stage) computes exactly what it did.
    Replicated on every TP rank, as the token-shuffle compress layer is: the input is replicated.
    """

    def __init__(self, max_side: int, hidden: int):
        super().__init__()
        self.max_side = max_side
        self.row = nn.Parameter(torch.zeros(max_side, hidden))
        self.col = nn.Parameter(torch.zeros(max_side, hidden))
        self.rows = nn.Parameter(torch.zeros(max_side, hidden))
        self.cols = nn.Parameter(torch.zeros(max_side, hidden))

    def forward(self, window_grid: tuple[int, int], start: int = 0, count: int | None = None):
        """(count, d) additions for the positions predicting windows start .. start + count - 1.

        Args:
            window_grid: (R, C) windows down and across the image.
            start: first window predicted (the sampler's decoding step).
            count: windows predicted (default: all R x C from `start`).
        """
        r, c = window_grid
        if max(r, c) > self.max_side:
            raise ValueError(
                f"an image of {r} x {c} windows exceeds model.max_windows_per_side = "
                f"{self.max_side}; this model cannot draw that size"
            )
        count = r * c - start if count is None else count
        k = torch.arange(start, start + count, device=self.row.device)
        return self.row[k // c] + self.col[k % c] + self.rows[r - 1] + self.cols[c - 1]  # (n, d)


class InputLayer(nn.Module):
    """First pipeline stage: token embedding, token-shuffle of the image span, window positions."""

    def __init__(self, spec: ModelSpec, config: TransformerConfig, seed: int):
        super().__init__()
        self.spec = spec
        with _seeded(seed):
            self.embedding = VocabParallelEmbedding(
                spec.padded_vocab,
                spec.shape.hidden_size,
                init_method=config.init_method,
                config=config,
            )
        self.shuffle = None
        if spec.shuffle_window > 1:
            with _seeded(seed + 1):
                self.shuffle = TokenShuffle(
                    spec.shape.hidden_size, spec.shuffle_window, spec.shuffle_mlp_blocks, config
                )
        self.window_positions = None
        if spec.max_windows_per_side > 0:
            self.window_positions = WindowPositions(
                spec.max_windows_per_side, spec.shape.hidden_size
            )

    def forward(
        self, inputs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text, codes = inputs  # (B, T) vocabulary ids, (B, H, W) codebook-local codes
        b, t = text.shape
        gh, gw = codes.shape[1:]
        s = self.spec.shuffle_window
        ids = torch.cat([text, codes.reshape(b, gh * gw) + self.spec.vocab.code_offset], dim=1)
        emb = self.embedding(ids)  # (B, T + H*W, d)
        text_emb, img_emb = emb[:, :t], emb[:, t:]
        if self.shuffle is not None:
            img_emb = self.shuffle(img_emb.reshape(b, gh, gw, -1))  # (B, N, d), N = HW / s^2
        hidden = torch.cat([text_emb, img_emb], dim=1)  # (B, S, d)
        if self.window_positions is not None:
            pos = self.window_positions((gh // s, gw // s))  # (N, d): positions T-1 .. T+N-2
            hidden = hidden + F.pad(pos, (0, 0, t - 1, 1)).to(hidden.dtype)  # (S, d), broadcast
        hidden = hidden.transpose(0, 1).contiguous()  # (S, B, d)
        # filled on the device: a host list copied in would wait for the stream on a GPU
        text_len = torch.full((1,), t, dtype=torch.int64, device=hidden.device)
        return hidden, text_len


class BlockLayer(nn.Module):
    """One megatron-core transformer block; its core attention applies RoPE over 0..S-1."""

    def __init__(self, spec: ModelSpec, config: TransformerConfig, layer_index: int, seed: int):
        super().__init__()
        self.spec = spec
        self.full_checkpoint = spec.activation_checkpointing == "full"
        backend = resolve_backend(spec.attention_backend)
        with _seeded(seed):
            self.layer = build_module(
                llama_layer_spec(backend, spec.rope_theta, select_kernels()),
                config=config,
                layer_number=layer_index + 1,
            )
        if spec.activation_checkpointing == "selective":
            self.layer.self_attention.core_attention.checkpoint = True

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = self.layer(hidden, attention_mask=None)  # RoPE: in the core attention
        return out

    def forward(
        self, inputs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, text_len = inputs
        if self.full_checkpoint and self.training and torch.is_grad_enabled():
            hidden = torch.utils.checkpoint.checkpoint(self._run, hidden, use_reentrant=False)
        else:
            hidden = self._run(hidden)
        return hidden, text_len


def vocab_columns(first_id: int, width: int, lo: int, hi: int) -> tuple[int, int]:
    """Columns [a, b) of a vocabulary shard holding ids [first_id, first_id + width) in [lo, hi).

    a == b when the shard holds none of them (a TP rank whose rows are all text, say).
    """
    a = min(max(lo - first_id, 0), width)
    return a, max(min(hi - first_id, width), a)


def code_columns(vocab: VocabLayout, width: int) -> tuple[int, int]:
    """Columns [a, b) of the codebook in this TP rank's head shard of `width` rows."""
    first = parallel_state.get_tensor_model_parallel_rank() * width
    return vocab_columns(first, width, vocab.code_offset, vocab.code_offset + vocab.codebook_size)


class OutputHead(ColumnLinear):
    """The vocabulary-parallel output head; can score against a range of this shard's rows only.

    A subclass rather than a bare `F.linear` on `weight[a:b]`, so the call goes through the
    module (ZeRO-3 gathers parameters in module hooks) and the parameter stays `head.weight`.
    """

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        rows: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Args as ColumnParallelLinear; `rows` = (a, b) scores against local rows a..b-1 only."""
        if rows is None:
            return super().forward(input_, weight, runtime_gather_output)
        # identity forward; backward all-reduces the input gradient over TP, as the full head
        # does (a rank with a == b contributes zeros but still joins the all-reduce)
        x = copy_to_tensor_model_parallel_region(input_, self.tp_group)  # group named: no warning
        return F.linear(x, self.weight[rows[0] : rows[1]]), None  # (..., b - a)


class OutputLayer(nn.Module):
    """Last pipeline stage: final RMSNorm, token-unshuffle of the image span, output head.

    Returns local (TP-partitioned) logits: text (T-1, B, V/tp) and image (N, B, s^2, C). In
    training C is this rank's share of the codebook, columns `code_columns(vocab, V/tp)` of its
    shard (only codes compete there, and the loss needs no more); in eval mode C = V/tp, the
    whole shard, as the HF model returns it. `TokenShuffleLoss` takes either.
    """

    def __init__(self, spec: ModelSpec, config: TransformerConfig, seed: int):
        super().__init__()
        self.spec = spec
        d = spec.shape.hidden_size
        self.final_norm = nn.RMSNorm(d, eps=spec.norm_eps)
        self.unshuffle = None
        if spec.shuffle_window > 1:
            with _seeded(seed + 1):
                self.unshuffle = TokenUnshuffle(
                    d, spec.shuffle_window, spec.shuffle_mlp_blocks, config
                )
        with _seeded(seed):
            self.head = OutputHead(
                d,
                spec.padded_vocab,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
            )

    def forward(
        self, inputs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, text_len = inputs  # text_len: (1,) tensor in a pipeline, else an int
        t = text_len if isinstance(text_len, int) else int(text_len[0])
        hidden = self.final_norm(hidden)  # (S, B, d)
        text_logits, _ = self.head(hidden[: t - 1])  # (T-1, B, V/tp)
        img = hidden[t - 1 : -1]  # (N, B, d): <boi> and windows 0..N-2
        if self.unshuffle is not None:
            img = self.unshuffle(img)  # (N, B, s^2, d)
        else:
            img = img.unsqueeze(2)  # (N, B, 1, d)
        n, b, s2, d = img.shape
        rows = code_columns(self.spec.vocab, self.head.output_size_per_partition)
        # megatron's linear backward wants 3-D input: fold the s^2 codes into the batch dim.
        image_logits, _ = self.head(img.reshape(n, b * s2, d), rows=rows if self.training else None)
        return text_logits, image_logits.reshape(n, b, s2, -1)  # (N, B, s^2, C)


def layer_seed(seed: int, index: int) -> int:
    """Seed of layer `index` in [Input, Block x L, Output]; independent of the parallel layout."""
    return seed * 1000 + index * 7


def build_layers(spec: ModelSpec, seed: int) -> list[nn.Module]:
    """Builds every layer module (single process, or for tests). Pipelines build slices lazily."""
    config = transformer_config(spec)
    layers: list[nn.Module] = [InputLayer(spec, config, layer_seed(seed, 0))]
    for i in range(spec.shape.num_layers):
        layers.append(BlockLayer(spec, config, i, layer_seed(seed, i + 1)))
    layers.append(OutputLayer(spec, config, layer_seed(seed, spec.shape.num_layers + 1)))
    return layers


class TokenShuffleLM(nn.Module):
    """The whole decoder in one process (any TP size, no pipeline): the one model container.

    Inference, conversion and tests call it with (text, codes) and get the output layer's
    result. Training builds it with `loss_fn` and passes `text_mask` too: forward then returns the
    micro-batch loss, as DeepSpeed's engine expects. Its parameter names (`input_stage.`,
    `blocks.N.`, `output_stage.`) are the full-state-dict names of checkpoints and exports;
    with pipeline parallelism the same layer modules become DeepSpeed `LayerSpec`s instead.

    Args:
        spec: the model spec.
        seed: weight-init seed (each layer module seeds from it and its layer index).
        loss_fn: the training loss (`models.loss.TokenShuffleLoss`); None for a model that only
            predicts.
    """

    def __init__(
        self, spec: ModelSpec, seed: int = 1234, loss_fn: Callable[..., torch.Tensor] | None = None
    ):
        super().__init__()
        self.spec = spec
        stages = build_layers(spec, seed)
        self.input_stage = stages[0]
        self.blocks = nn.ModuleList(stages[1:-1])
        self.output_stage = stages[-1]
        self.loss_fn = loss_fn

    def layers(self) -> dict[int, nn.Module]:
        """{layer index: layer module}: 0 the input layer, 1..L the blocks, L + 1 the output layer."""
        return dict(enumerate([self.input_stage, *self.blocks, self.output_stage]))

    def forward(
        self, text: torch.Tensor, codes: torch.Tensor, text_mask: torch.Tensor | None = None
    ):
        hidden, _ = self.input_stage((text, codes))
        # Without a pipeline the text length need not travel as a device tensor (DeepSpeed's
        # pipeline sends only tensors): a Python int spares the output layer a device-to-host
        # read of it per micro-batch.
        x = (hidden, text.shape[1])
        for block in self.blocks:
            x = block(x)
        out = self.output_stage(x)
        if text_mask is None:
            return out
        if self.loss_fn is None:
            raise ValueError("TokenShuffleLM built without loss_fn was given text_mask")
        return self.loss_fn(out, (text, text_mask, codes))


def image_targets(codes: torch.Tensor, window: int, vocab: VocabLayout) -> torch.Tensor:
    """Vocabulary ids of the codes each image position predicts: (B, H, W) -> (N, B, s^2)."""
    windows = grid_to_windows(codes, window)  # (B, N, s^2)
    return (windows + vocab.code_offset).transpose(0, 1)  # (N, B, s^2)
