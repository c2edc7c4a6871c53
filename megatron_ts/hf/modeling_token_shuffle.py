"""Hugging Face model of an exported Token-Shuffle decoder: plain single-device PyTorch.

It computes what megatron_ts's training model computes (parity is tested to 1e-4 in fp32):
RMSNorm, grouped-query attention with rotate-half RoPE, SwiGLU, token-shuffle of image windows on
the input side and token-unshuffle + the shared head on the output side. This file is copied next
to the weights of every export and imports only torch and transformers.

Sequence format: `<bos>`, caption ids padded with `<pad>` to `caption_len`, `<boi>`, then image
windows (s x s codes each, raster order, one transformer position per window). The `<boi>`
position and every window position predict the s^2 codes of the next window.

`generate()` overrides transformers' one-token-per-step loop: each step feeds a whole window and
samples its s^2 codes under classifier-free guidance (generation_token_shuffle.py); `pipeline()`
adds the export's text tokenizer and VQ decoder (pipeline_token_shuffle.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.utils import ModelOutput

from .configuration_token_shuffle import TokenShuffleConfig
from .generation_token_shuffle import grid_to_windows, windows_to_grid

__all__ = [
    "KVCache",
    "TokenShuffleConfig",
    "TokenShuffleForCausalLM",
    "TokenShuffleModel",
    "grid_to_windows",
    "windows_to_grid",
]


class KVCache:
    """Keys and values of every layer, preallocated and grown by doubling.

    Shapes per layer: (B, kv_heads, capacity, head_dim); `length` positions are filled. The
    first call's prompt length and window grid are kept too, so a decoding step that feeds only
    a window still knows which window it predicts (`WindowPositions`).
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self.num_layers = num_layers
        self.capacity = capacity
        self.length = 0
        self.text_len: int | None = None
        self.window_grid: tuple[int, int] | None = None
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return self.length

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends (B, Hkv, q, D) keys/values at `length`; returns all keys/values so far."""
        start, q = self.length, k.shape[2]
        stored = self.keys[layer]
        if stored is None or stored.shape[2] < start + q:
            cap = max(self.capacity, start + q, 2 * (0 if stored is None else stored.shape[2]))
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(new_k.shape)
            if stored is not None:
                new_k[:, :, :start] = stored[:, :, :start]
                new_v[:, :, :start] = self.values[layer][:, :, :start]
            self.keys[layer], self.values[layer] = new_k, new_v
        self.keys[layer][:, :, start : start + q] = k
        self.values[layer][:, :, start : start + q] = v
        return self.keys[layer][:, :, : start + q], self.values[layer][:, :, : start + q]

    def advance(self, q: int) -> None:
        """Marks q more positions as filled (after every layer has been updated)."""
        self.length += q

    def reorder(self, index: torch.Tensor) -> None:
        """Selects batch rows (e.g. to duplicate a prefix for several images)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(0, index)
                self.values[i] = self.values[i].index_select(0, index)


def _rope_cos_sin(
    positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (L, dim) in the rotate-half layout [f, f], computed in fp32 as in training."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    )
    freqs = torch.outer(positions.float(), inv_freq)  # (L, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class TokenShuffleAttention(nn.Module):
    def __init__(self, config: TokenShuffleConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        past: int,
    ) -> torch.Tensor:
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin  # (B, H, q, D)
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, past + q, D)
        gqa = self.num_kv_heads != self.num_heads
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif q_len == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # new queries see every cached position and the causal part of their own block
            total = k.shape[2]
            qi = torch.arange(past, past + q_len, device=x.device)[:, None]
            mask = torch.arange(total, device=x.device)[None, :] <= qi  # (q, past + q)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class TokenShuffleMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TokenShuffleConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TokenShuffleDecoderLayer(nn.Module):
    def __init__(self, config: TokenShuffleConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = TokenShuffleAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TokenShuffleMLP(config)

    def forward(self, x, cos, sin, cache, layer, past):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, past)
        return x + self.mlp(self.post_attention_layernorm(x))


