"""Optimisation: `TrainConfig`, the AdamW optimizer with its projector group, the lr schedule,
and the `Stepper` interface the training loop steps through (`PlainStepper` in one process;
`cot2align.student.engine.DeepSpeedStepper` over the student replicas)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from cot2align.configbase import ConfigBase, require
from cot2align.losses.base import LossOutput


@dataclass
class TrainConfig(ConfigBase):
    """Optimisation settings (`train.*` for distillation, `teacher_train.*` for teacher SFT)."""

    lr: float = 5e-4
    min_lr: float = 1e-7
    """Cosine schedule floor."""
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps; > 0 overrides epochs."""
    micro_batch_size: int = 8
    grad_accum: int = 1
    clip_grad: float = 1.0
    """Max global grad norm (0 = no clipping)."""
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute precision (bf16 autocast where supported)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    eval_every: int = 0
    """Dev evaluation every N steps (0 = only at the end); the best student is exported."""
    patience: int = 0
    """Early stopping: end the run after this many dev evaluations in a row without a better score
    (0 = train all steps). Needs eval_every > 0; the best student is the one exported."""
    threads: int = 0
    """torch.set_num_threads (0 = leave torch's default)."""

    def check(self, prefix: str) -> None:
        require(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        require(self.micro_batch_size >= 1, f"{prefix}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.grad_accum >= 1, f"{prefix}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(self.epochs >= 1 or self.max_steps > 0, f"{prefix}.epochs", "set epochs >= 1 or max_steps > 0")
        require(self.clip_grad >= 0, f"{prefix}.clip_grad", f"must be >= 0, got {self.clip_grad}")
        require(self.patience >= 0, f"{prefix}.patience", f"must be >= 0, got {self.patience}")
        require(not self.patience or self.eval_every > 0, f"{prefix}.patience",
                f"early stopping needs dev evaluations: set {prefix}.eval_every > 0")


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's base lr: linear warm-up, then cosine to min_lr / lr (or constant)."""
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(student: nn.Module, loss_fn: nn.Module, cfg: TrainConfig,
                    projector_lr: float) -> torch.optim.Optimizer:
    """AdamW; the loss module's parameters (projectors) get their own lr."""
    groups: list[dict[str, Any]] = [{"params": [p for p in student.parameters() if p.requires_grad],
                                     "lr": cfg.lr}]
    extra = [p for p in loss_fn.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "lr": projector_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


class FullWeights(NamedTuple):
    """The student with whole weights (for evaluation and export) and the loss modules' state dict."""

    student: nn.Module
    loss: dict[str, Tensor]


class Stepper(Protocol):
    """Forward and backward passes, optimizer steps and state of the trainable modules (student +
    loss projectors). `full_weights`, `state_dict` and `load_state_dict` may be collective over
    the student replicas: every replica calls them at the same points."""

    def zero_grad(self) -> None: ...

    def forward(self, loss: Callable[[], LossOutput]) -> LossOutput:
        """Run `loss()`: one micro-batch's forward passes and loss (inside the engine under ZeRO-3)."""
        ...

    def full_weights(self) -> FullWeights:
        """Whole weights, valid on the first replica (ZeRO-3 gathers them: collective)."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (already normalised by the global batch)."""
        ...

    def step(self) -> float:
        """Clip, update (skipped when the norm is not finite), advance the lr schedule; returns the
        global gradient norm before clipping."""
        ...

    def lr(self) -> float: ...

    def state_dict(self) -> dict[str, Any]:
        """"student" and "loss" weights (whole, valid on the first replica), optimizer, scheduler;
        optionally "shard": this replica's own part (a partitioned optimizer), saved per replica."""
        ...

    def load_state_dict(self, state: dict[str, Any], folder: Path | None = None) -> None:
        """Restore `state`; folder: the checkpoint folder, where the replicas' shards are read."""
        ...


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict, or only its trainable parameters when some are frozen (LoRA: the
    adapters, not a copy of the base model in every checkpoint)."""
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = model.state_dict()
    if not frozen_names:
        return state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def load_trained_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Inverse of `trained_state`: a partial state must cover exactly the trainable parameters
    (the frozen ones are already in the model, rebuilt from the same base checkpoint)."""
    if len(state) == len(model.state_dict()):
        model.load_state_dict(state)
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        missing, extra = sorted(trainable - set(state))[:5], sorted(set(state) - trainable)[:5]
        raise ValueError(f"checkpoint holds a partial student state that does not match the trainable "
                         f"parameters (missing {missing}, unexpected {extra}): resume with the same "
                         "model and LoRA settings")
    model.load_state_dict(state, strict=False)


class PlainStepper:
    """One process: AdamW, clip_grad_norm_ and the lr schedule (the colocated path)."""

    def __init__(self, student: nn.Module, loss_fn: nn.Module, cfg: TrainConfig, projector_lr: float,
                 total_steps: int) -> None:
        self.student, self.loss_fn = student, loss_fn
        self.optimizer = build_optimizer(student, loss_fn, cfg, projector_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.clip = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, loss: Callable[[], LossOutput]) -> LossOutput:
        return loss()

    def full_weights(self) -> FullWeights:
        return FullWeights(self.student, self.loss_fn.state_dict())

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        return float(grad_norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"student": trained_state(self.student), "loss": self.loss_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], folder: Path | None = None) -> None:
        load_trained_state(self.student, state["student"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
