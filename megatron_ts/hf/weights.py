"""Weight names and layouts between the training model and the Hugging Face model, as a table.

Each rule maps a full (TP-merged) training parameter to one or more HF parameters with a pure
tensor transform, and back. The two layout changes are the only places an export can go
silently wrong, so both are spelled out here:

- megatron's fused QKV is group-interleaved along dim 0: for each of the kv groups, the q heads
  of that group, then its k head, then its v head (`[g0: q.. k v][g1: q.. k v]...`);
- megatron's SwiGLU fc1 holds [gate; up] (after `sharding.merge_tp` undid the stride-2 TP layout).

RoPE needs no permutation: megatron's non-interleaved RoPE is the rotate-half layout of HF Llama.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionShape:
    """What the QKV transforms need to know."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, ...]:
    """Megatron fused QKV (ng*(q_per_g+2)*hd, d) -> q (nh*hd, d), k (ng*hd, d), v (ng*hd, d)."""
    ng, hd = shape.num_kv_heads, shape.head_dim
    qpg = shape.num_heads // ng
    grouped = qkv.reshape(ng, qpg + 2, hd, qkv.shape[-1])  # (ng, q_per_g + 2, hd, d)
    q = grouped[:, :qpg].reshape(ng * qpg * hd, -1)
    k = grouped[:, qpg].reshape(ng * hd, -1)
    v = grouped[:, qpg + 1].reshape(ng * hd, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape
) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    ng, hd = shape.num_kv_heads, shape.head_dim
    qpg = shape.num_heads // ng
    d = q.shape[-1]
    grouped = torch.cat(
        [q.reshape(ng, qpg, hd, d), k.reshape(ng, 1, hd, d), v.reshape(ng, 1, hd, d)], dim=1
    )  # (ng, q_per_g + 2, hd, d)
    return grouped.reshape(ng * (qpg + 2) * hd, d).contiguous()


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SwiGLU fc1 [gate; up] (2f, d) -> gate (f, d), up (f, d)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


@dataclass(frozen=True)
class Rule:
    """Training-name pattern -> HF-name templates, with the transforms both ways."""

    ours: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | gate_up


RULES: tuple[Rule, ...] = (
    Rule(r"input_stage\.embedding\.weight", ("model.embed_tokens.weight",)),
    Rule(r"input_stage\.shuffle\.(.+)", ("model.shuffle.{0}",)),
    Rule(r"input_stage\.window_positions\.(row|col|rows|cols)", ("model.window_positions.{0}",)),
    Rule(
        r"blocks\.(\d+)\.layer\.input_layernorm\.weight",
        ("model.layers.{0}.input_layernorm.weight",),
    ),
    Rule(
        r"blocks\.(\d+)\.layer\.self_attention\.linear_qkv\.weight",
        tuple(f"model.layers.{{0}}.self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        r"blocks\.(\d+)\.layer\.self_attention\.linear_proj\.weight",
        ("model.layers.{0}.self_attn.o_proj.weight",),
    ),
    Rule(
        r"blocks\.(\d+)\.layer\.pre_mlp_layernorm\.weight",
        ("model.layers.{0}.post_attention_layernorm.weight",),
    ),
    Rule(
        r"blocks\.(\d+)\.layer\.mlp\.linear_fc1\.weight",
        ("model.layers.{0}.mlp.gate_proj.weight", "model.layers.{0}.mlp.up_proj.weight"),
        "gate_up",
    ),
    Rule(
        r"blocks\.(\d+)\.layer\.mlp\.linear_fc2\.weight", ("model.layers.{0}.mlp.down_proj.weight",)
    ),
    Rule(r"output_stage\.final_norm\.weight", ("model.norm.weight",)),
    Rule(r"output_stage\.unshuffle\.(.+)", ("unshuffle.{0}",)),
    Rule(r"output_stage\.head\.weight", ("lm_head.weight",)),
)


class UnknownWeightError(KeyError):
    """A parameter name no conversion rule knows."""


def _match(name: str) -> tuple[Rule, tuple[str, ...]]:
    for rule in RULES:
        m = re.fullmatch(rule.ours, name)
        if m:
            return rule, m.groups()
    raise UnknownWeightError(
        f"no Hugging Face mapping for training parameter {name!r}; add a rule to "
        "megatron_ts/hf/weights.py RULES"
    )


def to_hf(name: str, tensor: torch.Tensor, attn: AttentionShape) -> list[tuple[str, torch.Tensor]]:
    """One full training parameter -> its HF parameter(s)."""
    rule, groups = _match(name)
    names = [t.format(*groups) for t in rule.hf]
    if rule.kind == "qkv":
        tensors = split_qkv(tensor, attn)
    elif rule.kind == "gate_up":
        tensors = split_gate_up(tensor)
    else:
        tensors = (tensor,)
    return list(zip(names, tensors, strict=True))


def iter_to_hf(
    items: Iterator[tuple[str, torch.Tensor]], attn: AttentionShape
) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams (training name, tensor) pairs into (HF name, tensor) pairs."""
    for name, tensor in items:
        yield from to_hf(name, tensor, attn)


def _hf_patterns() -> list[tuple[re.Pattern, Rule, int]]:
    out = []
    for rule in RULES:
        for idx, template in enumerate(rule.hf):
            pattern = re.escape(template).replace(r"\{0\}", "(.+)")
            out.append((re.compile(pattern), rule, idx))
    return out


def ours_name(hf_name: str) -> tuple[str, int]:
    """HF parameter name -> (training name, index of this part among the rule's HF names)."""
    for pattern, rule, idx in _hf_patterns():
        m = pattern.fullmatch(hf_name)
        if m:
            ours = rule.ours
            for group in m.groups():
                ours = re.sub(r"\([^)]*\)", group.replace("\\", "\\\\"), ours, count=1)
            return ours.replace("\\.", "."), idx
    raise UnknownWeightError(f"no training mapping for Hugging Face parameter {hf_name!r}")


def from_hf(
    getter: Callable[[str], torch.Tensor], hf_names: list[str], attn: AttentionShape
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF parameters (fetched lazily by name) -> full training parameters, in HF-name order."""
    done: set[str] = set()
    for hf_name in hf_names:
        ours, _ = ours_name(hf_name)
        if ours in done:
            continue
        done.add(ours)
        rule, groups = _match(ours)
        parts = [getter(t.format(*groups)) for t in rule.hf]
        if rule.kind == "qkv":
            yield ours, fuse_qkv(*parts, attn)
        elif rule.kind == "gate_up":
            yield ours, fuse_gate_up(*parts)
        else:
            yield ours, parts[0]


def hf_state_dict(full: dict[str, torch.Tensor], attn: AttentionShape) -> dict[str, torch.Tensor]:
    """Converts a whole training state dict (small models, the trainer's previews)."""
    return dict(iter_to_hf(iter(full.items()), attn))
