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

ZeRO-3 partitions the weights themselves: outside a module's forward a parameter is
an empty tensor on every student. So the whole micro-batch loss runs inside the
engine (`forward`: `StudentModules.forward` calls it), where DeepSpeed's hooks gather
each module's weights for its own forward and backward. A weight read outside its module
is not gathered there: DSKD's products with the student's output-head weight (the
`student_head_weight` extra) would see an empty tensor, so DSKD under served ZeRO-3 is refused
before training (`Config.check`, key runtime.zero_stage).
Evaluation and export need whole weights on the first student: `full_weights`
(collective over the students) gathers them one module at a time into a full copy of
the student kept on the first student only. Each gather is a collective, so every
student must call the same modules in the same order in each micro-batch: true because every
micro-batch is collated with the step's formats (`collate(..., fmts)`: a micro-batch without
CoT-paired records still runs the "aux" forward, on 1-token dummy rows).

Checkpoints under ZeRO are saved per student (`state_dict()["shard"]`, written by each rank
into the step folder by `checkpoint.save_sharded`): for every parameter a student holds a
piece of, the piece's offset in the flattened parameter and its fp32 master weights and Adam
moments. The format does not depend on how the parameters were partitioned, so a run may
resume on a different number of students: each student cuts its new partition out of the
overlapping saved pieces (`_load_shards`, shards memory-mapped).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cot2align.checkpoint import CheckpointError, load_shard, shard_name
from cot2align.distributed.parallel import DataParallel
from cot2align.losses.base import LossOutput
from cot2align.optim import (
    FullWeights,
    TrainConfig,
    build_optimizer,
    load_trained_state,
    lr_lambda,
    trained_state,
)

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-element state, saved per student next to the fp32 master weights."""


def disable_shm_comm() -> None:
    """DeepSpeed's shared-memory all-reduce ignores process subgroups (silently wrong results
    when DeepSpeed runs on a subset of the world): switch it off before any DeepSpeed init."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def confine_to_students(group: dist.ProcessGroup) -> None:
    """ZeRO-3 calls collectives on the default group, i.e. the whole world, which the teacher ranks
    never join (deadlock): `deepspeed.comm.barrier()` in its set-up and, until its prefetch trace
    is recorded, `assert_ints_same_as_other_ranks` (a broadcast from global rank 0) after each step.
    Make both run over `group` (the students) in this process."""
    import deepspeed.comm as ds_comm
    import deepspeed.runtime.zero.partition_parameters as ds_partition
    import deepspeed.runtime.zero.partitioned_param_coordinator as ds_coordinator
    import deepspeed.runtime.zero.stage3 as ds_stage3
    import deepspeed.runtime.zero.utils as ds_utils

    original = getattr(ds_comm.barrier, "__wrapped_barrier__", ds_comm.barrier)

    def barrier(group_: Any = None, async_op: bool = False, device_ids: Any = None, **kwargs: Any) -> Any:
        return original(group=group if group_ is None else group_, async_op=async_op, device_ids=device_ids,
                        **kwargs)

    def same_on_students(ints: list[int]) -> None:
        lists: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(lists, list(ints), group=group)
        if any(x != lists[0] for x in lists):
            raise RuntimeError(f"ZeRO-3: the students disagree (e.g. on the order of module calls): {lists}")

    setattr(barrier, "__wrapped_barrier__", original)  # noqa: B010
    ds_comm.barrier = barrier
    for module in (ds_utils, ds_partition, ds_coordinator, ds_stage3):
        if hasattr(module, "assert_ints_same_as_other_ranks"):
            setattr(module, "assert_ints_same_as_other_ranks", same_on_students)  # noqa: B010


