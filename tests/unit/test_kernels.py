"""Which fused kernels a block uses: NVIDIA Apex's on CUDA when it is really installed, else torch.

Apex is not installed on the CI machines, so these tests check the *selection* only, by putting
stand-in modules into sys.modules (`install_fake_apex`): fakes with NVIDIA Apex's module layout
but torch's arithmetic. The numerical check against the real Apex kernels is
tests/gpu/test_apex.py.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_ts.config import ModelConfig
from megatron_ts.models import kernels
from megatron_ts.models.kernels import Kernels, select_kernels
from megatron_ts.models.layer_specs import llama_layer_spec
from megatron_ts.models.model import ModelSpec, transformer_config
from megatron_ts.models.rope import apply_rope
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)
APEX_MODULES = (
    "apex",
    "apex.normalization",
    "apex.transformer",
    "apex.transformer.functional",
    "fused_layer_norm_cuda",
    "fused_rotary_positional_embedding",
)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    from megatron_ts.distributed.init import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)


@pytest.fixture()
def no_apex(monkeypatch):
    """Hides any apex on this machine (None in sys.modules makes its import fail)."""
    for name in APEX_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class FakeApexFusedRMSNormForSelectionTest(torch.nn.RMSNorm):
    """Stand-in for apex.normalization.FusedRMSNorm (same constructor, torch arithmetic)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine)


def fake_apex_rope_for_selection_test(t, cos, sin, transpose_output_memory=False):
    """Stand-in for apex.transformer.functional.fused_apply_rotary_pos_emb_cached."""
    return apply_rope(t, cos, sin)


def install_fake_apex(monkeypatch, extensions: bool = True) -> None:
    """NVIDIA Apex's module layout in sys.modules, for testing the selection logic only."""
    monkeypatch.setitem(sys.modules, "apex", _module("apex"))
    monkeypatch.setitem(
        sys.modules,
        "apex.normalization",
        _module("apex.normalization", FusedRMSNorm=FakeApexFusedRMSNormForSelectionTest),
    )
    monkeypatch.setitem(sys.modules, "apex.transformer", _module("apex.transformer"))
    monkeypatch.setitem(
        sys.modules,
        "apex.transformer.functional",
        _module(
            "apex.transformer.functional",
            fused_apply_rotary_pos_emb_cached=fake_apex_rope_for_selection_test,
        ),
    )
    for ext in ("fused_layer_norm_cuda", "fused_rotary_positional_embedding"):
        monkeypatch.setitem(sys.modules, ext, _module(ext) if extensions else None)


def test_without_apex_torch_kernels_are_used(no_apex):
    assert select_kernels(cuda=True) == Kernels(norm="torch", rope="torch")
    assert select_kernels(cuda=False) == Kernels()


def test_the_unrelated_pypi_apex_is_not_taken_for_nvidia_apex(no_apex, monkeypatch):
    # `pip install apex` gives a web toolkit: a top-level `apex` without `apex.normalization`
    monkeypatch.setitem(sys.modules, "apex", _module("apex", __version__="0.9.10dev"))
    monkeypatch.delitem(sys.modules, "apex.normalization")
    monkeypatch.delitem(sys.modules, "apex.transformer")
    monkeypatch.delitem(sys.modules, "apex.transformer.functional")
    assert not kernels.apex_rms_norm_available()
    assert not kernels.apex_rope_available()
    assert select_kernels(cuda=True) == Kernels()


def test_apex_is_used_on_cuda_only(monkeypatch):
    install_fake_apex(monkeypatch)
    assert select_kernels(cuda=True) == Kernels(norm="apex", rope="apex")
    assert select_kernels(cuda=False) == Kernels()


def test_apex_built_without_its_cuda_extensions_is_not_used(monkeypatch):
    install_fake_apex(monkeypatch, extensions=False)
    assert select_kernels(cuda=True) == Kernels()


def test_the_choice_is_logged_once(monkeypatch, caplog):
    install_fake_apex(monkeypatch)
    monkeypatch.setattr(kernels, "_announced", set())
    with caplog.at_level(logging.INFO, logger="megatron_ts.models.kernels"):
        for _ in range(3):
            select_kernels(cuda=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_ts.models.kernels"]
    assert lines == ["fused kernels: RMSNorm apex, RoPE apex (NVIDIA Apex used on CUDA)"]


def test_apex_kernels_are_wired_into_the_block(monkeypatch):
    """The spec puts Apex's norm class and RoPE into the block; parameter names do not change."""
    install_fake_apex(monkeypatch)
    spec = ModelSpec.from_config(ModelConfig(flavor="debug"), VOCAB, 2)
    config = transformer_config(spec)
    torch_block = build_module(llama_layer_spec("sdpa", spec.rope_theta), config=config)
    apex_block = build_module(
        llama_layer_spec("sdpa", spec.rope_theta, Kernels(norm="apex", rope="apex")), config=config
    )
    assert isinstance(apex_block.input_layernorm, FakeApexFusedRMSNormForSelectionTest)
    assert isinstance(apex_block.pre_mlp_layernorm, FakeApexFusedRMSNormForSelectionTest)
    assert apex_block.self_attention.core_attention.rope_kernel == "apex"
    assert type(torch_block.input_layernorm) is torch.nn.RMSNorm
    assert torch_block.self_attention.core_attention.rope_kernel == "torch"
    assert apex_block.state_dict().keys() == torch_block.state_dict().keys()
    apex_block.load_state_dict(torch_block.state_dict())
    x = torch.randn(9, 2, spec.shape.hidden_size)
    out_torch, _ = torch_block(x, attention_mask=None)
    out_apex, _ = apex_block(x, attention_mask=None)  # CPU tensors: the torch RoPE runs
    torch.testing.assert_close(out_apex, out_torch, rtol=0, atol=0)


def test_unknown_rope_kernel_is_refused():
    from megatron_ts.models.attention import make_core_attention

    with pytest.raises(ValueError, match="rope_kernel"):
        make_core_attention("sdpa", 10000.0, "triton")
