"""Distillation losses: CE, cross-tokenizer KD baselines, and CoT2Align's Cross-CoT OT."""

from cot2align.losses.base import DistillLoss, LossContext, LossInputs, LossOutput, ResponseView
from cot2align.losses.config import LossConfig
from cot2align.losses.registry import build_loss, loss_names

__all__ = [
    "DistillLoss",
    "LossConfig",
    "LossContext",
    "LossInputs",
    "LossOutput",
    "ResponseView",
    "build_loss",
    "loss_names",
]
