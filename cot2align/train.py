"""The training loop: one readable function for distillation and for teacher SFT.

    result = train(job, logger=logger, log_cfg=cfg.logging, callbacks=[DevEvaluation(...)])

The teacher is reached only through a `TeacherSource` (in this process: `ColocatedTeacher`;
on a student rank of the served world: `ServedTeacher`, fed by teacher ranks) and the
optimizer only through a `Stepper` (`PlainStepper`, or DeepSpeed over the student replicas),
so every mode runs this same loop. What happens between steps beyond logging and
checkpointing (dev evaluation and the best export, OT heatmaps, stopping on preemption) is
a `Callback` (see `cot2align.callbacks`): the loop knows the interface, not the concerns.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_sharded, set_rng_state
from cot2align.data.dataset import Batch, Sample, collate
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.data.views import ResponseView
from cot2align.distributed.parallel import DataParallel
from cot2align.logging import LoggingConfig, MetricsLogger, log
from cot2align.lora import save_export
from cot2align.losses.base import DistillLoss, LossInputs, LossOutput
from cot2align.models import input_embed, num_layers, output_head, resolve_layers, response_view
from cot2align.optim import FullWeights, PlainStepper, Stepper, TrainConfig


class TeacherSource(Protocol):
    """Gives the teacher's response views of a micro-batch (no gradient)."""

    final_layer: int
    head: nn.Module
    embed: nn.Module

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        """Called once before the loop: the steps to run and what `views` will be asked for
        (layers empty: nothing). A served teacher forwards this request to its teacher ranks."""
        ...

    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]: ...

    def stop(self, step: int) -> None:
        """The loop stops early after `step` (preemption); a served teacher tells its ranks."""
        ...

    def metrics(self) -> dict[str, float]:
        """Cumulative statistics to log (seconds; summed over replicas when logged)."""
        ...


@dataclass
class TrainJob:
    """What one training run trains, on what data, against which teacher (built once per mode by
    `cot2align.recipes.build`)."""

    run_dir: Path
    student: PreTrainedModel
    student_tok: PreTrainedTokenizerBase
    loss_fn: DistillLoss
    samples: list[Sample]
    pad_ids: dict[str, int]
    """Pad id per side: {"student": ..., "teacher": ...}."""
    cfg: TrainConfig
    seed: int
    teacher: TeacherSource | None = None
    """None: no teacher (SFT, teacher training)."""
    needs_aux: bool = False
    """Forward the auxiliary (standard) member of paired samples too (Cross-CoT pairs)."""
    projector_lr: float = 1e-3
    make_stepper: Callable[[int], Stepper] | None = None
    """make_stepper(total_steps): the optimizer (default `PlainStepper`; served: DeepSpeed)."""
    data_parallel: DataParallel = field(default_factory=DataParallel)
    device: torch.device | None = None
    """Where batches go (default: where they are, the CPU)."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when there is one."""


@dataclass
class StepPlan:
    """What one step needs: layers per side, which formats, whether a teacher is used."""

    student_layers: list[int]
    teacher_layers: list[int]
    fmts: list[str]
    needs_teacher: bool


def plan_step(loss_fn: DistillLoss, student_final: int, teacher_final: int, needs_teacher: bool,
              needs_aux: bool) -> StepPlan:
    """The layers the loss reads on each side (resolved against the final layers) and the formats."""
    s, t = loss_fn.required_layers()
    return StepPlan(resolve_layers(s, student_final), resolve_layers(t, teacher_final),
                    ["main", "aux"] if needs_aux else ["main"], needs_teacher)


def loss_inputs(student: PreTrainedModel, student_final: int, batch: Batch, teacher: TeacherSource | None,
                plan: StepPlan, num_tokens: float, num_examples: float) -> LossInputs:
    """Forward passes of one micro-batch (student on each format; teacher through its source): what
    the loss reads."""
    fmts = [f for f in plan.fmts if f in batch.seqs["student"]]
    s_views = {f: response_view(student, batch.seqs["student"][f], plan.student_layers) for f in fmts}
    head = output_head(student)
    logits = head(s_views["main"].hidden[student_final]).float()  # (B, N_s, V_s)
    if teacher is not None and plan.needs_teacher:
        t_views = teacher.views(batch, fmts, plan.teacher_layers)
        t_head, t_embed, t_final = teacher.head, teacher.embed, teacher.final_layer
    else:
        t_views, t_head, t_embed, t_final = {}, nn.Identity(), nn.Identity(), 0
    return LossInputs(
        student=s_views, teacher=t_views, student_logits=logits, student_final=student_final,
        teacher_final=t_final, student_head=head, teacher_head=t_head, student_embed=input_embed(student),
        teacher_embed=t_embed, num_tokens=num_tokens, num_examples=num_examples,
        extras={"student_head_weight": head.weight},
    )


