"""One DeepSpeed engine per curriculum stage, around the megatron-core model.

Parallelism is applied here and nowhere else, in a fixed order: megatron-core's TP groups
(already created by `init_model_parallel`), then either a plain DeepSpeed engine (PP = 1, ZeRO
0-3) or DeepSpeed's pipeline engine over `PipelineModule` stages (PP > 1, ZeRO 0-1) with a
topology whose rank order matches megatron's (tp fastest, then dp, then pp). The ZeRO stage
in effect is `effective_zero_stage`'s: stage 0 where the configured one would partition nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from megatron_ts.config import OptimConfig, ParallelConfig, ResolvedStage
from megatron_ts.distributed.init import DeepSpeedMPU
from megatron_ts.logging import get_logger
from megatron_ts.models.loss import TokenShuffleLoss
from megatron_ts.models.model import (
    BlockLayer,
    InputLayer,
    ModelSpec,
    OutputLayer,
    TokenShuffleLM,
    layer_seed,
    transformer_config,
)
from megatron_ts.training.ds_config import deepspeed_config
from megatron_ts.training.ema import WeightAverage
from megatron_ts.training.nonfinite import guard_plain_optimizer
from megatron_ts.training.optimizer import param_groups

log = get_logger(__name__)


def effective_zero_stage(
    configured: int, data_parallel: int, pipeline: int, bf16: bool
) -> tuple[int, str]:
    """The ZeRO stage an engine runs with, and why, for the log line.

    ZeRO partitions optimizer state, gradients (2) and parameters (3) over the data-parallel
    ranks only. With one DP rank it partitions nothing, yet stages 1-3 still flatten the
    gradients into a buffer, copy them to the fp32 partition and back after each step: 20-27 ms
    a step of the demo model on CPU (docs/benchmarks.md, issue 22). In fp32 without a pipeline,
    stage 0 (torch's AdamW on the parameters, guarded by `guard_plain_optimizer`) is the same
    step: the same fp32 weights and AdamW moments, and loss curves equal bit for bit over 6
    steps of the debug model (only the reported gradient norm differs, ~1e-6 relative: another
    order of summation). In bf16 it is not: DeepSpeed's stage-0 bf16 optimizer steps
    differently from ZeRO's fp32 master partitions (the loss after the first update differed by
    0.5%), so bf16 keeps the configured stage. Under the pipeline engine stage 0 clips with
    `nonfinite.clip_by_global_norm`, which counts every pipeline stage's parameters (DeepSpeed's
    own clipping left later stages' norm weights out). Checkpoints do not depend on the stage
    (training/optimizer_state.py), so a run may resume across the switch either way.

    Args:
        configured: `parallel.zero_stage`.
        data_parallel: data-parallel size of the stage.
        pipeline: pipeline-parallel size of the stage.
        bf16: bf16 mixed precision.

    Returns:
        (stage in effect, reason).
    """
    del pipeline  # any pipeline size: stage 0's clipping counts every stage (see above)
    if configured == 0:
        return 0, "parallel.zero_stage = 0"
    if data_parallel > 1:
        return configured, f"parallel.zero_stage = {configured} over {data_parallel} DP ranks"
    if bf16:
        return configured, (
            f"parallel.zero_stage = {configured} with 1 DP rank, kept in bf16: DeepSpeed's "
            "stage-0 bf16 optimizer would change the numerics"
        )
    return 0, (
        f"parallel.zero_stage = {configured} partitions over DP ranks and there is 1: stage 0 "
        "takes the same fp32 step without ZeRO's flatten/copy"
    )


def skip_lone_allreduce(engine) -> None:
    """Turns off DeepSpeed's gradient all-reduce for an engine with one data-parallel rank.

    At ZeRO stage 0 DeepSpeed reduces gradients after every optimizer step's backward whatever
    the DP size: it concatenates all gradients into buckets, all-reduces them over the
    one-member DP group and copies them back (`allreduce_bucket`): an identity, a `cat` and a
    `copy_` over every gradient, 0-3% of a demo step at 32 px on CPU (issue 22;
    docs/benchmarks.md, "ts-train overhead vs plain PyTorch", runs 4 and 5).
    With one DP rank there is nothing to reduce (TP and PP ranks hold different parameters, and
    tied weights across pipeline stages are reduced by their own pass), so the step is
    bit-identical without it (tests/distributed/test_zero_stage.py).
    """
    engine.enable_backward_allreduce = False  # DeepSpeedEngine.backward
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False  # PipelineEngine._exec_reduce_grads


METRICS = ("loss", "image_loss", "text_loss", "z_loss", "grad_norm")
"""The fields of `StepResult.metrics`, in order."""


@dataclass
class StepResult:
    """One optimizer step's outcome: host flags now, metrics on the device until read.

    `metrics` stays where the loss was computed, so a step makes no device-to-host transfer
    for its metrics; the trainer reads a logging interval's steps together (`read_metrics`)
    and the properties below read the step alone (one transfer, cached).
    """

    metrics: torch.Tensor
    """(5,) fp64 on the device: METRICS, the loss parts averaged over micro-batches and ranks."""
    skipped: bool
    """The optimizer did not apply the update (non-finite gradients)."""
    nonfinite: bool
    """Skipped, or its loss is not finite: a non-finite step (the same on every rank)."""
    keys: list[str]
    host: list[float] | None = None
    """`metrics` on the host once read."""

    def values(self) -> list[float]:
        if self.host is None:
            self.host = self.metrics.tolist()
        return self.host

    @property
    def loss(self) -> float:
        return self.values()[0]

    @property
    def image_loss(self) -> float:
        return self.values()[1]

    @property
    def text_loss(self) -> float:
        return self.values()[2]

    @property
    def z_loss(self) -> float:
        return self.values()[3]

    @property
    def grad_norm(self) -> float:
        return self.values()[4]


class StageEngine:
    """A DeepSpeed engine for one stage plus what the trainer needs around it."""

    def __init__(
        self,
        spec: ModelSpec,
        stage: ResolvedStage,
        parallel: ParallelConfig,
        optim: OptimConfig,
        text_loss_weight: float,
        seed: int,
        device: torch.device,
        bf16: bool,
        ema_decay: float = 0.0,
    ):
        self.spec = spec
        self.stage = stage
        self.device = device
        tp, pp = stage.tensor, stage.pipeline
        dp = parallel_state.get_data_parallel_world_size()
        self.data_parallel = dp
        self.pipeline = pp > 1
        self.zero_stage, why = effective_zero_stage(parallel.zero_stage, dp, pp, bf16)
        log.info("ZeRO stage %d in effect (%s)", self.zero_stage, why)
        self.loss_fn = TokenShuffleLoss(
            spec.vocab, stage.shuffle_window, text_loss_weight, stage.z_loss
        )
        ds_cfg = deepspeed_config(
            replace(parallel, zero_stage=self.zero_stage),
            optim,
            stage.micro_batch,
            stage.global_batch,
            dp,
            bf16,
            cpu=device.type == "cpu",
        )
        self.accumulation = ds_cfg["gradient_accumulation_steps"]
        if not self.pipeline:
            model = TokenShuffleLM(spec, seed, self.loss_fn)
            self.engine, *_ = deepspeed.initialize(
                model=model,
                model_parameters=param_groups(model, optim.weight_decay),
                config=ds_cfg,
                mpu=DeepSpeedMPU(),
            )
            self.local_layers = model.layers()
        else:
            config = transformer_config(spec)
            n = spec.shape.num_layers
            specs = [LayerSpec(InputLayer, spec, config, layer_seed(seed, 0))]
            specs += [
                LayerSpec(BlockLayer, spec, config, i, layer_seed(seed, i + 1)) for i in range(n)
            ]
            specs.append(LayerSpec(OutputLayer, spec, config, layer_seed(seed, n + 1)))
            topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
            pipe = PipelineModule(
                layers=specs,
                loss_fn=self.loss_fn,
                topology=topology,
                partition_method="type:BlockLayer",
                # aspect-ratio buckets: the sequence length changes from step to step, so the
                # stages exchange activation shapes every micro-batch instead of once
                dynamic_shape=bool(stage.buckets),
            )
            self._check_topology(topology)
            self.engine, *_ = deepspeed.initialize(
                model=pipe, model_parameters=param_groups(pipe, optim.weight_decay), config=ds_cfg
            )
            self.local_layers = {
                idx: getattr(pipe, str(idx)) for idx in range(pipe._local_start, pipe._local_stop)
            }
        if dp == 1 and self.zero_stage == 0:
            skip_lone_allreduce(self.engine)
        # ZeRO-0 fp32: our guard decides skips, and the loss's finiteness joins its verdict
        self.guarded = guard_plain_optimizer(self.engine, self.loss_fn.nonfinite)
        self.is_first_stage = 0 in self.local_layers
        self.ema = WeightAverage(self.local_layers, ema_decay) if ema_decay else None
        self.is_last_stage = (spec.shape.num_layers + 1) in self.local_layers

    @staticmethod
    def _check_topology(topology: PipeModelDataParallelTopology) -> None:
        """DeepSpeed's and megatron's views of this rank must agree, or gradients mix wrongly."""
        coord = topology.get_coord(dist.get_rank())
        ours = (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        )
        if (coord.pipe, coord.data, coord.model) != ours:
            raise RuntimeError(
                f"rank layout mismatch: DeepSpeed {coord} vs megatron (pp, dp, tp) {ours}"
            )

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            batch["text"].to(self.device, non_blocking=True),
            batch["text_mask"].to(self.device, non_blocking=True),
            batch["codes"].to(self.device, non_blocking=True),
        )

    def train_step(self, batches: Iterator[dict]) -> StepResult:
        """One optimizer step over `accumulation` micro-batches drawn from `batches`.

        Only ranks that hold the first or last pipeline stage draw from the iterator.
        """
        keys: list[str] = []
        skipped_before = self.engine.skipped_steps
        needs_data = not self.pipeline or self.is_first_stage or self.is_last_stage
        micro: list[dict] = []
        if needs_data:
            micro = [next(batches) for _ in range(self.accumulation)]
            for batch in micro:
                keys.extend(batch.get("keys", []))
            self.loss_fn.set_step_norm(self._step_norm(micro))
        if not self.pipeline:
            for batch in micro:
                text, mask, codes = self._to_device(batch)
                loss = self.engine(text, codes, mask)
                self.engine.backward(loss)
                self.engine.step()
        else:

            def micro_batches():
                for batch in micro:
                    text, mask, codes = self._to_device(batch)
                    yield (text, codes), (text, mask, codes)

            self.engine.train_batch(data_iter=micro_batches() if needs_data else None)
        skipped = self.engine.skipped_steps > skipped_before
        if self.ema is not None and not skipped:
            self.ema.update()
        metrics = self._reduce_loss_parts(self.engine.get_global_grad_norm())
        # The skip logic needs one host bit per step: is the step non-finite (a streak stops
        # the run, a save never lands inside one). Under our guard (ZeRO-0 fp32) its verdict
        # already covers the loss; otherwise DeepSpeed synced to judge the gradients and a
        # skipped step costs nothing more, and an applied one reads whether its loss is finite
        # (the reduced loss, the same on every rank): one read per optimizer step either way.
        nonfinite = skipped or (not self.guarded and not bool(torch.isfinite(metrics[0])))
        return StepResult(metrics=metrics, skipped=skipped, nonfinite=nonfinite, keys=keys)

    def _step_norm(self, micro: list[dict]) -> torch.Tensor:
        """[text, image] predictions per micro-batch of this step's global batch.

        A micro-batch's loss is its sum over predictions divided by these (not by its own
        counts), so the step's loss and gradients are the token means of the whole global batch
        however it is split into micro-batches and data-parallel ranks: a run resumed on
        another DP size or micro-batch size continues the same curve. Counted on the host
        copies of the masks, as tensors (no Python numbers: nothing here waits for a device);
        on GPU the one all-reduce stays on the device.
        """
        text = torch.stack([b["text_mask"][:, 1:].sum(dtype=torch.int64) for b in micro]).sum()
        image = sum(b["codes"].numel() for b in micro)  # one prediction per code
        counts = torch.stack([text, torch.tensor(image)]).to(torch.float32)
        if self.data_parallel > 1:
            if dist.get_backend() == "nccl":
                counts = counts.to(self.device, non_blocking=True)
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return (counts / (len(micro) * self.data_parallel)).to(self.device, non_blocking=True)

    def _reduce_loss_parts(self, grad_norm: float | torch.Tensor | None) -> torch.Tensor:
        """(5,) fp64 METRICS: mean loss parts over micro-batches and data-parallel ranks, known
        on every rank, and the gradient norm; on the device, without a host transfer."""
        history = self.loss_fn.pop_history()
        device = history[0].values.device if history else self.device
        vec = torch.zeros(5, dtype=torch.float64, device=device)
        if history:
            for parts in history:
                vec[:4] += parts.values[:4].double()  # total, image, text, z_loss
            vec[:4] /= len(history)
            vec[4] = 1.0
        if dist.get_world_size() > 1:
            comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            if vec.device != comm:
                vec = vec.to(comm)
            dist.all_reduce(vec)
        out = torch.cat([vec[:4] / vec[4].clamp(min=1.0), vec.new_zeros(1)])
        if grad_norm is None:
            out[4] = float("nan")
        elif isinstance(grad_norm, torch.Tensor):  # ZeRO and our guard leave it on the device
            out[4:] = grad_norm.detach().reshape(1).to(out.device, out.dtype, non_blocking=True)
        else:
            out[4] = float(grad_norm)
        return out
