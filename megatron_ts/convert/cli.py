"""`ts-convert`: training checkpoints to Hugging Face directories and back.

ts-convert to-hf runs/demo exports/demo
ts-convert from-hf exports/demo ckpts/from-export
ts-convert from-hf /models/Llama-2-7b-hf ckpts/llama-init --codebook-size 16384
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_ts.checkpoint.model_files import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ts-convert", description="Convert megatron_ts checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    to = sub.add_parser("to-hf", help="checkpoint -> Hugging Face directory")
    to.add_argument("checkpoint", help="run dir, its checkpoints/ dir or one step dir")
    to.add_argument("out_dir", help="output directory")
    to.add_argument("--text-tokenizer", help="override: `byte` or a tokenizers JSON path")
    to.add_argument("--vq-checkpoint", help="override the VQ checkpoint path")
    to.add_argument("--vq-format", help="override the VQ layout (native, llamagen, chameleon)")
    to.add_argument("--max-shard-size", default="5GB", help="safetensors shard limit (5GB)")
    to.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "ema", "raw"],
        help="auto: the weights' moving average when the run kept one (train.ema_decay), else "
        "the trained weights; ema / raw: that set",
    )

    fr = sub.add_parser("from-hf", help="Hugging Face directory -> checkpoint to train from")
    fr.add_argument("hf_dir", help="an export of ours or a Llama checkpoint in HF layout")
    fr.add_argument("out", help="checkpoint directory to write (use as checkpoint.load)")
    fr.add_argument("--codebook-size", type=int, default=16384, help="Llama: VQ codes to add")
    fr.add_argument("--shuffle-window", type=int, default=1, help="Llama: token-shuffle window s")
    fr.add_argument("--shuffle-mlp-blocks", type=int, default=2, help="Llama: residual blocks")
    fr.add_argument("--vocab-multiple", type=int, default=128, help="Llama: vocabulary padding")
    fr.add_argument("--seed", type=int, default=1234, help="Llama: init seed of new weights")
    fr.add_argument(
        "--text-tokenizer", help="Llama: tokenizer JSON (default HF_DIR/tokenizer.json)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs ts-convert; known failures end with one line and the code of megatron_ts.errors."""
    from megatron_ts.errors import run_cli

    return run_cli("ts-convert", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "to-hf":
            from megatron_ts.hf.export import export_to_hf

            out = export_to_hf(
                args.checkpoint,
                args.out_dir,
                text_tokenizer=args.text_tokenizer,
                vq_checkpoint=args.vq_checkpoint,
                vq_format=args.vq_format,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                weights=args.weights,
            )
        else:
            from megatron_ts.hf.import_hf import HFImportError, import_from_hf

            try:
                out = import_from_hf(
                    args.hf_dir,
                    args.out,
                    codebook_size=args.codebook_size,
                    shuffle_window=args.shuffle_window,
                    shuffle_mlp_blocks=args.shuffle_mlp_blocks,
                    vocab_multiple=args.vocab_multiple,
                    seed=args.seed,
                    text_tokenizer=args.text_tokenizer,
                )
            except HFImportError as err:
                raise CheckpointError(str(err)) from None
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"ts-convert: {err}", file=sys.stderr)
        return 2
    print(f"{out}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
