"""The weight average (`train.ema_decay`): its update rule, the swap, and choosing weight sets."""

import pytest
import torch
from torch import nn

from megatron_ts.checkpoint.model_files import (
    CheckpointError,
    choose_weights,
    load_full_state_dict,
    mark_complete,
    write_layer_file,
    write_meta,
)
from megatron_ts.training.ema import WeightAverage


def _modules():
    torch.manual_seed(0)
    return {0: nn.Linear(3, 2), 1: nn.Linear(2, 2, bias=False)}


def test_update_is_the_exponential_average_and_swap_restores_exactly():
    modules = _modules()
    params = [p for _, m in sorted(modules.items()) for p in m.parameters()]
    start = [p.detach().clone() for p in params]
    ema = WeightAverage(modules, decay=0.75)
    history = []
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in params])
        ema.update()
    assert ema.updates == 3
    for i in range(len(params)):
        want = start[i]
        for weights in history:
            want = 0.75 * want + 0.25 * weights[i]
        assert torch.allclose(ema.average[i], want, atol=1e-6)
    trained = [p.detach().clone() for p in params]
    with ema.swapped():
        for i, p in enumerate(params):
            assert torch.equal(p, ema.average[i])
    for p, t in zip(params, trained):
        assert torch.equal(p, t)
    ema.capture()
    assert ema.updates == 0 and all(torch.equal(a, p) for a, p in zip(ema.average, params))


def test_swap_restores_after_an_error():
    modules = _modules()
    before = modules[0].weight.detach().clone()
    ema = WeightAverage(modules, decay=0.5)
    with torch.no_grad():
        modules[0].weight.add_(1.0)
    ema.update()
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped():
            raise RuntimeError("inside")
    assert torch.equal(modules[0].weight, before + 1.0)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="0 < decay < 1"):
        WeightAverage(_modules(), decay)


def test_choose_weights_and_reading_each_set(tmp_path):
    modules = _modules()
    ckpt = tmp_path / "step_00000001"
    spec = {"shape": {"num_layers": 0}}
    write_meta(ckpt, {"format": "megatron_ts.ckpt/1", "step": 1, "model_spec": spec})
    for idx, module in modules.items():
        write_layer_file(module, idx, 0, ckpt / "model")
    mark_complete(ckpt, update_latest=False)
    assert choose_weights(ckpt, "auto") == "raw"
    with pytest.raises(CheckpointError, match="--weights raw"):
        choose_weights(ckpt, "ema")
    with pytest.raises(CheckpointError, match="choose auto, raw or ema"):
        choose_weights(ckpt, "best")

    ema = WeightAverage(modules, decay=0.5)
    with torch.no_grad():
        modules[1].weight.mul_(3.0)
    ema.update()
    with ema.swapped():
        for idx, module in modules.items():
            write_layer_file(module, idx, 0, ckpt / "model_ema")
    assert choose_weights(ckpt, "auto") == "ema"
    raw = load_full_state_dict(ckpt, "raw")
    avg = load_full_state_dict(ckpt, "auto")
    assert torch.equal(avg["input_stage.weight"], raw["input_stage.weight"])
    assert torch.allclose(avg["output_stage.weight"], 2.0 * raw["output_stage.weight"])
