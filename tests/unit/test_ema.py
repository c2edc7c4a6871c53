"""The weight average (`train.ema_decay`): its update rule, the swap, and choosing weight sets.

Without process groups the average is not partitioned (one rank holds it all);
tests/distributed/test_ema_partition.py runs the DP = 2 partition.
"""

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
from megatron_ts.training import ema as ema_module
from megatron_ts.training.ema import WeightAverage
from tests.ema_reference import ReferenceAverage


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
    assert ema.average.shape == (3 * 2 + 2 + 2 * 2,)  # one flat fp32 vector of every parameter
    wants = []
    for i in range(len(params)):
        want = start[i]
        for weights in history:
            want = 0.75 * want + 0.25 * weights[i]
        wants.append(want.reshape(-1))
    assert torch.allclose(ema.average, torch.cat(wants), atol=1e-6)
    trained = [p.detach().clone() for p in params]
    with ema.swapped():
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), ema.average)
    for p, t in zip(params, trained):
        assert torch.equal(p, t)
    ema.capture()
    assert ema.updates == 0
    assert torch.equal(ema.average, torch.cat([p.detach().reshape(-1) for p in params]))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_in_place_update_matches_the_unpartitioned_average_bit_for_bit(monkeypatch, dtype):
    """Chunks that cut across parameters (CHUNK = 5) give exactly the old per-parameter numbers,
    for fp32 and for bf16 weights (converted a chunk at a time), in the average and in the
    parameters inside `swapped()`."""
    monkeypatch.setattr(ema_module, "CHUNK", 5)
    modules, reference = _modules(), _modules()
    for m in (*modules.values(), *reference.values()):
        m.to(dtype)
    ema, ref = WeightAverage(modules, 0.9), ReferenceAverage(reference, 0.9)
    assert ema.nbytes == ref.nbytes == 4 * (3 * 2 + 2 + 2 * 2)
    params = [p for _, m in sorted(modules.items()) for p in m.parameters()]
    ref_params = [p for _, m in sorted(reference.items()) for p in m.parameters()]
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        with torch.no_grad():
            for p, q in zip(params, ref_params):
                step = torch.randn(p.shape, generator=g).to(dtype)
                p.add_(step)
                q.add_(step)
        ema.update()
        ref.update()
    assert torch.equal(ema.average, torch.cat([a.reshape(-1) for a in ref.average]))
    with ema.swapped(), ref.swapped():
        for p, q in zip(params, ref_params):
            assert p.dtype == dtype and torch.equal(p, q)