class ResidualMLP(nn.Module):
    """x + fc2(silu(fc1(x))), width d."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.silu(self.fc1(x)))


class TokenShuffle(nn.Module):
    """Compresses each code embedding to d/s^2, concatenates a window to d, refines it."""

    def __init__(self, config: TokenShuffleConfig):
        super().__init__()
        d, s2 = config.hidden_size, config.shuffle_window**2
        self.compress = nn.Linear(d, d // s2, bias=False)
        self.blocks = nn.ModuleList(ResidualMLP(d) for _ in range(config.shuffle_mlp_blocks))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, n, s^2, d) window code embeddings -> (B, n, d)."""
        x = self.compress(emb).flatten(2)  # (B, n, d): window concatenated along channels
        for block in self.blocks:
            x = block(x)
        return x


class TokenUnshuffle(nn.Module):
    """Refines each position, splits it into s^2 parts of d/s^2 and expands each back to d."""

    def __init__(self, config: TokenShuffleConfig):
        super().__init__()
        d, s2 = config.hidden_size, config.shuffle_window**2
        self.window2 = s2
        self.blocks = nn.ModuleList(ResidualMLP(d) for _ in range(config.shuffle_mlp_blocks))
        self.expand = nn.Linear(d // s2, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n, d) -> (B, n, s^2, d)."""
        for block in self.blocks:
            h = block(h)
        b, n, d = h.shape
        return self.expand(h.reshape(b, n, self.window2, d // self.window2))


class WindowPositions(nn.Module):
    """Where the window a position predicts lies, and the image's shape: megatron_ts's
    `WindowPositions`, applied to any run of new positions (a whole sequence or a cached step).

    The position predicting window k of an R x C window grid (`<boi>` at T-1 predicts window 0,
    the position of window k-1 predicts window k) gets row[k // C] + col[k % C] + rows[R - 1]
    + cols[C - 1] added to its input, after token-shuffle; every other position gets nothing.
    """

    def __init__(self, config: TokenShuffleConfig):
        super().__init__()
        n, d = config.max_windows_per_side, config.hidden_size
        self.max_side = n
        self.row = nn.Parameter(torch.zeros(n, d))
        self.col = nn.Parameter(torch.zeros(n, d))
        self.rows = nn.Parameter(torch.zeros(n, d))
        self.cols = nn.Parameter(torch.zeros(n, d))

    def forward(self, window_grid: tuple[int, int], first: int, count: int) -> torch.Tensor:
        """(count, d) additions for positions predicting windows first .. first + count - 1
        (negative or >= R x C: a text position or the last window, which get zeros)."""
        r, c = window_grid
        if max(r, c) > self.max_side:
            raise ValueError(
                f"an image of {r} x {c} windows exceeds max_windows_per_side = "
                f"{self.max_side} in config.json; this model cannot draw that size"
            )
        k = torch.arange(first, first + count, device=self.row.device)
        valid = (k >= 0) & (k < r * c)
        k = k.clamp(0, r * c - 1)
        pos = self.row[k // c] + self.col[k % c] + self.rows[r - 1] + self.cols[c - 1]  # (n, d)
        return pos * valid[:, None].to(pos.dtype)


@dataclass
class TokenShuffleOutput(ModelOutput):
    """Outputs of `TokenShuffleForCausalLM.forward`.

    Attributes:
        logits: (B, T, V) next-token logits of the text positions (None if not requested).
        image_logits: (B, n, s^2, V) logits of the next window's codes predicted by the last
            text position (when it is `<boi>`) and by every window position.
        kv_cache: the KV cache, when `use_cache` (named so because transformers >= 5.24 renames
            a ModelOutput field called `past_key_values` or `cache_params`).
        hidden_states: (B, L, d) final-normed hidden states of all new positions.
    """

    logits: torch.Tensor | None = None
    image_logits: torch.Tensor | None = None
    kv_cache: KVCache | None = None
    hidden_states: torch.Tensor | None = None


class TokenShufflePreTrainedModel(PreTrainedModel):
    config_class = TokenShuffleConfig
    base_model_prefix = "model"
    _no_split_modules = ["TokenShuffleDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, WindowPositions):  # zero: a model gaining them computes as before
            for table in (module.row, module.col, module.rows, module.cols):
                nn.init.zeros_(table)
            return
        super()._init_weights(module)


class TokenShuffleModel(TokenShufflePreTrainedModel):
    """Embedding, token-shuffle, decoder blocks and final norm."""

    def __init__(self, config: TokenShuffleConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.shuffle = TokenShuffle(config) if config.shuffle_window > 1 else None
        self.window_positions = None
        if config.max_windows_per_side > 0:
            self.window_positions = WindowPositions(config)
        self.layers = nn.ModuleList(
            TokenShuffleDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _add_window_positions(self, x, input_ids, past, cache, window_grid, need_windows):
        """x (B, L, d) of the new positions at past .. past + L - 1, plus their window
        positions; records the prompt length and grid in the cache for later steps."""
        text_len = input_ids.shape[1] if (past == 0 and input_ids is not None) else None
        if cache is not None:
            if text_len is not None:
                cache.text_len, cache.window_grid = text_len, window_grid
            text_len = cache.text_len if text_len is None else text_len
            window_grid = cache.window_grid if window_grid is None else window_grid
        if window_grid is None or text_len is None:
            if not need_windows:
                return x
            raise ValueError(
                "window_grid: this model has window-position tables (max_windows_per_side = "
                f"{self.config.max_windows_per_side}), so its image predictions depend on the "
                "image shape; pass window_grid=(rows, cols) of shuffle windows "
                "(config.window_grid((width, height))) with the prompt, and feed the prompt "
                "(input_ids) first"
            )
        # position p predicts window p - (T - 1): <boi> at T - 1 predicts window 0
        pos = self.window_positions(tuple(window_grid), past - (text_len - 1), x.shape[1])
        return x + pos.to(x.dtype)  # (B, L, d)

    def embed_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, n, s^2) codebook-local codes -> (B, n, d) window positions."""
        emb = self.embed_tokens(windows + self.config.code_offset)  # (B, n, s^2, d)
        if self.shuffle is None:
            return emb[:, :, 0]
        return self.shuffle(emb)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        image_windows: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        window_grid: tuple[int, int] | None = None,
        need_windows: bool = True,
    ) -> torch.Tensor:
        """Returns final-normed hidden states (B, L, d) of the new positions.

        Args:
            input_ids: (B, T) text/special ids (first, at the start of the sequence).
            image_windows: (B, n, s^2) codebook-local codes of whole windows.
            past_key_values: a `KVCache` (it keeps the prompt length and `window_grid`).
            window_grid: (R, C) windows down and across the image being predicted; a model
                with window-position tables needs it (from here or the cache).
            need_windows: False when no image window is fed or predicted (a text-only pass):
                a model with tables then runs without `window_grid`.
        """
        parts = []
        if input_ids is not None:
            parts.append(self.embed_tokens(input_ids))  # (B, T, d)
        if image_windows is not None:
            parts.append(self.embed_windows(image_windows))  # (B, n, d)
        if not parts:
            raise ValueError("pass input_ids, image_windows or both")
        x = torch.cat(parts, dim=1)  # (B, L, d)
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        if self.window_positions is not None:
            x = self._add_window_positions(
                x, input_ids, past, past_key_values, window_grid, need_windows
            )
        elif past_key_values is not None and past == 0 and input_ids is not None:
            past_key_values.text_len = input_ids.shape[1]
        positions = torch.arange(past, past + x.shape[1], device=x.device)
        cos, sin = _rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, past_key_values, i, past)
        if past_key_values is not None:
            past_key_values.advance(x.shape[1])
        return self.norm(x)


class TokenShuffleForCausalLM(TokenShufflePreTrainedModel, GenerationMixin):
    """The decoder with token-unshuffle and the output head over the padded vocabulary."""

    def __init__(self, config: TokenShuffleConfig):
        super().__init__(config)
        self.model = TokenShuffleModel(config)
        self.unshuffle = TokenUnshuffle(config) if config.shuffle_window > 1 else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty KV cache with room for `capacity` positions (it grows when needed)."""
        return KVCache(self.config.num_hidden_layers, capacity)

    def image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, d) final-normed hidden -> (B, n, s^2, V) logits of the next window's codes."""
        if self.unshuffle is None:
            hidden = hidden.unsqueeze(2)  # (B, n, 1, d)
        else:
            hidden = self.unshuffle(hidden)  # (B, n, s^2, d)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        image_windows: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        text_logits: bool = True,
        image_logits: bool | None = None,
        image_logits_to_keep: int = 0,
        window_grid: tuple[int, int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenShuffleOutput:
        """Runs new positions (text ids, then image windows) after the cached ones.

        Args:
            input_ids: (B, T) vocabulary ids of text/special positions.
            image_windows: (B, n, s^2) codebook-local codes of whole windows (raster order;
                see `grid_to_windows`).
            past_key_values: a `KVCache` from an earlier call (filled in place).
            use_cache: create a cache when none is given and return it.
            text_logits: compute `logits` for the text positions.
            image_logits: compute `image_logits`; None means when windows are given or the last
                text id is `<boi>`.
            image_logits_to_keep: compute image logits for the last k positions only (0: all);
                decoding without a cache needs only the last.
            window_grid: (R, C) shuffle windows down and across the image
                (`config.window_grid((width, height))`). Required by a model with
                window-position tables (`config.max_windows_per_side` > 0) whenever windows
                are fed or predicted; a `KVCache` keeps the one given with the prompt.
            return_dict: accepted for API compatibility; the output is always a ModelOutput.

        Returns:
            TokenShuffleOutput.
        """
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        t = 0 if input_ids is None else input_ids.shape[1]
        if image_logits is None:
            image_logits = image_windows is not None or (
                t > 0 and bool((input_ids[:, -1] == self.config.boi_token_id).all())
            )
        hidden = self.model(
            input_ids,
            image_windows,
            past_key_values,
            window_grid=window_grid,
            need_windows=image_windows is not None or bool(image_logits),
        )  # (B, L, d)
        logits = self.lm_head(hidden[:, :t]) if (text_logits and t) else None
        img = None
        if image_logits:
            start = t - 1 if t > 0 else 0  # the <boi> position predicts the first window
            if image_logits_to_keep:
                start = max(start, hidden.shape[1] - image_logits_to_keep)
            img = self.image_head(hidden[:, start:])  # (B, n, s^2, V)
        return TokenShuffleOutput(
            logits=logits,
            image_logits=img,
            kv_cache=past_key_values,
            hidden_states=hidden,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        generation_config=None,
        *,
        negative_input_ids: torch.Tensor | None = None,
        resolution: int | None = None,
        size: str | None = None,
        guidance_scale: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_cache: bool | None = None,
        progress: bool | object = False,
        **kwargs,
    ) -> torch.Tensor:
        """Samples the image code grid of each prompt (KV cache, classifier-free guidance).

        Unset arguments take `generation_config` (default: the export's generation_config.json).
        Row i is sampled with its own CPU generator, seeded seed + i, so an image does not
        depend on the device or on the other rows.

        Args:
            input_ids: (B, T) prompts `<bos> caption <pad>... <boi>` (the pipeline's
                `prompt_ids(prompts)` builds them).
            generation_config: a GenerationConfig or dict overriding the model's.
            negative_input_ids: (B, T) prompts of the unconditional stream (default: the empty
                caption, as caption dropout trained it).
            resolution: side in pixels of a square image, one the model was trained at.
            size: "WxH" pixels (width first: "96x48" is landscape) or a ratio "W:H", one of
                the sizes the model was trained at (`config.trained_sizes()`).
            guidance_scale: classifier-free guidance target (>= 1; 1 = none).
            cfg_schedule: constant, linear or half-linear.
            temperature: softmax temperature (0 = greedy); `do_sample=False` also means greedy.
            top_k: keep the k most likely codes (0 = all).
            top_p: nucleus mass (1 = all).
            seed: row i uses seed + i (default 0), or a list of one seed per row.
            generator: one torch.Generator per row instead of seeds.
            use_cache: decode with the KV cache (default True).
            progress: True for a tqdm bar, or an object with `update(n)`.

        Returns:
            (B, H, W) long tensor of codebook-local codes, H = height / vq_downsample and W
            likewise (add `config.code_offset` for vocabulary ids); decode them to pixels with
            the export's VQ (`pipeline().vq`).
        """
        from .generation_token_shuffle import (
            SamplingConfig,
            check_prompt_ids,
            resolve_size,
            sample_codes,
            seeded_generators,
            unconditional_ids,
        )

        if kwargs:
            raise TypeError(
                f"generate() does not take {sorted(kwargs)}: it samples a whole image; see its "
                "docstring for the arguments (guidance_scale, temperature, top_k, top_p, seed, ...)"
            )
        sampling = SamplingConfig.from_generation_config(
            self.generation_config if generation_config is None else generation_config,
            guidance_scale=guidance_scale,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            do_sample=do_sample,
            seed=seed if isinstance(seed, int) else None,
            resolution=resolution,
            size=size,
            use_kv_cache=use_cache,
        )
        check_prompt_ids(self.config, input_ids)
        input_ids = input_ids.to(self.device)
        grid = self.config.code_grid(resolve_size(self.config, sampling.size, sampling.resolution))
        uncond = None
        if sampling.cfg_scale != 1:
            if negative_input_ids is None:
                uncond = unconditional_ids(self.config, *input_ids.shape, input_ids.device)
            else:
                check_prompt_ids(self.config, negative_input_ids)
                if negative_input_ids.shape != input_ids.shape:
                    raise ValueError(
                        f"negative_input_ids {tuple(negative_input_ids.shape)} must have the "
                        f"shape of input_ids {tuple(input_ids.shape)}"
                    )
                uncond = negative_input_ids.to(self.device)
        seeds = seed if isinstance(seed, (list, tuple)) else sampling.seed
        generators = seeded_generators(input_ids.shape[0], seeds, generator)
        bar = progress
        if progress is True:
            from tqdm.auto import tqdm

            s = self.config.shuffle_window
            steps = (grid[0] // s) * (grid[1] // s)
            bar = tqdm(total=steps, unit="step", desc="decoding")
        elif progress is False:
            bar = None
        try:
            return sample_codes(self, input_ids, grid, sampling, generators, uncond, bar)
        finally:
            if progress is True:
                bar.close()

    def pipeline(self, model_dir=None, need_vq: bool = True):
        """A `TokenShufflePipeline` (prompts in, PIL images out) around this model, with the
        text tokenizer and VQ decoder of its export directory (default: where it was loaded
        from)."""
        from .pipeline_token_shuffle import TokenShufflePipeline

        # transformers 4.45 copies into its module cache only the files this file imports itself,
        # not what those import in turn: name the pipeline's own imports here too (and none of
        # them may import this file back: 4.45 loops forever on a cycle)
        from .tokenization_token_shuffle import load_text_tokenizer  # noqa: F401
        from .vq_token_shuffle import load_vq  # noqa: F401

        return TokenShufflePipeline.from_model(self, model_dir, need_vq)