class StudentModules(nn.Module):
    """Everything a student replica trains, as the one module DeepSpeed wraps."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.loss = loss_fn

    def forward(self, loss: Callable[[], LossOutput]) -> tuple[Tensor, dict[str, Tensor]]:
        """Run one micro-batch's forward passes and loss (`loss()` uses `self.student` and
        `self.loss`); returns (total scalar, detached parts) as tensors, so that DeepSpeed's
        backward hooks attach to the output."""
        out = loss()
        return out.total, dict(out.parts)


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


def deepspeed_config(cfg: TrainConfig, zero_stage: int, persist_below: int = 100_000) -> dict[str, Any]:
    """The DeepSpeed config of a student replica (fp32 weights; bf16 comes from autocast in the loop).

    persist_below: ZeRO-3 keeps parameters with fewer elements whole on every replica."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = persist_below
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "managed_gradient_accumulation": False,
        # stage 0 clips in an optimizer pre-step hook (to report the norm); ZeRO clips itself
        "gradient_clipping": cfg.clip_grad if zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStepper:
    """`Stepper` of one student replica: DeepSpeed engine + AdamW + the lr schedule.

    zero3_persist_below: see `deepspeed_config` (ZeRO-3 only).
    """

    def __init__(self, student: nn.Module, loss_fn: nn.Module, cfg: TrainConfig, projector_lr: float,
                 total_steps: int, zero_stage: int, mpu: StudentMPU, zero3_persist_below: int = 100_000) -> None:
        import deepspeed

        disable_shm_comm()
        if zero_stage == 3:
            confine_to_students(mpu.dp.group)
        self.dp = mpu.dp
        self.zero_stage = zero_stage
        self.modules = StudentModules(student, loss_fn)
        # ZeRO-3: the first student keeps a whole copy for evaluation and export (filled by full_weights)
        self._full = copy.deepcopy(student) if zero_stage == 3 and self.dp.rank == 0 else None
        self._updates, self._gathered_at = 0, -1
        self._loss_state: dict[str, Tensor] = {}
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
                                               config=deepspeed_config(cfg, zero_stage, zero3_persist_below),
                                               mpu=mpu,
                                               dist_init_required=False)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def forward(self, loss: Callable[[], LossOutput]) -> LossOutput:
        """Run `loss()` (one micro-batch's forward passes and loss); under ZeRO-3 inside the engine."""
        if self.zero_stage < 3:
            return loss()
        total, parts = self.engine(loss)
        return LossOutput(total, parts)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss * self.dp.size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        self._updates += 1
        if self.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            self._norm = float(norm) if norm is not None else float("nan")
        if torch.isfinite(torch.tensor(self._norm)):
            self.scheduler.step()
        return self._norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_weights(self) -> FullWeights:
        """The student with whole weights and the loss modules' state dict, valid on the first
        student. Collective over the students under ZeRO-3 (call on every student at the same
        points); the gathered copy is reused until the next optimizer step."""
        if self.zero_stage < 3:
            return FullWeights(self.modules.student, self.modules.loss.state_dict())
        if self._gathered_at != self._updates:
            state = self._gather()
            if self._full is not None:
                self._full.load_state_dict({k[len("student."):]: v for k, v in state.items()
                                            if k.startswith("student.")})
                self._loss_state = {k[len("loss."):]: v for k, v in state.items() if k.startswith("loss.")}
            self._gathered_at = self._updates
        if self._full is None:
            return FullWeights(self.modules.student, {})  # partitioned: not for use on this student
        return FullWeights(self._full, self._loss_state)

    def _gather(self) -> dict[str, Tensor]:
        """ZeRO-3: whole weights of every module, one module at a time, as a state dict of
        StudentModules on the first student (empty elsewhere). Collective over the students."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        state: dict[str, Tensor] = {}
        first = self.dp.rank == 0
        for prefix, module in self.modules.named_modules():
            params = list(module.parameters(recurse=False))
            with GatheredParameters(params, modifier_rank=0):  # modifier 0: frees the gathered copies on exit
                if first:
                    head = f"{prefix}." if prefix else ""
                    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                        if name not in module._non_persistent_buffers_set:
                            state[head + name] = t.detach().clone()
        return state

    def _scatter(self, state: dict[str, Tensor]) -> None:
        """ZeRO-3: load a StudentModules state dict into the partitioned modules (collective). Frozen
        parameters (a LoRA student's base weights) may be absent: they keep the model's values."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        frozen_names = {n for n, p in self.modules.named_parameters(remove_duplicate=False) if not p.requires_grad}
        for prefix, module in self.modules.named_modules():
            params = list(module.parameters(recurse=False))
            with GatheredParameters(params, modifier_rank=0):
                if self.dp.rank == 0:
                    head = f"{prefix}." if prefix else ""
                    missing: list[str] = []
                    errors: list[str] = []
                    module._load_from_state_dict(state, head, {}, True, missing, [], errors)
                    missing = [k for k in missing if k not in frozen_names]
                    if missing or errors:
                        raise ValueError(f"checkpoint does not fit the student: missing {missing}, {errors}")

    def state_dict(self) -> dict[str, Any]:
        """Weights ("student": its trainable parameters, all of them unless LoRA freezes the base; "loss";
        whole, on the first student), schedule and optimizer. Under ZeRO the optimizer is NOT gathered:
        "shard" holds this student's own part (see `_shard`), which the loop saves per rank. Collective
        over the students under ZeRO-3 (the weights are gathered)."""
        full = self.full_weights()
        out: dict[str, Any] = {"student": trained_state(full.student), "loss": full.loss,
                               "scheduler": self.scheduler.state_dict()}
        if self.zero_stage == 0:
            return {**out, "optimizer": self.optimizer.state_dict()}
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        return {**out, "zero": {"stage": self.zero_stage, "replicas": self.dp.size, "lr": lrs},
                "shard": self._shard()}

    def _fragments(self) -> list[tuple[str, Tensor, int, int, int]]:
        """This student's pieces of the partitioned fp32 master weights, one per trainable
        parameter it holds a piece of: (name in StudentModules, flat fp32 partition it lives in,
        start in that partition, start in the flattened parameter, element count)."""
        opt = self.engine.optimizer
        out: list[tuple[str, Tensor, int, int, int]] = []
        for name, p in self.modules.named_parameters():
            if not p.requires_grad:
                continue
            if self.zero_stage == 3:
                group, start, numel = opt.grad_position[opt.get_param_id(p)]
                offset = self.dp.rank * numel  # ZeRO-3: equal partitions of the flattened parameter
                count = max(0, min(numel, int(p.ds_numel) - offset))  # type: ignore[attr-defined]
                if count:
                    out.append((name, opt.fp32_partitioned_groups_flat[group], int(start), offset, count))
                continue
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # ZeRO-1/2: no element of this parameter in this student's partition
                continue
            out.append((name, opt.single_partition_of_fp32_groups[mapping.param_group_index],
                        mapping.hp_fragment_address.start, mapping.lp_fragment_address.start,
                        mapping.lp_fragment_address.numel))
        return out

    def _shard(self) -> dict[str, Any]:
        """This student's optimizer state, independent of how it was partitioned: for every
        parameter it holds a piece of, {"offset": start in the flattened parameter, "fp32",
        "exp_avg", "exp_avg_sq": 1-D tensors [count]}, and "step" (Adam's step count)."""
        inner = self.engine.optimizer.optimizer
        params: dict[str, dict[str, Any]] = {}
        steps: set[float] = set()
        for name, flat, start, offset, count in self._fragments():
            state = inner.state.get(flat, {})
            entry: dict[str, Any] = {"offset": offset, "fp32": flat.detach().narrow(0, start, count).cpu().clone()}
            for key in ADAM_KEYS:
                if key in state:
                    entry[key] = state[key].narrow(0, start, count).cpu().clone()
            if "step" in state:
                steps.add(float(state["step"]))
            params[name] = entry
        if len(steps) > 1:
            raise RuntimeError(f"ZeRO optimizer groups disagree on the step count: {sorted(steps)}")
        return {"params": params, "step": steps.pop() if steps else None}

    def _load_shards(self, folder: Path, replicas: int) -> None:
        """Fill this student's partitions of the fp32 weights and Adam state from the shards of
        `replicas` students (any number: each piece is cut from whichever saved pieces overlap
        it). Shards are memory-mapped, so only the overlapping pieces are read."""
        shards = [load_shard(folder, r) for r in range(replicas)]
        steps = {s["step"] for s in shards if s["step"] is not None}
        if len(steps) > 1:
            raise CheckpointError(f"{folder}: the shards disagree on the optimizer step: {sorted(steps)}")
        step = steps.pop() if steps else None
        inner = self.engine.optimizer.optimizer
        for name, flat, start, offset, count in self._fragments():
            if step is not None and flat not in inner.state:
                inner.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                     **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
            state = inner.state.get(flat, {})
            targets = {"fp32": flat.data.narrow(0, start, count),
                       **{k: state[k].narrow(0, start, count) for k in ADAM_KEYS if k in state}}
            covered = 0
            for r, shard in enumerate(shards):
                piece = shard["params"].get(name)
                if piece is None:
                    continue
                lo = max(offset, piece["offset"])
                hi = min(offset + count, piece["offset"] + piece["fp32"].numel())
                if lo >= hi:
                    continue
                for key, target in targets.items():
                    if key not in piece:
                        raise CheckpointError(f"{folder / shard_name(r)}: {name} has no {key!r}")
                    target[lo - offset:hi - offset].copy_(piece[key][lo - piece["offset"]:hi - piece["offset"]])
                covered += hi - lo
            if covered != count:
                raise CheckpointError(f"{folder}: the shards cover {covered} of the {count} elements of {name} "
                                      f"(from {offset}) this student holds: the checkpoint does not fit this student")

    def load_state_dict(self, state: dict[str, Any], folder: Path | None = None) -> None:
        """Weights, then the optimizer: under ZeRO from the per-student shards in `folder`, which
        may come from a different number of students (resharding)."""
        if self.zero_stage == 3:
            self._scatter({**{f"student.{k}": v for k, v in state["student"].items()},
                           **{f"loss.{k}": v for k, v in state["loss"].items()}})
            self._gathered_at = -1
        else:
            load_trained_state(self.modules.student, state["student"])
            self.modules.loss.load_state_dict(state["loss"])
        if self.zero_stage == 0:
            if "optimizer" not in state:
                raise CheckpointError(f"{folder}: saved with ZeRO (per-student optimizer shards); resume with "
                                      "runtime.zero_stage > 0")
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            if "zero" not in state or folder is None:
                raise CheckpointError(f"{folder}: saved without ZeRO (one optimizer state); resume with "
                                      "runtime.zero_stage=0")
            self._load_shards(Path(folder), int(state["zero"]["replicas"]))
            for group, lr in zip(self.optimizer.param_groups, state["zero"]["lr"], strict=True):
                group["lr"] = lr
        self.scheduler.load_state_dict(state["scheduler"])
