"""Hugging Face side: the exported model's config and modeling code, weight maps, export/import.

`configuration_token_shuffle.py` and `modeling_token_shuffle.py` are copied into every export
and import only torch/transformers; the rest of this package uses megatron_ts.
"""

from megatron_ts.hf.configuration_token_shuffle import TokenShuffleConfig
from megatron_ts.hf.modeling_token_shuffle import KVCache, TokenShuffleForCausalLM

__all__ = ["KVCache", "TokenShuffleConfig", "TokenShuffleForCausalLM"]
