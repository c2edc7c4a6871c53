"""Sampling speed: seconds per image and decoding steps per second, s = 1 vs s = 2, KV cache on/off.

Random weights (speed does not depend on them); one prompt with classifier-free guidance, so
every step runs 2 rows (conditional + unconditional). Examples:

    python benchmarks/bench_sampling.py --flavor demo --resolutions 512 1024 --device cpu
    python benchmarks/bench_sampling.py --flavor 2.7B --text-vocab 32000 --device cuda \
        --dtype bfloat16

Without a KV cache every step recomputes the whole prefix, so a long image costs O(steps^2).
Runs longer than --max-full-steps are not decoded to the end: the forward pass is timed at 12
evenly spaced prefix lengths and the per-step times are integrated (marked "estimated").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_ts.config import ModelConfig
from megatron_ts.hf.build import hf_config_from_spec
from megatron_ts.hf.generation_token_shuffle import SamplingConfig, caption_ids, sample_codes
from megatron_ts.hf.modeling_token_shuffle import TokenShuffleForCausalLM
from megatron_ts.models.model import ModelSpec
from megatron_ts.vocab import VocabLayout

CAPTION_LEN = 64


class _Bytes:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def build(
    flavor: str,
    window: int,
    resolution: int,
    text_vocab: int,
    codebook: int,
    device: str,
    dtype: torch.dtype,
) -> TokenShuffleForCausalLM:
    spec = ModelSpec.from_config(
        ModelConfig(flavor=flavor), VocabLayout(text_vocab, codebook), window
    )
    config = hf_config_from_spec(spec, CAPTION_LEN, [resolution], 16)
    torch.manual_seed(0)
    with torch.device(device):
        model = TokenShuffleForCausalLM(config)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def estimate_no_cache(model, prompt: torch.Tensor, steps: int, s: int, device: str) -> float:
    """Seconds for `steps` no-cache steps, from forwards timed at 12 prefix lengths."""
    points = sorted({int(round(k * (steps - 1) / 11)) for k in range(12)})
    times = []
    for k in points:
        windows = torch.zeros(prompt.shape[0], k, s * s, dtype=torch.long, device=device)
        args = {"input_ids": prompt, "text_logits": False, "image_logits_to_keep": 1}
        if k:
            args["image_windows"] = windows
        model(**args)  # warm-up at this length
        _sync(device)
        t0 = time.perf_counter()
        model(**args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    total = 0.0  # trapezoid over steps 0..steps-1
    for i in range(len(points) - 1):
        total += (times[i] + times[i + 1]) / 2 * (points[i + 1] - points[i])
    return total + times[-1]  # the segment sums cover steps-1 intervals; add the last step


def run_case(
    model,
    resolution: int,
    kv: bool,
    device: str,
    max_full_steps: int,
    batch: int = 1,
    progress=None,
) -> dict:
    """Times decoding `batch` images of one prompt (plus as many unconditional rows).

    `progress` is passed to sample_codes (its update() is called once per decoding step).
    """
    cfg = model.config
    grid = cfg.grid(resolution)
    steps = cfg.image_positions(resolution)  # the export config's copy of SequenceLayout's
    tok = _Bytes()
    ids = torch.tensor(
        [caption_ids(tok, "a photo of a red bicycle", CAPTION_LEN, cfg)] * batch, device=device
    )
    uncond = torch.tensor([caption_ids(tok, "", CAPTION_LEN, cfg)] * batch, device=device)
    sampling = SamplingConfig(cfg_scale=7.5, top_k=1000, use_kv_cache=kv)
    estimated = not kv and steps > max_full_steps
    if estimated:
        seconds = estimate_no_cache(
            model, torch.cat([ids, uncond]), steps, cfg.shuffle_window, device
        )
    else:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        _sync(device)
        t0 = time.perf_counter()
        codes = sample_codes(model, ids, grid, sampling, gens, uncond, progress)
        _sync(device)
        seconds = time.perf_counter() - t0
        assert codes.shape == (batch, grid, grid)
    return {
        "resolution": resolution,
        "s": cfg.shuffle_window,
        "kv_cache": kv,
        "batch": batch,
        "steps": steps,
        "codes": grid * grid,
        "s_per_image": round(seconds / batch, 3),
        "steps_per_s": round(steps / seconds, 1),
        "estimated": estimated,
    }


@torch.no_grad()
def time_vq_decode(resolution: int, device: str) -> float:
    """Seconds to decode one image's codes with LlamaGen's VQ-16 decoder (random weights)."""
    from megatron_ts.hf.vq_token_shuffle import LlamaGenVQ

    torch.manual_seed(0)
    vq = LlamaGenVQ().to(device).eval()
    grid = resolution // vq.downsample
    codes = torch.randint(0, vq.codebook_size, (1, grid, grid), device=device)
    vq.decode(codes[:, :2, :2])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    images = vq.decode(codes)
    _sync(device)
    assert images.shape == (1, 3, resolution, resolution)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="demo")
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--windows", type=int, nargs="+", default=[1, 2])
    p.add_argument("--kv", choices=["both", "on", "off"], default="both")
    p.add_argument("--text-vocab", type=int, default=256, help="256 = byte tokenizer")
    p.add_argument("--codebook", type=int, default=16384)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--max-full-steps", type=int, default=1100)
    p.add_argument(
        "--vq",
        choices=["none", "llamagen"],
        default="none",
        help="also time VQ decoding of one image (llamagen: VQ-16 architecture, random weights)",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kvs = {"both": [True, False], "on": [True], "off": [False]}[args.kv]
    rows = []
    print("| px | s | KV cache | steps | s / image | steps / s |")
    print("|---|---|---|---|---|---|")
    for res in args.resolutions:
        for s in args.windows:
            model = build(args.flavor, s, res, args.text_vocab, args.codebook, args.device, dtype)
            run_case(model, 64 * s if res > 64 * s else res, True, args.device, 0)  # warm-up
            for kv in kvs:
                row = run_case(model, res, kv, args.device, args.max_full_steps)
                rows.append(
                    {**row, "flavor": args.flavor, "device": args.device, "dtype": args.dtype}
                )
                est = " (est.)" if row["estimated"] else ""
                print(
                    f"| {res} | {s} | {'on' if kv else 'off'} | {row['steps']} | "
                    f"{row['s_per_image']}{est} | {row['steps_per_s']}{est} |",
                    flush=True,
                )
            del model
    if args.vq == "llamagen":
        print("\n| px | VQ decode s / image |\n|---|---|")
        for res in args.resolutions:
            seconds = time_vq_decode(res, args.device)
            rows.append({"resolution": res, "vq": "llamagen", "vq_decode_s": round(seconds, 3)})
            print(f"| {res} | {seconds:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
