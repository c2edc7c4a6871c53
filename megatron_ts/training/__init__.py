"""The training engine: DeepSpeed engines around the megatron-core model, checkpoints, metrics."""
