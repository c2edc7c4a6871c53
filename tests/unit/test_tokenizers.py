"""Text and VQ tokenizers: byte/JSON text tokenizers; native, LlamaGen and Chameleon VQ loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer
from megatron_ts.hf.vq_token_shuffle import (
    ChameleonConfig,
    ChameleonVQ,
    LlamaGenConfig,
    LlamaGenVQ,
    NativeVQ,
    NativeVQConfig,
    VQCheckpointError,
    load_vq,
    save_native,
    vq_identity,
)

SMALL_LLAMAGEN = dict(codebook_size=64, ch=32, ch_mult=[1, 1, 2], z_channels=32, num_res_blocks=1)
SMALL_CHAMELEON = dict(
    num_embeddings=64,
    embed_dim=8,
    base_channels=32,
    channel_multiplier=[1, 2, 2],
    latent_channels=32,
    num_res_blocks=1,
)


def test_byte_tokenizer_round_trip():
    tok = load_text_tokenizer("byte")
    ids = tok.encode("a red circle, 赤")
    assert tok.vocab_size == 256 and tok.identity == "byte"
    assert max(ids) < 256 and len(ids) == len("a red circle, 赤".encode())
    assert tok.decode(ids) == "a red circle, 赤"


def test_json_tokenizer_identity_and_ids(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "red": 2, "circle": 3, "in": 4, "the": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok.json"
    tk.save(str(path))
    tok = load_text_tokenizer(str(path))
    assert tok.vocab_size == 6
    assert tok.encode("a red circle in the sky") == [1, 2, 3, 4, 5, 0]
    assert tok.identity == f"tok.json:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    with pytest.raises(FileNotFoundError, match="nope.json.*neither 'byte'"):
        load_text_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not a `tokenizers` JSON"):
        load_text_tokenizer(str(bad))


def test_native_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = NativeVQ(NativeVQConfig(codebook_size=128, downsample=8, channels=[8, 16, 16]))
    path = tmp_path / "vq.safetensors"
    save_native(model, path)
    vq = load_vq("native", str(path), device="cpu")
    assert (vq.codebook_size, vq.downsample) == (128, 8)
    assert vq.identity == vq_identity("native", path) and vq.identity.startswith("native:")
    assert vq.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert vq.identity == "native:" + vq.checkpoint_sha256[:16]
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (3, 4, 6) and codes.dtype == torch.long
    assert int(codes.max()) < 128
    assert torch.equal(codes, model.encode(x))
    out = vq.decode(codes)
    assert out.shape == (3, 3, 32, 48) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="not a multiple of the VQ downsampling 8"):
        vq.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"codes out of range \[0, 128\)"):
        vq.decode(torch.full((1, 2, 2), 128))


def test_native_rejects_foreign_checkpoint(tmp_path: Path):
    path = tmp_path / "lg.pt"
    torch.save({"model": LlamaGenVQ(LlamaGenConfig(**SMALL_LLAMAGEN)).state_dict()}, path)
    with pytest.raises(VQCheckpointError, match="no native config.*--vq-format llamagen"):
        load_vq("native", str(path))
    with pytest.raises(VQCheckpointError, match="--vq-format 'vqgan' is not one of"):
        load_vq("vqgan", str(path))


def test_llamagen_public_layout():
    # the default config is VQ-16 as published; built on the meta device (no memory)
    with torch.device("meta"):
        sd = LlamaGenVQ().state_dict()
    expect = {
        "quantize.embedding.weight": (16384, 8),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.0.attn.2.norm.weight": (512,),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd
    assert sum(v.numel() for v in sd.values()) == 71_883_403


def test_llamagen_load_encode_decode_and_mismatch(tmp_path: Path):
    torch.manual_seed(0)
    model = LlamaGenVQ(LlamaGenConfig(**SMALL_LLAMAGEN))
    state = dict(model.state_dict())
    state["quantize.codebook_used"] = torch.zeros(65536)  # LlamaGen saves its usage counter
    path = tmp_path / "vq_ds16_t2i.pt"
    torch.save({"model": state}, path)
    vq = load_vq("llamagen", str(path), device="cpu", config=SMALL_LLAMAGEN)
    assert (vq.codebook_size, vq.downsample) == (64, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 4, 4)
    # l2-normalised lookup: the code is the codebook row of highest cosine similarity
    z = torch.nn.functional.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    cb = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=1)
    sim = torch.einsum("bdhw,kd->bkhw", z, cb)
    assert torch.equal(codes, sim.argmax(1))
    assert vq.decode(codes).shape == (2, 3, 16, 16)

    renamed = dict(state)
    renamed["decoder.conv_out.weigth"] = renamed.pop("decoder.conv_out.weight")
    torch.save({"model": renamed}, path)
    with pytest.raises(
        VQCheckpointError, match=r"vq_ds16_t2i.pt: missing key 'decoder.conv_out.weight'"
    ):
        load_vq("llamagen", str(path), config=SMALL_LLAMAGEN)
    wrong = dict(state)
    wrong["quantize.embedding.weight"] = torch.zeros(64, 16)
    torch.save({"model": wrong}, path)
    with pytest.raises(
        VQCheckpointError, match=r"'quantize.embedding.weight' has shape \(64, 16\)"
    ):
        load_vq("llamagen", str(path), config=SMALL_LLAMAGEN)
    extra = dict(state, **{"encoder.extra.weight": torch.zeros(1)})
    torch.save({"model": extra}, path)
    with pytest.raises(VQCheckpointError, match="unexpected key 'encoder.extra.weight'"):
        load_vq("llamagen", str(path), config=SMALL_LLAMAGEN)


def test_chameleon_public_layout():
    with torch.device("meta"):
        sd = ChameleonVQ().flat_state_dict()
    assert tuple(sd["quantize.embedding.weight"].shape) == (8192, 256)
    assert tuple(sd["encoder.down.4.block.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["decoder.up.0.block.2.conv1.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["decoder.up.4.upsample.conv.weight"].shape) == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert tuple(sd["decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)


def test_chameleon_reuses_transformers_and_loads(tmp_path: Path):
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(0)
    model = ChameleonVQ(ChameleonConfig(**SMALL_CHAMELEON))
    state = model.flat_state_dict()
    # the taming training checkpoint also carries its loss modules; they are ignored
    ckpt = {"state_dict": {**state, "loss.discriminator.main.0.weight": torch.zeros(2)}}
    path = tmp_path / "vqgan.ckpt"
    torch.save(ckpt, path)
    vq = load_vq("chameleon", str(path), device="cpu", config=SMALL_CHAMELEON)
    assert isinstance(vq.hf, ChameleonVQVAE)
    assert (vq.codebook_size, vq.downsample) == (64, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 4, 4)
    with torch.no_grad():
        hf_tokens = vq.hf.encode(x).image_tokens
    assert torch.equal(codes.flatten(), hf_tokens.flatten())
    assert vq.decode(codes).shape == (2, 3, 16, 16)

    del ckpt["state_dict"]["decoder.up.1.block.0.conv1.bias"]
    torch.save(ckpt, path)
    with pytest.raises(VQCheckpointError, match="missing key 'decoder.up.1.block.0.conv1.bias'"):
        load_vq("chameleon", str(path), config=SMALL_CHAMELEON)
    # a LlamaGen file given as chameleon names the first Chameleon key it lacks
    lg = tmp_path / "lg.pt"
    torch.save({"model": LlamaGenVQ(LlamaGenConfig(**SMALL_LLAMAGEN)).state_dict()}, lg)
    with pytest.raises(VQCheckpointError, match=r"lg.pt: missing key 'encoder.down.0.block.0"):
        load_vq("chameleon", str(lg), config=SMALL_CHAMELEON)


def test_native_checkpoint_records_config(tmp_path: Path):
    from safetensors import safe_open

    path = tmp_path / "vq.safetensors"
    save_native(NativeVQ(NativeVQConfig(codebook_size=64, channels=[8, 8, 8])), path, {"psnr": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["megatron_ts.vq_config"])["codebook_size"] == 64
    assert json.loads(meta["megatron_ts.vq_train"]) == {"psnr": 1}


def test_chameleon_transformers_file_encodes_without_decoder(tmp_path: Path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = ChameleonVQ(ChameleonConfig(**SMALL_CHAMELEON))
    # transformers' conversion nests the VQ under model.vqmodel. and drops the decoder
    hf = {f"model.vqmodel.{k}": v for k, v in full.hf.state_dict().items()}
    hf["model.embed_tokens.weight"] = torch.zeros(4, 2)
    path = tmp_path / "model-00001-of-00002.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    vq = load_vq("chameleon", str(path), device="cpu", config=SMALL_CHAMELEON)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(vq.encode(x), full.encode(x))
    with pytest.raises(VQCheckpointError, match="loaded without a decoder.*vqgan.ckpt"):
        vq.decode(vq.encode(x))
    # a decoder that is only partly there is still a mismatch
    hf["model.vqmodel.decoder.conv_in.weight"] = full.decoder.conv_in.weight.detach()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    with pytest.raises(VQCheckpointError, match="missing key 'decoder.conv_in.bias'"):
        load_vq("chameleon", str(path), config=SMALL_CHAMELEON)
