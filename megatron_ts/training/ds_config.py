"""The DeepSpeed config, generated from our config sections by one pure function."""

from __future__ import annotations

from megatron_ts.config import OptimConfig, ParallelConfig


def deepspeed_config(
    parallel: ParallelConfig,
    optim: OptimConfig,
    micro_batch: int,
    global_batch: int,
    data_parallel: int,
    bf16: bool,
    cpu: bool,
) -> dict:
    """DeepSpeed JSON config for one stage.

    The learning rate in the optimizer block is a placeholder: the trainer sets every step's
    rate from megatron_ts.training.lr_schedule, so no DeepSpeed scheduler is configured.

    Args:
        parallel: ZeRO stage and friends.
        optim: AdamW settings and gradient clipping.
        micro_batch: samples per rank per forward.
        global_batch: samples per optimizer step.
        data_parallel: data-parallel size.
        bf16: bf16 mixed precision (fp32 master weights in the ZeRO optimizer).
        cpu: CPU run: use torch's AdamW (DeepSpeed's fused/CPU Adam ops need compilation).
    """
    accumulation = global_batch // (micro_batch * data_parallel)
    if accumulation * micro_batch * data_parallel != global_batch:
        raise ValueError(
            f"global batch {global_batch} is not micro batch {micro_batch} x DP {data_parallel} x an integer"
        )
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage >= 2:
        zero.update({"overlap_comm": not cpu, "contiguous_gradients": True, "reduce_scatter": True})
    if parallel.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logger reports
        "wall_clock_breakdown": False,
        # its throughput timer synchronizes the device about 5 times a step (bench_syncs.py);
        # the trainer times steps itself
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"load_universal": False},
    }
