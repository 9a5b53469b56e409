"""The pieces every training recipe assembles the same way: student, loss, callbacks, logger.

One place decides what a loss needs from the teacher (`needs`), how the student is built, and
which callbacks a run gets, so the colocated recipe, the served student ranks and teacher SFT
build their `TrainJob` from the same parts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.callbacks import DevEvaluation, OTPlanHeatmaps, StopOnRequest
from cot2align.config import Config
from cot2align.data.jsonl import Example
from cot2align.evaluate import EvalConfig
from cot2align.logging import LoggingConfig, MetricsLogger, log
from cot2align.lora import apply_lora, trainable_parameters
from cot2align.losses import DistillLoss, LossContext, build_loss
from cot2align.losses.config import LossConfig
from cot2align.models import build_tiny_model, hidden_size, load_model
from cot2align.optim import TrainConfig
from cot2align.train import Callback


class Needs(NamedTuple):
    """What a loss needs besides the student's main sequence."""

    teacher: bool
    """Teacher states (every loss but sft)."""
    aux: bool
    """The auxiliary (standard) member of paired samples: Cross-CoT pairs of cot2align."""


def needs(loss: LossConfig) -> Needs:
    """What `loss.name` needs from the teacher and from the data."""
    return Needs(teacher=loss.name != "sft", aux=loss.name == "cot2align" and loss.ot.cross_pairs)


def student_model(cfg: Config, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """`student.path` (an HF checkpoint), else a fresh embedded tiny student for `tok`; wrapped with LoRA
    adapters when `student_lora.enabled` (then a peft model whose base weights are frozen)."""
    model = (load_model(cfg.student.path, cfg.student.dtype) if cfg.student.path
             else build_tiny_model(cfg.embedded.student_model, tok, seed=cfg.run.seed))
    if not cfg.student_lora.enabled:
        return model
    lora_model: PreTrainedModel = apply_lora(model, cfg.student_lora, "student_lora")
    n_train, n_all = trainable_parameters(lora_model)
    log.info("student: LoRA r=%d on %s: %d of %d parameters trainable", cfg.student_lora.r,
             ",".join(cfg.student_lora.target_modules), n_train, n_all)
    return lora_model


def distill_loss(cfg: Config, student: PreTrainedModel, teacher_hidden: int, s_tok: PreTrainedTokenizerBase,
                 t_tok: PreTrainedTokenizerBase) -> DistillLoss:
    """`cfg.loss` for this student / teacher pair (hidden sizes, vocabularies, tokenizers)."""
    ctx = LossContext(hidden_size(student), teacher_hidden, len(s_tok), len(t_tok),
                      s_tok.get_vocab() == t_tok.get_vocab(), s_tok, t_tok,
                      cache_dir=str(Path(cfg.run.work_dir) / "cache"))
    return build_loss(cfg.loss, ctx)


def callbacks(log_cfg: LoggingConfig, eval_cfg: EvalConfig, train_cfg: TrainConfig, run_dir: Path,
              dev: list[Example] | None, stop: Callable[[], bool] | None = None) -> list[Callback]:
    """Dev evaluation (+ best export, early stopping with `train_cfg.patience`), OT heatmaps when
    `logging.heatmap_every` is set, and stopping on request (preemption) when `stop` is given; in
    the order the loop must call them."""
    out: list[Callback] = []
    if log_cfg.heatmap_every:
        out.append(OTPlanHeatmaps(log_cfg.heatmap_every, run_dir))
    out.append(DevEvaluation(dev, eval_cfg, train_cfg.eval_every, train_cfg.patience))
    if stop is not None:
        out.append(StopOnRequest(stop))
    return out


class SilentLogger:
    """The metrics logger of every student but the first (only the first logs)."""

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        pass

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(cfg: Config, run_dir: Path, name: str, job_type: str = "distill", main: bool = True,
                extra: dict[str, Any] | None = None) -> MetricsLogger:
    """metrics.jsonl + W&B of a run (the resolved config and `extra` logged as its config); a silent
    logger where `main` is false."""
    if not main:
        return SilentLogger()  # type: ignore[return-value]
    return MetricsLogger(run_dir, cfg.logging, {**cfg.to_dict(), **(extra or {})}, name=name, job_type=job_type)
