"""megatron_ts: Token-Shuffle text-to-image training on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
