"""Hugging Face configuration of an exported Token-Shuffle model.

This file is copied next to the weights of every export, so it imports only transformers: users
load the directory with `trust_remote_code=True` without installing megatron_ts.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")


class TokenShuffleConfig(PretrainedConfig):
    """Llama decoder over text ids + special tokens + VQ codes, with token-(un)shuffle layers.

    Vocabulary layout (ids ascending): text ids [0, text_vocab_size), the special tokens, the
    VQ codebook [code_offset, code_offset + codebook_size), then padding rows up to vocab_size.

    Args:
        vocab_size: rows of the embedding and output head, padding included.
        hidden_size: model width d.
        intermediate_size: SwiGLU inner width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention when fewer).
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base frequency (rotate-half layout, 1D positions over the sequence).
        shuffle_window: token-shuffle window s; each image position holds s x s codes.
        shuffle_mlp_blocks: residual MLP blocks on each side of token-(un)shuffle.
        text_vocab_size: ids of the text tokenizer.
        codebook_size: VQ codes.
        special_tokens: names of the special tokens placed after the text ids.
        caption_len: caption tokens per prompt the model was trained with (padded with <pad>).
        resolutions: image sides in pixels the model was trained at; the first is the default.
            With aspect-ratio buckets, the stages' pixel budgets (each bucket has about
            resolution^2 pixels).
        buckets: the aspect-ratio buckets the model was trained on, each
            {"name": "W:H", "width": px, "height": px, "resolution": the stage's side}; empty
            (every export before buckets) means square images of `resolutions` only.
        max_windows_per_side: rows of the window-position tables (`WindowPositions`): images of
            up to this many windows down and across; 0 (every export before buckets) builds none.
        vq_downsample: pixels per code along each side.
        text_tokenizer: identity of the text tokenizer (`byte` or `name:sha256-prefix`).
        vq_tokenizer: identity of the VQ tokenizer.
        initializer_range: std of the normal init of fresh weights.
        model_spec: megatron_ts ModelSpec as a dict, so an export can be turned back into a
            training checkpoint exactly.
    """

    model_type = "token_shuffle"
    keys_to_ignore_at_inference = ["kv_cache"]

    def __init__(
        self,
        vocab_size: int = 384,
        hidden_size: int = 64,
        intermediate_size: int = 176,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        shuffle_window: int = 1,
        shuffle_mlp_blocks: int = 2,
        text_vocab_size: int = 256,
        codebook_size: int = 64,
        special_tokens: list[str] | tuple[str, ...] = SPECIAL_TOKENS,
        caption_len: int = 64,
        resolutions: list[int] | tuple[int, ...] = (256,),
        buckets: list[dict] | tuple[dict, ...] = (),
        max_windows_per_side: int = 0,
        vq_downsample: int = 16,
        text_tokenizer: str = "byte",
        vq_tokenizer: str = "native",
        initializer_range: float = 0.02,
        model_spec: dict | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.shuffle_window = shuffle_window
        self.shuffle_mlp_blocks = shuffle_mlp_blocks
        self.text_vocab_size = text_vocab_size
        self.codebook_size = codebook_size
        self.special_tokens = list(special_tokens)
        self.caption_len = caption_len
        self.resolutions = [int(r) for r in resolutions]
        self.buckets = [
            {
                "name": str(b["name"]),
                "width": int(b["width"]),
                "height": int(b["height"]),
                "resolution": int(b.get("resolution") or 0),
            }
            for b in buckets or ()
        ]
        self.max_windows_per_side = int(max_windows_per_side or 0)
        self.vq_downsample = vq_downsample
        self.text_tokenizer = text_tokenizer
        self.vq_tokenizer = vq_tokenizer
        self.initializer_range = initializer_range
        self.model_spec = model_spec
        for name in ("pad", "bos", "eos"):
            kwargs.setdefault(f"{name}_token_id", self.special_id(f"<{name}>"))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def special_id(self, token: str) -> int:
        """Vocabulary id of a special token such as `<boi>`."""
        return self.text_vocab_size + list(self.special_tokens).index(token)

    @property
    def boi_token_id(self) -> int:
        return self.special_id("<boi>")

    @property
    def eoi_token_id(self) -> int:
        return self.special_id("<eoi>")

    @property
    def code_offset(self) -> int:
        """Vocabulary id of VQ code 0."""
        return self.text_vocab_size + len(self.special_tokens)

    @property
    def vocab_size_unpadded(self) -> int:
        return self.code_offset + self.codebook_size

    # The export's copy of megatron_ts.sequence.SequenceLayout (this file cannot import
    # megatron_ts); tests/unit/test_sequence_layout.py checks that the two agree.
    def grid(self, resolution: int) -> int:
        """Codes per image side at `resolution` pixels."""
        return resolution // self.vq_downsample

    def image_positions(self, resolution: int | tuple[int, int]) -> int:
        """Decoding steps (transformer positions) of one image at `resolution` pixels a side, or
        of a (width, height) image."""
        rows, cols = self.window_grid(resolution)
        return rows * cols

    def code_grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of codes of a (width, height) image in pixels (an int: a square)."""
        width, height = (size, size) if isinstance(size, int) else size
        return height // self.vq_downsample, width // self.vq_downsample

    def window_grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of shuffle windows, one decoding step each, of a (width, height)
        image in pixels (an int: a square)."""
        rows, cols = self.code_grid(size)
        return rows // self.shuffle_window, cols // self.shuffle_window

    def trained_sizes(self) -> list[tuple[str, int, int]]:
        """(name, width, height) of every image size the model trained on: its buckets, or the
        squares of `resolutions` (named "1:1") for a model without buckets."""
        if self.buckets:
            return [(b["name"], b["width"], b["height"]) for b in self.buckets]
        return [("1:1", r, r) for r in self.resolutions]
