"""Process groups and the glue between megatron-core parallel state and DeepSpeed."""
