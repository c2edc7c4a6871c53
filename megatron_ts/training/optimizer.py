"""AdamW parameter groups: no weight decay on norms, biases and embeddings."""

from __future__ import annotations

from torch import nn


def no_decay(name: str, param) -> bool:
    """Norm weights, biases (1-D) and token embeddings are not decayed (Llama / GPT practice)."""
    return param.ndim < 2 or name.endswith("embedding.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for DeepSpeed: decayed matrices and everything exempt from decay."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (exempt if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0, "name": "no_decay"})
    return groups
