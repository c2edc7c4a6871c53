"""Checkpoint model files: writing, resolving, merging and resharding (see model_files)."""

from megatron_ts.checkpoint.model_files import (
    CheckpointError,
    iter_full_state_dict,
    load_full_state_dict,
    load_into_model,
    read_meta,
    resolve_checkpoint,
    write_layer_file,
)

__all__ = [
    "CheckpointError",
    "iter_full_state_dict",
    "load_full_state_dict",
    "load_into_model",
    "read_meta",
    "resolve_checkpoint",
    "write_layer_file",
]
