"""DeepSpeed over the student ranks only: the `Stepper` of the served runtime.

The student model and the loss module (its projectors) are wrapped together as one
module; DeepSpeed (ZeRO stage from `runtime.zero_stage`) runs on the student
data-parallel group, which it learns from an `mpu` object (the rest of the world are
teacher ranks it must never talk to). The optimizer is a torch AdamW passed in (no
compiled ops on CPU); gradient accumulation is driven by the training loop
(`managed_gradient_accumulation: false`): `backward` only accumulates, `step` reduces
over the students and updates.

Loss normalisation: the loop divides by the token count of the GLOBAL batch (all
accumulation steps and replicas), so the gradient it wants is the SUM over replicas;
DeepSpeed averages over replicas, hence each loss is multiplied by the replica count.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cot2align.train import DataParallel, TrainConfig, build_optimizer, lr_lambda


def disable_shm_comm() -> None:
    """DeepSpeed's shared-memory all-reduce ignores process subgroups (silently wrong results
    when DeepSpeed runs on a subset of the world): switch it off before any DeepSpeed init."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class StudentModules(nn.Module):
    """Everything a student replica trains, as the one module DeepSpeed wraps."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.loss = loss_fn


class StudentMPU:
    """The `mpu` DeepSpeed asks for its groups: data parallel = the students; no model parallelism.

    single: a group of this rank alone (DeepSpeed all-reduces norms over the model-parallel group).
    """

    def __init__(self, dp: DataParallel, dp_ranks: list[int], single: dist.ProcessGroup) -> None:
        self.dp, self.dp_ranks, self.single = dp, dp_ranks, single

    def get_data_parallel_group(self) -> Any:
        return self.dp.group

    def get_data_parallel_world_size(self) -> int:
        return self.dp.size

    def get_data_parallel_rank(self) -> int:
        return self.dp.rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.single

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()


def deepspeed_config(cfg: TrainConfig, zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed config of a student replica (fp32 weights; bf16 comes from autocast in the loop)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "managed_gradient_accumulation": False,
        # stage 0 clips in an optimizer pre-step hook (to report the norm); ZeRO clips itself
        "gradient_clipping": cfg.clip_grad if zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStepper:
    """`Stepper` of one student replica: DeepSpeed engine + AdamW + the lr schedule."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module, cfg: TrainConfig, projector_lr: float,
                 total_steps: int, zero_stage: int, mpu: StudentMPU) -> None:
        import deepspeed

        disable_shm_comm()
        self.dp = mpu.dp
        self.zero_stage = zero_stage
        self.modules = StudentModules(student, loss_fn)
        self.optimizer = build_optimizer(student, loss_fn, cfg, projector_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self._norm = float("nan")
        if zero_stage == 0:  # the hook runs after DeepSpeed's all-reduce, right before the update
            clip = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
            params = [p for g in self.optimizer.param_groups for p in g["params"]]

            def clip_and_record(_opt: Any, _args: Any, _kwargs: Any) -> None:
                self._norm = float(torch.nn.utils.clip_grad_norm_(params, clip))

            self.optimizer.register_step_pre_hook(clip_and_record)
        self.engine, *_ = deepspeed.initialize(model=self.modules, optimizer=self.optimizer,
                                               config=deepspeed_config(cfg, zero_stage), mpu=mpu,
                                               dist_init_required=False)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss * self.dp.size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        if self.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            self._norm = float(norm) if norm is not None else float("nan")
        if torch.isfinite(torch.tensor(self._norm)):
            self.scheduler.step()
        return self._norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Collective over the students when ZeRO partitions the optimizer state."""
        if self.zero_stage == 0:
            return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        parts: list[Any] = [None] * self.dp.size
        dist.all_gather_object(parts, self.engine.optimizer.state_dict(), group=self.dp.group)
        return {"optimizer_by_rank": parts, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load after the model weights (ZeRO rebuilds its fp32 partitions from them)."""
        if self.zero_stage == 0:
            if "optimizer" not in state:
                raise ValueError("checkpoint was saved with ZeRO (optimizer_by_rank); resume with zero_stage > 0")
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            if "optimizer_by_rank" not in state or len(state["optimizer_by_rank"]) != self.dp.size:
                raise ValueError(f"checkpoint's optimizer state does not match ZeRO stage {self.zero_stage} "
                                 f"with {self.dp.size} student replicas")
            self.engine.optimizer.load_state_dict(state["optimizer_by_rank"])
        self.scheduler.load_state_dict(state["scheduler"])
