"""The AdamW state of a checkpoint in a layout-free form, readable by any other layout.

Per parameter, in its TP-local shape (the shape of the layer files in `model/`), a checkpoint
holds three fp32 tensors, each set stored exactly like a weight set:

    optimizer/master/layer_LLL-tpTT.safetensors      fp32 master weights
    optimizer/exp_avg/layer_LLL-tpTT.safetensors     Adam first moment
    optimizer/exp_avg_sq/layer_LLL-tpTT.safetensors  Adam second moment

and meta.json's `optimizer` entry: {"format", "type": "adamw", "step"} (Adam's step count,
shared by every parameter). ZeRO partitions are gathered over the data-parallel group at save
and each rank keeps only its own partition at load; TP shards are merged and split with the
same rules as the weights (`sharding.merge_tp` / `split_tp`); pipeline stages read only their
own layers. So a checkpoint saved with one (TP, PP, DP, ZeRO stage, precision) resumes on any
other with the optimizer, and nothing is unpickled.

DeepSpeed keeps this state in different places per configuration: the `safe_get/set_full_*`
accessors cover ZeRO 1-3 and its bf16 optimizer; with ZeRO 0 torch's AdamW updates the module
parameters themselves (fp32) or DeepSpeed's fp32 copies of them (bf16, its unfused optimizer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import parallel_state
from torch import nn

from megatron_ts.checkpoint.model_files import (
    OPTIMIZER_DIR,
    OPTIMIZER_SETS,
    CheckpointError,
    iter_resharded,
    write_tensor_file,
)

OPTIMIZER_FORMAT = "megatron_ts.optim/1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def trained_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of a layer module the optimizer updates, by state-dict name."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16) that holds the state."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def adam_step(engine) -> int:
    """Adam's step count (0 before the first applied step)."""
    steps = {int(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:  # every group steps together; anything else is a bug worth seeing
        raise RuntimeError(f"optimizer state groups disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def _ready_state(engine, step: int) -> torch.optim.Optimizer:
    """The base optimizer with a state for every parameter it updates, linked to DeepSpeed's
    per-parameter views.

    torch's AdamW creates its state at the first step, and DeepSpeed links each parameter's
    fragment views (`_hp_mapping.optim_fragment`) once, after the first group's step, when
    the other groups have no state yet: their moments are then unreachable through the
    `safe_*` accessors (ZeRO-3's too). Creating missing state (zeros at `step`, what AdamW
    would create) and linking again makes every parameter's moments reachable before a save
    or a load.
    """
    opt = base_optimizer(engine)
    wrapper = engine.optimizer
    holders = {id(p): p for group in opt.param_groups for p in group["params"]}
    # ZeRO-3 keys the state by its flat fp32 partitions, swapped into the groups only to step
    holders.update({id(p): p for p in getattr(wrapper, "fp32_partitioned_groups_flat", [])})
    for param in holders.values():
        state = opt.state[param]  # ZeRO-3 creates some entries at init, not the moments
        state.setdefault("step", torch.tensor(float(step)))
        for k in MOMENTS:
            if k not in state:
                state[k] = torch.zeros_like(param)
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    return opt


def _plain(param: torch.Tensor) -> bool:
    """ZeRO 0: torch's AdamW updates the module parameter itself (fp32) or an fp32 copy of it
    (bf16, DeepSpeed's unfused optimizer); no DeepSpeed accessor reaches it."""
    return not hasattr(param, "ds_id") and not hasattr(param, "_hp_mapping")


def _plain_masters(engine) -> dict[int, torch.Tensor]:
    """{id(module parameter): the fp32 tensor AdamW updates} for ZeRO 0 with bf16, where
    DeepSpeed's unfused optimizer pairs `fp16_groups` (the module's) with `fp32_groups`."""
    wrapper = engine.optimizer
    low, high = getattr(wrapper, "fp16_groups", None), getattr(wrapper, "fp32_groups", None)
    if not low or not high:
        return {}
    return {id(lp): hp for lows, highs in zip(low, high) for lp, hp in zip(lows, highs)}


def _full_state(
    param: torch.Tensor, opt: torch.optim.Optimizer, masters: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """master, exp_avg, exp_avg_sq of one parameter in its full TP-local shape (collective
    over the DP group for ZeRO: every DP rank asks for the same parameters in the same order)."""
    if _plain(param):
        hp = masters.get(id(param), param)
        return {"master": hp.detach(), **{k: opt.state[hp][k] for k in MOMENTS}}
    return {
        "master": safe_get_full_fp32_param(param),
        **{k: safe_get_full_optimizer_state(param, k) for k in MOMENTS},
    }


def save_optimizer_state(stage_engine, ckpt_dir: Path) -> dict:
    """Collective over the data-parallel group: writes this rank's layers' optimizer files.

    Every DP rank gathers each parameter's state (ZeRO's collectives need all of them); the
    files of layer i are written by DP rank i mod DP, so the writes are spread.

    Returns:
        meta.json's `optimizer` entry.
    """
    engine = stage_engine.engine
    opt = _ready_state(engine, 0)
    masters = _plain_masters(engine)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    for idx, module in stage_engine.local_layers.items():
        writer = idx % dp_size == dp_rank
        sets: dict[str, dict[str, torch.Tensor]] = {name: {} for name in OPTIMIZER_SETS}
        for key, param in trained_params(module).items():
            full = _full_state(param, opt, masters)  # every DP rank: the gather is collective
            if writer:  # only the writer copies to the host
                for name, value in full.items():
                    sets[name][key] = value.detach().to("cpu", torch.float32)
        if writer:
            for name, tensors in sets.items():
                write_tensor_file(tensors, idx, tp_rank, Path(ckpt_dir) / OPTIMIZER_SETS[name])
    return {"format": OPTIMIZER_FORMAT, "type": "adamw", "step": adam_step(engine)}


def has_optimizer_state(ckpt_dir: Path, meta: dict) -> bool:
    """Whether a step directory holds the layout-free optimizer state."""
    return "optimizer" in meta and (Path(ckpt_dir) / OPTIMIZER_DIR).is_dir()


def load_optimizer_state(
    stage_engine, ckpt_dir: Path, meta: dict, allow_missing: tuple[str, ...] = ()
) -> list[str]:
    """Sets the master weights, moments and step count of every local parameter from the files.

    Not collective. Call it after the weights are loaded into the modules; the module weights
    then equal the master weights rounded to their dtype, as at save time. Parameters the
    checkpoint lacks (`allow_missing`) keep zero moments.

    Returns:
        Names of the parameters whose state was not in the checkpoint.

    Raises:
        CheckpointError: a format this version does not read, or missing/damaged files.
    """
    info = meta["optimizer"]
    if info.get("format") != OPTIMIZER_FORMAT or info.get("type") != "adamw":
        raise CheckpointError(
            f"{ckpt_dir}: optimizer state {info.get('format')!r} ({info.get('type')!r}); this "
            f"version reads {OPTIMIZER_FORMAT!r} AdamW; set checkpoint.load_optimizer = false to "
            "load the weights only"
        )
    engine = stage_engine.engine
    step = int(info["step"])
    opt = _ready_state(engine, step)
    masters = _plain_masters(engine)
    # the three sets side by side, one parameter at a time (memory stays near one tensor)
    readers = [
        iter_resharded(
            stage_engine.local_layers,
            ckpt_dir,
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            name,
            allow_missing,
            targets=trained_params,
        )
        for name in OPTIMIZER_SETS
    ]
    left: list[str] = []
    with torch.no_grad():
        for (full_name, param, master), *moments in zip(*readers, strict=True):
            if master is None or any(m[2] is None for m in moments):
                left.append(full_name)
                continue
            values = dict(zip(MOMENTS, (m[2].to(param.device) for m in moments), strict=True))
            if _plain(param):
                hp = masters.get(id(param), param)
                hp.copy_(master.to(hp.dtype))
                param.copy_(master.to(param.dtype))
                for k, value in values.items():
                    opt.state[hp][k].copy_(value)
                continue
            safe_set_full_fp32_param(param, master.to(param.device))
            for k, value in values.items():
                safe_set_full_optimizer_state(param, value, k)
        for state in opt.state.values():
            old = state.get("step")
            if isinstance(old, torch.Tensor):
                state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device)
            elif old is not None:
                state["step"] = step
    return left