def micro_batch_loss(student: PreTrainedModel, student_final: int, loss_fn: DistillLoss, batch: Batch,
                     teacher: TeacherSource | None, plan: StepPlan, num_tokens: float,
                     num_examples: float) -> LossOutput:
    """The loss of one micro-batch (`loss_inputs`, then `loss_fn`)."""
    inputs = loss_inputs(student, student_final, batch, teacher, plan, num_tokens, num_examples)
    out = loss_fn(inputs)
    # every student forward stays in the graph, even one whose rows are all padding (an "aux" pass over
    # unpaired records): ZeRO-3 gathers weights in backward per module call, so the students' backward
    # passes must visit the same modules
    unused = sum((h.sum() for v in inputs.student.values() for h in v.hidden.values()),
                 inputs.student_logits.new_zeros(()))
    return LossOutput(out.total + 0.0 * unused, out.parts)


def response_tokens(samples: list[Sample], idx: list[int]) -> int:
    """Student main-format response tokens of the given samples."""
    return sum(len(samples[i].seqs["student"]["main"].ids) - samples[i].seqs["student"]["main"].prompt_len
               for i in idx)


def export_student(out: Path, full: FullWeights, tok: PreTrainedTokenizerBase) -> Path:
    """An HF checkpoint folder of the student (whole weights; LoRA: merged, the adapters in out/adapter),
    its tokenizer and the loss modules."""
    save_export(full.student, out)
    tok.save_pretrained(out)
    torch.save(full.loss, out / "loss_modules.pt")
    return out


@dataclass
class TrainResult:
    steps: int
    best_dev: float | None
    export_dir: Path
    history: list[dict[str, float]]
    interrupted: bool = False
    """Stopped early on request after checkpointing; resume to go on."""
    early_stopped: bool = False
    """Ended before its last step because dev stopped improving (`train.patience`); complete."""


@dataclass
class Loop:
    """The loop's state as callbacks see it after each step."""

    job: TrainJob
    stepper: Stepper
    logger: MetricsLogger
    step: int
    first_step: int
    total_steps: int
    best: float | None = None
    """Best dev score so far (callbacks that evaluate update it; it is checkpointed)."""
    since_best: int = 0
    """Dev evaluations since the best one (checkpointed, for early stopping)."""
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False
    """Set by a callback: checkpoint, tell the teacher and return after this step."""
    finish: bool = False
    """Set by a callback (early stopping): the run is complete after this step; export and return."""
    _full: tuple[int, FullWeights] | None = None

    @property
    def main(self) -> bool:
        return self.job.data_parallel.main

    def full_weights(self) -> FullWeights:
        """Whole weights of this step (collective under ZeRO-3: every replica calls it; gathered once a step)."""
        if self._full is None or self._full[0] != self.step:
            self._full = (self.step, self.stepper.full_weights())
        return self._full[1]

    def export(self, name: str, full: FullWeights) -> Path:
        return export_student(self.job.run_dir / name, full, self.job.student_tok)


class Callback(Protocol):
    """Called on every replica after each optimizer step, in list order, before the checkpoint."""

    def after_step(self, loop: Loop) -> None: ...


