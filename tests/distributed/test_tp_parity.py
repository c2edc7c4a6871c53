"""Tensor parallelism changes nothing numerically: TP = 2 on two gloo ranks equals TP = 1.

One spawned world (rank start-up costs ~7 s) runs every check for three model variants:

1. Building with one seed at TP = 1 and at TP = 2 gives the same full weights (the TP = 2 shards,
   merged with `megatron_ts.models.sharding`, equal the TP = 1 state dict bit for bit): layers
   are seeded per layer and megatron initialises the full master matrix on CPU before slicing.
2. With identical random weights (TP = 1 weights split by `shard_state_dict`), logits, the loss
   (cross-entropy, text weight and z-loss over the vocabulary-parallel log Z) and the merged
   gradients of every parameter agree with TP = 1 in fp32.
3. The code-only image head (each rank scores image positions against its shard's overlap with
   the codebook, maybe none) gives the loss and the head-weight and hidden-input gradients of
   the full-vocabulary head with the masked loss (tests/unit/test_image_head.py) to 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed

SEED = 4321
# (name, shuffle window, model overrides): plain, token-shuffle, token-shuffle + grouped-query
VARIANTS = [
    ("s1", 1, {}),
    ("s2", 2, {}),
    ("s4-gqa", 4, {"num_kv_heads": 2}),
]
TOL = {"rtol": 1e-5, "atol": 1e-5}
# (name, vocabulary, image columns on TP ranks 0 and 1): the codes straddle the shard boundary;
# rank 0 holds no code (of 640 rows, codes are ids 517..580) and joins the collectives with none
HEAD_CASES = [("straddle", (256, 512), (187, 325)), ("rank0-no-codes", (512, 64), (0, 64))]


def _step(model, s: int, labels: tuple) -> tuple:
    """One forward/backward with TokenShuffleLoss (z-loss on); returns logits, loss parts, grads."""
    from megatron_ts.models.loss import TokenShuffleLoss

    text, _, codes = labels
    loss_fn = TokenShuffleLoss(model.spec.vocab, s, text_weight=0.5, z_coef=1e-2)
    text_logits, image_logits = model(text, codes)
    loss_fn((text_logits, image_logits), labels).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return text_logits.detach(), image_logits.detach(), loss_fn.pop_history()[0], grads


def _parity_worker(rank: int, world: int) -> dict:
    """Runs TP = 1 (every rank, same data) then TP = 2 and returns what the parent compares."""
    import torch.distributed as dist

    from megatron_ts.config import ModelConfig
    from megatron_ts.distributed.init import init_distributed, init_model_parallel
    from megatron_ts.models.model import ModelSpec, TokenShuffleLM
    from megatron_ts.models.sharding import merge_state_dicts, shard_state_dict
    from megatron_ts.vocab import VocabLayout

    init_distributed("gloo")
    vocab = VocabLayout(text_size=256, codebook_size=512)
    out = {}

    def gather(obj):
        objs = [None] * world
        dist.all_gather_object(objs, obj)
        return objs

    for name, s, overrides in VARIANTS:
        gen = torch.Generator().manual_seed(7)
        text = torch.randint(0, 256, (2, 10), generator=gen)
        text[:, 0], text[:, -1] = vocab.bos_id, vocab.boi_id
        mask = torch.ones_like(text, dtype=torch.bool)
        mask[1, 6:9] = False  # caption padding of the second sample
        codes = torch.randint(0, 512, (2, 8, 8), generator=gen)
        labels = (text, mask, codes)

        cfg = ModelConfig(flavor="debug", **overrides)
        spec1 = ModelSpec.from_config(cfg, vocab, s, tensor_parallel=1)
        spec2 = ModelSpec.from_config(cfg, vocab, s, tensor_parallel=2)

        # TP = 1 on every rank (megatron sees DP = 2; the ranks compute the same thing)
        init_model_parallel(1, 1)
        ref = TokenShuffleLM(spec1, seed=SEED)
        init_full = {k: v.clone() for k, v in ref.state_dict().items() if v is not None}
        gen = torch.Generator().manual_seed(99)
        # random weights everywhere, including the zero-initialised residual branches
        full = {
            k: (1.0 + 0.1 * torch.randn(v.shape, generator=gen))
            if v.dim() == 1
            else torch.randn(v.shape, generator=gen) / v.shape[-1] ** 0.5
            for k, v in init_full.items()
        }
        ref.load_state_dict(full, strict=False)
        ref_text, ref_image, ref_parts, ref_grads = _step(ref, s, labels)

        # TP = 2 across the two ranks
        init_model_parallel(2, 1)
        tp = TokenShuffleLM(spec2, seed=SEED)
        init_local = {k: v for k, v in tp.state_dict().items() if v is not None}
        init_merged = merge_state_dicts(gather(init_local))
        tp.load_state_dict(shard_state_dict(full, rank, world), strict=False)
        tp_text, tp_image, tp_parts, tp_grads = _step(tp, s, labels)
        # logits are vocabulary shards: concatenate them in rank order
        tp_text = torch.cat(gather(tp_text), dim=-1)
        tp_image = torch.cat(gather(tp_image), dim=-1)
        grads_merged = merge_state_dicts(gather(tp_grads))

        out[name] = {
            "init_full": init_full,
            "init_merged": init_merged,
            "local_shapes": {k: tuple(v.shape) for k, v in init_local.items()},
            "ref": (ref_text, ref_image, ref_parts, ref_grads),
            "tp": (tp_text, tp_image, tp_parts, grads_merged),
        }
    out["image_head"] = _image_head_cases(rank, world, gather)
    return out


def _image_head_cases(rank: int, world: int, gather) -> dict:
    """Per case: the reference at TP = 1 (full head, masked loss) and the code-only head at TP = 2."""
    from megatron_ts.config import ModelConfig
    from megatron_ts.distributed.init import init_model_parallel
    from megatron_ts.models.model import ModelSpec, OutputLayer, transformer_config
    from megatron_ts.models.sharding import shard_state_dict
    from megatron_ts.testing import randomize_weights
    from megatron_ts.vocab import VocabLayout
    from tests.unit.test_image_head import run, stage_inputs

    out = {}
    for name, (text_size, codebook), _ in HEAD_CASES:
        vocab = VocabLayout(text_size=text_size, codebook_size=codebook)
        spec1 = ModelSpec.from_config(ModelConfig(flavor="debug"), vocab, 2, tensor_parallel=1)
        spec2 = ModelSpec.from_config(ModelConfig(flavor="debug"), vocab, 2, tensor_parallel=2)
        inputs, labels = stage_inputs(spec1, b=2, caption=6, grid=8, seed=6)
        init_model_parallel(1, 1)
        ref = OutputLayer(spec1, transformer_config(spec1), seed=SEED)
        randomize_weights(ref, seed=7)
        ref_loss, ref_grads, _ = run(ref, inputs, labels, reference=True)
        init_model_parallel(2, 1)
        tp = OutputLayer(spec2, transformer_config(spec2), seed=SEED)
        tp.load_state_dict(shard_state_dict(ref.state_dict(), rank, world))
        loss, (head_grad, hidden_grad), (_, image_logits) = run(tp, inputs, labels, False)
        out[name] = {
            "ref": (ref_loss, *ref_grads),
            "tp": (loss, torch.cat(gather(head_grad), dim=0), hidden_grad),
            "image_columns": image_logits.shape[-1],
        }
    return out


@pytest.fixture(scope="module")
def parity() -> list[dict]:
    return run_distributed(_parity_worker, 2)


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_same_seed_same_full_weights(parity: list[dict], variant: str):
    for rank_out in parity:
        res = rank_out[variant]
        full, merged = res["init_full"], res["init_merged"]
        assert sorted(full) == sorted(merged)
        for key in full:
            assert torch.equal(full[key], merged[key]), f"{variant}: {key} differs after merge"
    # the shards really are halves: heads, vocabulary and SwiGLU split across the ranks
    shapes = parity[0][variant]["local_shapes"]
    assert shapes["input_stage.embedding.weight"] == (448, 64)  # 896 / 2 vocabulary rows
    assert shapes["output_stage.head.weight"] == (448, 64)
    assert shapes["blocks.0.layer.mlp.linear_fc1.weight"] == (176, 64)  # [gate; up] / 2
    assert shapes["blocks.0.layer.self_attention.linear_proj.weight"] == (64, 32)
    qkv_rows = 96 if variant != "s4-gqa" else 64  # (4 q + 2 x 4 kv) / 2 or (4 q + 2 x 2 kv) / 2
    assert shapes["blocks.0.layer.self_attention.linear_qkv.weight"] == (qkv_rows, 64)


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_logits_loss_and_grads_match_tp1(parity: list[dict], variant: str):
    for rank_out in parity:
        ref_text, ref_image, ref_parts, ref_grads = rank_out[variant]["ref"]
        tp_text, tp_image, tp_parts, tp_grads = rank_out[variant]["tp"]
        assert tp_text.shape == ref_text.shape == (9, 2, 896)
        torch.testing.assert_close(tp_text, ref_text, **TOL)
        torch.testing.assert_close(tp_image, ref_image, **TOL)
        assert ref_parts.z_loss > 1.0  # z-loss really contributes (1e-2 x mean log Z^2)
        assert ref_parts.text_tokens == 2 * 9 - 3  # three padded caption targets are masked
        for field in ("total", "image", "text", "z_loss"):
            assert getattr(tp_parts, field) == pytest.approx(getattr(ref_parts, field), rel=1e-5)
        assert sorted(tp_grads) == sorted(ref_grads)
        for key in ref_grads:
            assert ref_grads[key].abs().max() > 0, f"{key}: no gradient, the check is vacuous"
            torch.testing.assert_close(tp_grads[key], ref_grads[key], **TOL, msg=key)


@pytest.mark.parametrize("case", [c[0] for c in HEAD_CASES])
def test_code_only_image_head_matches_full_vocabulary_head(parity: list[dict], case: str):
    from tests.unit.test_image_head import assert_rel

    columns = dict((c[0], c[2]) for c in HEAD_CASES)[case]
    for rank, rank_out in enumerate(parity):
        res = rank_out["image_head"][case]
        assert res["image_columns"] == columns[rank]
        for what, got, want in zip(
            ("loss", "head weight grad", "hidden grad"), res["tp"], res["ref"]
        ):
            assert_rel(got, want, f"rank {rank}, {case}: {what}")


def test_ranks_agree(parity: list[dict]):
    """Both TP ranks hold the same gathered logits and loss (nothing rank-local leaks)."""
    for name, _, _ in VARIANTS:
        a, b = parity[0][name]["tp"], parity[1][name]["tp"]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[2].total == b[2].total
