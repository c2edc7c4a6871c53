"""Named model sizes, one registry (as LlamaGen's GPT_models and gpt-fast's configs).

Parameter counts beside each flavor are for its default vocabulary (byte text tokenizer for
debug/demo; Llama-2's 32000 text ids + 16384 LlamaGen codes for 2.7B/7B) with s = 2 shuffle
layers; `ts-train --dry-run` prints the exact count for any config. `ModelConfig.shape()`
(megatron_ts/config.py) applies a config's overrides; this module imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


FLAVORS: dict[str, ModelShape] = {
    # CPU in seconds; the unit tests and the CI pipeline use it. 2,281,792 params (s = 2).
    "debug": ModelShape(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_hidden_size=176
    ),
    # The bundled demo: learns the synthetic shapes data on 2 CPU cores in minutes.
    # 8,523,456 params (s = 2).
    "demo": ModelShape(
        hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=6, ffn_hidden_size=512
    ),
    # The paper's model: hidden 3072, 20 blocks (Ma et al., 2025); Llama-style 128-dim heads.
    # 2,643,323,904 params (s = 2).
    "2.7B": ModelShape(
        hidden_size=3072, num_layers=20, num_heads=24, num_kv_heads=24, ffn_hidden_size=8192
    ),
    # Llama-2 7B shape. 7,016,288,256 params (s = 2).
    "7B": ModelShape(
        hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_hidden_size=11008
    ),
}
