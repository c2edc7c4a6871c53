"""Checks that megatron_ts exports load and compute right under the installed transformers.

Runs in a clean environment that holds torch, transformers and their dependencies only (what a
user of an export has): it imports nothing but torch, transformers, safetensors, Pillow (through
the export's pipeline) and the standard library, and first makes sure megatron_ts, megatron and deepspeed are NOT importable. For each
export listed in REF_DIR/reference.json (written by make_reference.py in the main environment):

1. AutoConfig and AutoModelForCausalLM load it with `trust_remote_code=True` (the copied modeling
   code, fp32, no missing or unexpected weights); AutoModel's hidden states match;
2. text and image logits equal the training model's within the reference tolerance (1e-4);
3. a greedy decoding loop with classifier-free guidance, written here as megatron_ts's sampler
   does it, gives the same codes with the model's KV cache (`model.new_cache()`,
   `past_key_values=`) and without it (the whole prefix every step), and they equal the
   sampler's reference codes; likewise the seeded temperature + top-k run when it was recorded,
   whose cache comes from `use_cache=True` as `output.kv_cache`;
4. `model.generate()` (transformers' entry point, overridden) gives the sampler's reference codes,
   greedy and seeded, and the export's pipeline (`model.pipeline()`: its text tokenizer and VQ
   decoder) gives the reference codes and the same pixels (sha256) for 2 prompts x 2 images.

Prints one JSON line per export and exits 1 on any failure, with a one-line reason on stderr.

Usage: python check_export.py REF_DIR [--summary FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

FORBIDDEN = ("megatron_ts", "megatron", "deepspeed")


class CheckFailed(Exception):
    """One check of one export failed; the message is the one-line reason."""


def assert_clean_environment() -> None:
    """Fails loudly when the environment could lend the export code it must not need, or lacks
    safetensors (which a user needs too)."""
    found = []
    for name in FORBIDDEN:
        spec = importlib.util.find_spec(name)
        if spec is not None:
            found.append(f"{name} ({spec.origin or list(spec.submodule_search_locations or [])})")
    if found:
        sys.exit(
            "check_export: not a clean environment, importable: " + ", ".join(found) + "; run it "
            "with a venv holding only torch + transformers (scripts/hf_compat.sh builds one)"
        )
    if importlib.util.find_spec("safetensors") is None:
        sys.exit(
            "check_export: safetensors is not installed, and exports store their weights with it "
            "(older transformers such as 4.26 do not install it)"
        )


def max_abs_diff(a, b) -> float:
    if a.shape != b.shape:
        raise CheckFailed(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item()


def guided_codes(logits, scale: float, lo: int, hi: int, sampled: dict | None, generators):
    """One window's codes (B, s^2) from (2B, s^2, V) logits of rows [cond; uncond].

    As generation_token_shuffle.sample_step: codebook slice, fp32, uncond + w (cond - uncond),
    then argmax, or temperature, top-k and one CPU multinomial per prompt with its generator.
    """
    import torch

    logits = logits[..., lo:hi].float()
    cond, uncond = logits.chunk(2, dim=0)
    logits = uncond + scale * (cond - uncond)
    if sampled is None:
        return logits.argmax(-1)
    logits = logits / sampled["temperature"]
    top_k = sampled["top_k"]
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1).cpu()  # (B, s^2, K)
    codes = [torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(probs, generators)]
    return torch.stack(codes)


def decode(model, entry: dict, prompt, uncond, cached: bool, sampled: dict | None):
    """Decodes (B, N, s^2) windows with guidance, with or without the KV cache.

    Returns:
        (windows, logits): the codes and the (2B, s^2, V) logits of every step.
    """
    import torch

    cfg = model.config
    lo, hi = cfg.code_offset, cfg.code_offset + cfg.codebook_size
    rows_prompt = torch.cat([prompt, uncond])  # (2B, T): [cond; uncond]
    generators = None
    if sampled is not None:
        generators = [
            torch.Generator().manual_seed(sampled["seed"] + i) for i in range(prompt.shape[0])
        ]
    steps = entry["steps"]
    cache = None
    if cached and sampled is None:
        cache = model.new_cache()
        out = model(
            input_ids=rows_prompt, past_key_values=cache, text_logits=False, image_logits=True
        )
    elif cached:
        # the cache the model creates itself, returned in the output field `kv_cache`
        out = model(input_ids=rows_prompt, use_cache=True, text_logits=False, image_logits=True)
        cache = out.kv_cache
        if cache is None or cache.get_seq_length() != rows_prompt.shape[1]:
            raise CheckFailed("use_cache=True returned no filled cache in output.kv_cache")
    else:
        out = model(input_ids=rows_prompt, text_logits=False, image_logits=True)
    if out.image_logits is None:
        raise CheckFailed("a prompt ending with <boi> returned no image_logits")
    windows, step_logits = [], []
    for step in range(steps):
        logits = out.image_logits[:, -1]  # (2B, s^2, V)
        step_logits.append(logits)
        window = guided_codes(logits, entry["cfg_scales"][step], lo, hi, sampled, generators)
        windows.append(window)  # (B, s^2)
        if step == steps - 1:
            break
        if cached:
            new = torch.cat([window, window])[:, None]  # (2B, 1, s^2): both streams
            out = model(image_windows=new, past_key_values=cache)
        else:
            so_far = torch.stack(windows, dim=1)  # (B, k, s^2)
            out = model(
                input_ids=rows_prompt,
                image_windows=torch.cat([so_far, so_far]),
                text_logits=False,
                image_logits_to_keep=1,
            )
    if cached and cache.get_seq_length() != rows_prompt.shape[1] + steps - 1:
        raise CheckFailed(f"KV cache holds {cache.get_seq_length()} positions after decoding")
    return torch.stack(windows, dim=1), torch.stack(step_logits)


def check_export(ref_dir: Path, entry: dict, tolerance: float, result: dict) -> None:
    """Runs every check on one export, recording numbers in `result` (raises CheckFailed)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    export_dir = str(ref_dir / entry["dir"])
    ref = load_file(str(ref_dir / entry["tensors"]))

    # 1. loading through the Auto classes, as a user does
    config = AutoConfig.from_pretrained(export_dir, trust_remote_code=True)
    s = entry["shuffle_window"]
    if (config.model_type, config.shuffle_window) != ("token_shuffle", s):
        raise CheckFailed(f"AutoConfig gave {config.model_type} s={config.shuffle_window}")
    model, info = AutoModelForCausalLM.from_pretrained(
        export_dir, trust_remote_code=True, output_loading_info=True
    )
    model.eval()
    if not type(model).__module__.startswith("transformers_modules"):
        raise CheckFailed(f"loaded {type(model).__module__}, not the export's copied code")
    bad_keys = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad_keys or info.get("error_msgs"):
        raise CheckFailed(f"loading info: {bad_keys or info['error_msgs']}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise CheckFailed(f"parameters load as {dtypes}, expected float32")

    # 2. logits against the training model
    modeling = sys.modules[type(model).__module__]
    windows = modeling.grid_to_windows(ref["codes"], s)  # the export's own helper
    if not torch.equal(windows, ref["image_windows"]):
        raise CheckFailed("the export's grid_to_windows differs from megatron_ts's")
    text, n = ref["text_ids"], ref["image_logits"].shape[1]
    with torch.no_grad():
        out = model(input_ids=text, image_windows=windows)
        base = AutoModel.from_pretrained(export_dir, trust_remote_code=True).eval()
        hidden = base(input_ids=text, image_windows=windows)
    d_text = max_abs_diff(out.logits[:, : text.shape[1] - 1], ref["text_logits"])
    d_image = max_abs_diff(out.image_logits[:, :n], ref["image_logits"])
    d_base = max_abs_diff(hidden, out.hidden_states)
    result.update(text_logit_diff=d_text, image_logit_diff=d_image, automodel_diff=d_base)
    if max(d_text, d_image) > tolerance:
        raise CheckFailed(f"logits differ from the training model by {max(d_text, d_image):.3g}")
    if d_base > tolerance:
        raise CheckFailed(f"AutoModel hidden states differ by {d_base:.3g}")

    # 3. decoding with and without the KV cache against megatron_ts's sampler
    runs = [("greedy", None)]
    if entry.get("sampled") and "sampled_codes" in ref:
        runs.append(("sampled", entry["sampled"]))
    prompt, uncond = ref["prompt_ids"], ref["uncond_ids"]
    for name, sampled in runs:
        expected = modeling.grid_to_windows(ref[f"{name}_codes"], s)  # (B, N, s^2)
        with torch.no_grad():
            cached, cached_logits = decode(model, entry, prompt, uncond, True, sampled)
            full, full_logits = decode(model, entry, prompt, uncond, False, sampled)
        d_cache = max_abs_diff(cached_logits, full_logits)
        result[f"{name}_cache_logit_diff"] = d_cache
        if not torch.equal(cached, full):
            raise CheckFailed(f"{name} codes differ with and without the KV cache")
        if not torch.equal(cached, expected):
            wrong = (cached != expected).sum().item()
            raise CheckFailed(f"{name} codes differ from megatron_ts's sampler in {wrong} places")
        if d_cache > tolerance:
            raise CheckFailed(f"{name} step logits differ with/without the cache by {d_cache:.3g}")
    result["decoding"] = [name for name, _ in runs]

    # 4. transformers' generation entry point and the pipeline shipped in the export
    guidance = dict(guidance_scale=entry["cfg"], cfg_schedule=entry["cfg_schedule"])
    for name, sampled in runs:
        extra = {"temperature": 0.0} if sampled is None else dict(sampled)
        if not torch.equal(model.generate(prompt, **guidance, **extra), ref[f"{name}_codes"]):
            raise CheckFailed(f"generate() {name} codes differ from megatron_ts's sampler")
    result["generate"] = [name for name, _ in runs]
    if entry.get("pipeline") and "pipeline_codes" in ref:
        spec = entry["pipeline"]
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        out = pipe(spec["prompts"], spec["num_images_per_prompt"], **spec["settings"])
        if not torch.equal(out.codes, ref["pipeline_codes"]):
            raise CheckFailed("the export's pipeline codes differ from megatron_ts's")
        pixels = [hashlib.sha256(im.tobytes()).hexdigest() for im in out.images]
        if pixels != spec["pixels_sha256"]:
            raise CheckFailed("the export's pipeline images differ from megatron_ts's pixels")
        result["pipeline_images"] = len(pixels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_dir", type=Path, help="make_reference.py's output directory")
    parser.add_argument("--summary", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    assert_clean_environment()

    import torch
    import transformers

    torch.manual_seed(0)
    reference = json.loads((args.ref_dir / "reference.json").read_text())
    tolerance = float(reference["logit_tolerance"])
    results, failures = [], []
    for entry in reference["exports"]:
        t0 = time.perf_counter()
        line = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "export": entry["name"],
        }
        try:
            check_export(args.ref_dir, entry, tolerance, line)
            line["result"] = "pass"
        except Exception as err:  # a load or forward error is a finding too, not a crash
            if isinstance(err, CheckFailed):
                reason = str(err)
            else:
                traceback.print_exc()
                frame = traceback.extract_tb(err.__traceback__)[-1]
                message = (str(err).strip().splitlines() or [""])[0]
                where = f"{Path(frame.filename).name}:{frame.lineno}"
                reason = f"{type(err).__name__}: {message} ({where})"
            line.update(result="fail", reason=reason)
            failures.append(f"{entry['name']}: {reason}")
        line["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(line)
        print(json.dumps(line), flush=True)
    if args.summary:
        diffs = [
            max(r["text_logit_diff"], r["image_logit_diff"])
            for r in results
            if "text_logit_diff" in r
        ]
        summary = {
            "transformers": transformers.__version__,
            "result": "fail" if failures else "pass",
            "max_logit_diff": max(diffs) if diffs else None,
            "reason": "; ".join(failures) or None,
            "exports": results,
        }
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if failures:
        print(
            f"check_export: FAIL with transformers {transformers.__version__}: {failures[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
