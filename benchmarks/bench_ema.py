"""Memory of the weight average (`train.ema_decay`) per rank: partitioned vs the old full copy.

Builds `--flavor`'s layers in `--dtype` on `--dp` gloo ranks (TP = PP = 1, so DP = ranks) and,
in a fresh world per implementation, a weight average over them: `new` (this checkout's
megatron_ts.training.ema, each DP rank keeps a 1/DP slice) and `old` (tests/ema_reference.py,
the full fp32 copy of commit aa06587). Each rank reports the bytes of the tensors the average
holds, its resident-set growth when the average is built, and the peak resident-set growth of
the first `update()` (the kernel's high-water mark, reset through /proc/self/clear_refs just
before) and the median time of `--repeats` more.

    python benchmarks/bench_ema.py [--flavor demo] [--dp 2] [--dtype bf16] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    """Returns the heap's free memory to the system, so that RSS shows what is allocated next."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rank(rank: int, world: int, port: int, args, impl: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    sys.path.insert(0, str(ROOT))
    import json

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ts.config import Config
    from megatron_ts.models.model import ModelSpec, TokenShuffleLM
    from megatron_ts.training.ema import WeightAverage
    from megatron_ts.training.plan import vocab_from_config
    from tests.ema_reference import ReferenceAverage

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(1, 1)  # every rank a DP rank
    cfg = Config()
    cfg.model.flavor = args.flavor
    spec = ModelSpec.from_config(cfg.model, vocab_from_config(cfg.tokenizer), 2)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    layers = TokenShuffleLM(spec, seed=1).to(dtype).layers()
    numel = sum(p.numel() for m in layers.values() for p in m.parameters())
    _trim()
    rss0 = _status_kib("VmRSS")
    ema = (WeightAverage if impl == "new" else ReferenceAverage)(layers, 0.999)
    rss1 = _status_kib("VmRSS")
    with torch.no_grad():  # a changed weight, as after an optimizer step
        for m in layers.values():
            for p in m.parameters():
                p.add_(1e-3)
    _trim()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    ema.update()  # the first one: nothing cached by the allocator yet
    peak = _status_kib("VmHWM")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ema.update()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    result = {
        "params": numel,
        "held_bytes": ema.nbytes,
        "rss_build_mib": (rss1 - rss0) / 1024,
        "update_peak_mib": (peak - before) / 1024,
        "update_s": seconds,
    }
    Path(out, f"{impl}{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _world(args, impl: str) -> list[dict]:
    import json

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, (args.dp, port, args, impl, out), args.dp, start_method="spawn")
        return [json.loads(Path(out, f"{impl}{r}.json").read_text()) for r in range(args.dp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="demo")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=9, help="timed updates (median)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"flavor {args.flavor}, {args.dtype} weights, DP = {args.dp} (gloo, TP = PP = 1)")
    print("impl  rank  params        held bytes   RSS at build  update peak  update")
    for impl in ("old", "new"):
        for rank, r in enumerate(_world(args, impl)):
            print(
                f"{impl:<5} {rank:<5} {r['params']:<13,} {r['held_bytes']:<12,} "
                f"{r['rss_build_mib']:>8.1f} MiB {r['update_peak_mib']:>8.1f} MiB "
                f"{r['update_s'] * 1e3:>6.1f} ms"
            )


if __name__ == "__main__":
    main()
