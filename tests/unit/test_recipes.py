"""Every bundled config validates, and the paper recipe holds the paper's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_ts.config import load_config, validate
from megatron_ts.training.plan import dry_run_report

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pretrain/configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_bundled_config_validates(path):
    cfg = load_config(path)
    stages = validate(cfg, world_size=None)
    report = dry_run_report(cfg, stages)
    assert report["parameters"]["total"] > 0
    assert all(s["steps"] > 0 for s in report["stages"])


def test_paper_recipe_matches_the_paper():
    cfg = load_config(Path(__file__).resolve().parents[2] / "pretrain/configs/paper_2.7B.toml")
    stages = validate(cfg, world_size=None)
    report = dry_run_report(cfg, stages)
    assert [s.resolution for s in stages] == [512, 1024, 2048]
    assert [s.shuffle_window for s in stages] == [1, 2, 2]
    # z-loss only where the paper added it
    assert [s.z_loss > 0 for s in stages] == [False, False, True]
    # 16x VQ: 1024, 4096, 16384 codes; positions 1024, 1024, 4096 with s = 1, 2, 2
    assert [s["image_codes_per_sample"] for s in report["stages"]] == [1024, 4096, 16384]
    assert [s["image_positions_per_sample"] for s in report["stages"]] == [1024, 1024, 4096]
    # the paper's token budgets: ~50B, ~2T, ~300B
    tokens = [s["tokens"] for s in report["stages"]]
    for got, want in zip(tokens, (50e9, 2e12, 300e9)):
        assert want <= got < want * 1.001
    # 2.7B: hidden 3072, 20 blocks
    assert report["shape"]["hidden_size"] == 3072 and report["shape"]["num_layers"] == 20
    assert 2.5e9 < report["parameters"]["total"] < 2.8e9


def test_demo_recipe_text_size_matches_the_demo_tokenizer(tmp_path):
    from data_tools.demo import HELD_OUT, make_sample
    from data_tools.demo_tokenizer import write_demo_tokenizer
    from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer

    cfg = load_config(Path(__file__).resolve().parents[2] / "pretrain/configs/demo.toml")
    tok = load_text_tokenizer(str(write_demo_tokenizer(tmp_path / "tok.json")))
    assert tok.vocab_size == cfg.tokenizer.text_size
    longest = 0
    for i in range(300):
        _, text, _ = make_sample(i, 0, 32, HELD_OUT, two_object_prob=0.5)
        ids = tok.encode(text)
        assert 0 not in ids, f"unknown word in {text!r}"
        longest = max(longest, len(ids))
    # every caption fits the stages' caption_len, so no two-object caption is truncated
    stages = validate(cfg, world_size=None)
    assert longest <= min(s.caption_len for s in stages)