def train(job: TrainJob, *, logger: MetricsLogger, log_cfg: LoggingConfig, callbacks: Sequence[Callback] = (),
          stop_after: int | None = None) -> TrainResult:
    """Train `job.student` (and the loss's projectors) on `job.samples`; export the final model.

    history: one row per optimizer step with the step's loss parts summed over the global batch
    (for tests and reports). stop_after: return after this many steps without the final export
    (tests of resume). Returns the best export when a callback made one (`Loop.best`), else the final.
    """
    cfg, dp, teacher, loss_fn = job.cfg, job.data_parallel, job.teacher, job.loss_fn
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(job.seed)
    sampler = GlobalBatchSampler(len(job.samples), cfg.micro_batch_size, cfg.grad_accum, dp.size, job.seed)
    total_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    student_final = num_layers(job.student)
    plan = plan_step(loss_fn, student_final, teacher.final_layer if teacher else 0, teacher is not None,
                     job.needs_aux)
    make_stepper = job.make_stepper or partial(PlainStepper, job.student, loss_fn, cfg, job.projector_lr)
    loop = Loop(job, make_stepper(total_steps), logger, step=0, first_step=0, total_steps=total_steps)
    ckpt = latest_checkpoint(job.run_dir) if job.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        loop.stepper.load_state_dict(state, ckpt)  # weights too (may be collective)
        set_rng_state(state["rng"])
        loop.step, loop.best, loop.history = state["step"], state["best"], state["history"]
        loop.since_best = state.get("since_best", 0)
        log.info("resumed from %s at step %d", ckpt, loop.step)
    loop.first_step = loop.step
    loop.finish = bool(cfg.patience) and loop.since_best >= cfg.patience  # resumed after it ended early

    def save() -> None:
        trained = loop.stepper.state_dict()  # on every replica: may be collective
        shard = trained.pop("shard", None)  # this replica's part of a partitioned optimizer
        common = {**trained, "rng": rng_state(), "step": loop.step, "best": loop.best, "since_best": loop.since_best,
                  "history": loop.history,
                  "sampler": {"step": loop.step}} if loop.main else None
        save_sharded(job.run_dir, loop.step, common, shard, dp.rank, dp.size, dp.barrier)

    autocast = torch.autocast(job.device.type if job.device else "cpu", dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bfloat16")
    job.student.train()
    loss_fn.train()
    if teacher is not None:
        teacher.start(loop.step, total_steps, plan.teacher_layers if plan.needs_teacher else [], plan.fmts)
        if loop.finish:
            teacher.stop(loop.step)
    running: dict[str, list[float]] = defaultdict(list)
    t_last, tokens_since = time.perf_counter(), 0
    source_last = teacher.metrics() if teacher is not None else {}
    progress = tqdm(total=total_steps, initial=loop.step, disable=not (log_cfg.progress and loop.main),
                    desc="train", dynamic_ncols=True, leave=False)
    try:
        while loop.step < total_steps and not loop.finish:
            step = loop.step
            micro = sampler.micro_batches(step, dp_rank=dp.rank)
            every = [m for r in range(dp.size) for m in sampler.micro_batches(step, dp_rank=r)]  # global batch
            num_tokens = float(sum(response_tokens(job.samples, m) for m in every))
            num_examples = float(sum(len(m) for m in every))
            loop.stepper.zero_grad()
            parts_sum: dict[str, float] = defaultdict(float)
            for idx in micro:
                batch = collate([job.samples[i] for i in idx], job.pad_ids, plan.fmts)
                batch = batch.to(job.device) if job.device is not None else batch
                with autocast:
                    out = loop.stepper.forward(partial(micro_batch_loss, job.student, student_final, loss_fn, batch,
                                                       teacher, plan, num_tokens, num_examples))
                loop.stepper.backward(out.total)
                parts_sum["loss"] += float(out.total.detach())
                for k, v in out.parts.items():
                    parts_sum[k] += float(v)
            grad_norm = loop.stepper.step()
            parts_sum = defaultdict(float, dp.sum(parts_sum))
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm at step {step} (loss parts {dict(parts_sum)})")
            loop.step = step = step + 1
            tokens_since += int(num_tokens)
            row = {**parts_sum, "grad_norm": grad_norm, "lr": loop.stepper.lr()}
            loop.history.append({"step": step, **row})
            for key, value in row.items():
                running[key].append(value)
            progress.update(1)
            if step % log_cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                source_now = dp.sum(teacher.metrics()) if teacher is not None else {}
                if loop.main:
                    metrics = {k: sum(v) / len(v) for k, v in running.items()}
                    metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                    metrics["epoch"] = sampler.epoch_of(step - 1)
                    logger.log(step, metrics, prefix="train/")
                    if source_now:
                        logger.log(step, _source_metrics(source_now, source_last, (now - t_last) * dp.size),
                                   "serve/")
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}")
                running.clear()
                t_last, tokens_since, source_last = now, 0, source_now
            for callback in callbacks:
                callback.after_step(loop)
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or loop.stop or loop.finish:
                save()
            if (loop.stop or loop.finish) and teacher is not None and step < total_steps:
                teacher.stop(step)
            if loop.finish:
                log.info("dev score not better for %d evaluations: done at step %d of %d", loop.since_best, step,
                         total_steps)
                break
            if loop.stop:
                log.info("stopped at step %d of %d on request; the checkpoint resumes from here", step, total_steps)
                return TrainResult(step, loop.best, job.run_dir, loop.history, interrupted=True)
            if stop_after is not None and step >= stop_after:
                return TrainResult(step, loop.best, job.run_dir, loop.history)
    finally:
        progress.close()
    weights = loop.full_weights()  # every replica (gathered at the last step already when evaluated)
    early = loop.step < total_steps
    if not loop.main:
        return TrainResult(loop.step, loop.best, job.run_dir / "final", loop.history, early_stopped=early)
    final = loop.export("final", weights)
    best = job.run_dir / "best"
    return TrainResult(loop.step, loop.best, best if loop.best is not None else final, loop.history,
                       early_stopped=early)


def _source_metrics(now: dict[str, float], last: dict[str, float], seconds: float) -> dict[str, float]:
    """Serving statistics of an interval: each cumulative time as a fraction of the interval's
    wall time (summed over replicas, so `seconds` is the interval times the replica count)."""
    return {k.removesuffix("_s") + "_frac": (v - last.get(k, 0.0)) / max(seconds, 1e-9) for k, v in now.items()}
