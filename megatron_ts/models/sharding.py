"""Tensor-parallel layout of every parameter: one table, pure split/merge transforms.

Used to reshard checkpoints between layouts, to export to Hugging Face (merge) and to load a
full model into TP shards (split). Rules match by parameter-name suffix; anything not listed is
replicated on every TP rank (norms, token-shuffle compress/expand).
"""

from __future__ import annotations

import torch

# suffix -> (partition dim, stride). stride 2: the local shard holds [gate_r; up_r] (SwiGLU fc1).
TP_RULES: tuple[tuple[str, int, int], ...] = (
    ("embedding.weight", 0, 1),
    ("head.weight", 0, 1),
    ("self_attention.linear_qkv.weight", 0, 1),  # whole query groups per rank
    ("self_attention.linear_proj.weight", 1, 1),
    ("mlp.linear_fc1.weight", 0, 2),
    ("mlp.linear_fc2.weight", 1, 1),
    (".fc1.weight", 0, 1),  # token-shuffle residual MLPs
    (".fc2.weight", 1, 1),
)


def tp_rule(name: str) -> tuple[int, int] | None:
    """(dim, stride) for a TP-partitioned parameter, None if replicated."""
    for suffix, dim, stride in TP_RULES:
        if name.endswith(suffix):
            return dim, stride
    return None


def split_tp(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of a full parameter."""
    rule = tp_rule(name)
    if rule is None or world == 1:
        return full
    dim, stride = rule
    if full.shape[dim] % (world * stride):
        raise ValueError(
            f"{name}: size {full.shape[dim]} along dim {dim} is not divisible by TP {world} x {stride}"
        )
    chunks = torch.chunk(full, world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim).clone()


def merge_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full parameter from its TP shards in rank order."""
    rule = tp_rule(name)
    world = len(shards)
    if rule is None or world == 1:
        return shards[0]
    dim, stride = rule
    pieces = [torch.chunk(shard, stride, dim=dim) for shard in shards]  # [rank][stride]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(world)], dim=dim)


def shard_state_dict(
    full: dict[str, torch.Tensor], rank: int, world: int
) -> dict[str, torch.Tensor]:
    """Splits a full (TP = 1) state dict into one TP rank's state dict."""
    return {name: split_tp(name, t, rank, world) for name, t in full.items()}


def merge_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merges TP ranks' state dicts (rank order) into a full state dict."""
    return {name: merge_tp(name, [s[name] for s in shards]) for name in shards[0]}
