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
