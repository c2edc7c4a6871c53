"""train-vq's reconstruction loss: object pixels can be weighted over the flat background."""

from __future__ import annotations

import torch

from data_tools.train_vq import _reconstruction_loss


def test_foreground_weight_counts_object_pixels_more():
    x = torch.zeros(1, 3, 8, 8)  # grey background (0 in [-1, 1])
    x[:, 0, 2:4, 2:4] = 1.0  # a 2 x 2 red object: 4 of 64 pixels
    miss_object = x.clone()
    miss_object[:, 0, 2:4, 2:4] = 0.0  # the object painted over with background
    miss_background = x.clone()
    miss_background[:, 0, 6:8, 6:8] = 1.0  # the same error, 4 background pixels

    plain = _reconstruction_loss(miss_object, x, 0.0)
    assert torch.isclose(plain, ((miss_object - x) ** 2 + (miss_object - x).abs()).mean())
    assert torch.isclose(plain, _reconstruction_loss(miss_background, x, 0.0))
    # with weight 8 the object's 4 pixels count 9x: the same error costs 9x more there
    weighted_obj = _reconstruction_loss(miss_object, x, 8.0)
    weighted_bg = _reconstruction_loss(miss_background, x, 8.0)
    assert torch.isclose(weighted_obj / weighted_bg, torch.tensor(9.0))
    assert _reconstruction_loss(x, x, 8.0) == 0


def test_train_vq_fsq_writes_a_loadable_checkpoint(tmp_path):
    import json

    import pytest
    from safetensors import safe_open

    from data_tools.demo import make_demo
    from data_tools.train_vq import train_vq
    from megatron_ts.tokenizers.vq import load_vq

    make_demo(tmp_path / "raw", 24, 32, seed=0, per_shard=24)
    out = tmp_path / "fsq.safetensors"
    result = train_vq(
        [str(tmp_path / "raw")], str(out), steps=3, resolution=32, batch_size=4,
        channels=[8, 8, 8], fsq_levels=[5, 3, 3], eval_images=4, threads=1,
    )  # fmt: skip
    assert 0 < result.codebook_usage <= 1 and result.train_images == 22  # 24 - 24 // 10 held out
    with safe_open(str(out), framework="pt") as f:
        config = json.loads(f.metadata()["megatron_ts.vq_config"])
    assert (config["quantizer"], config["fsq_levels"], config["codebook_size"]) == (
        "fsq",
        [5, 3, 3],
        45,
    )
    vq = load_vq("native", str(out), device="cpu")
    assert vq.encode(torch.zeros(1, 3, 32, 32)).max() < 45
    with pytest.raises(ValueError, match="means 45 codes of 3 channels"):
        train_vq([str(tmp_path / "raw")], str(out), steps=1, fsq_levels=[5, 3, 3], codebook_size=64)
