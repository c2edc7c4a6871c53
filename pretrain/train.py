"""`ts-train`: the training entry point.

    ts-train --config pretrain/configs/debug.toml [--section.key value ...] [--dry-run]

Runs as one process, under torchrun, or under srun, on CPU (gloo) or GPUs (NCCL). With
`--dry-run` it validates the config, builds nothing and prints one JSON object with parameter
counts and per-stage sequence lengths and FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_ts.config import ConfigError, load_config, validate


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="ts-train",
        description="Train a Token-Shuffle model. Extra --section.key value pairs override the TOML.",
    )
    parser.add_argument("--config", required=True, help="TOML config (see docs/config.md)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan as JSON"
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs ts-train; known failures end with one line and the code of megatron_ts.errors."""
    from megatron_ts.errors import run_cli

    return run_cli("ts-train", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from megatron_ts.training.plan import dry_run_report

            stages = validate(cfg, world_size=None)
            print(json.dumps(dry_run_report(cfg, stages), indent=2))
            return 0
    except ConfigError as err:
        print(f"ts-train: config error: {err}", file=sys.stderr)
        return 2
    import torch

    # DeepSpeed picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from megatron_ts.training.trainer import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
