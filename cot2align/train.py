"""The training loop: one readable function for distillation and for teacher SFT.

`train()` runs on one process with the teacher in the same process (the `colocated`
mode). The teacher is reached only through a `TeacherSource`, and the optimizer only
through a `Stepper`, so the served runtime (`cot2align.runtime`) runs this same loop on
each data-parallel student rank with a source that receives hidden states from teacher
ranks and a DeepSpeed stepper.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cot2align.configbase import ConfigBase, require
from cot2align.data.dataset import Batch, Sample, collate
from cot2align.data.jsonl import Example
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.evaluate import EvalConfig, evaluate_examples
from cot2align.logging import LoggingConfig, MetricsLogger, log
from cot2align.lora import save_export
from cot2align.losses.base import DistillLoss, LossInputs, LossOutput, ResponseView
from cot2align.models import frozen, input_embed, output_head, resolve_layers, response_view
from cot2align.transport import any_rank


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
    threads: int = 0
    """torch.set_num_threads (0 = leave torch's default)."""

    def check(self, prefix: str) -> None:
        require(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        require(self.micro_batch_size >= 1, f"{prefix}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.grad_accum >= 1, f"{prefix}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(self.epochs >= 1 or self.max_steps > 0, f"{prefix}.epochs", "set epochs >= 1 or max_steps > 0")
        require(self.clip_grad >= 0, f"{prefix}.clip_grad", f"must be >= 0, got {self.clip_grad}")


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


class ColocatedTeacher:
    """The teacher model in this process: runs its forward pass on the teacher tokenization."""

    def __init__(self, model: PreTrainedModel) -> None:
        from cot2align.models import num_layers

        self.model = frozen(model)
        self.final_layer = num_layers(model)
        self.head = output_head(model)
        self.embed = input_embed(model)

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        pass

    @torch.no_grad()
    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]:
        return {f: response_view(self.model, batch.seqs["teacher"][f], layers) for f in fmts}

    def stop(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


@dataclass
class StepPlan:
    """What one step needs: layers per side, which formats, whether a teacher is used."""

    student_layers: list[int]
    teacher_layers: list[int]
    fmts: list[str]
    needs_teacher: bool


def plan_step(loss_fn: DistillLoss, student_final: int, teacher_final: int, needs_teacher: bool,
              needs_aux: bool) -> StepPlan:
    s, t = loss_fn.required_layers()
    return StepPlan(resolve_layers(s, student_final), resolve_layers(t, teacher_final),
                    ["main", "aux"] if needs_aux else ["main"], needs_teacher)


def micro_batch_loss(student: PreTrainedModel, student_final: int, loss_fn: DistillLoss, batch: Batch,
                     teacher: TeacherSource | None, plan: StepPlan, num_tokens: float,
                     num_examples: float) -> LossOutput:
    """Forward passes of one micro-batch (student on each format; teacher through its source) and the loss."""
    fmts = [f for f in plan.fmts if f in batch.seqs["student"]]
    s_views = {f: response_view(student, batch.seqs["student"][f], plan.student_layers) for f in fmts}
    head = output_head(student)
    logits = head(s_views["main"].hidden[student_final]).float()  # (B, N_s, V_s)
    if teacher is not None and plan.needs_teacher:
        t_views = teacher.views(batch, fmts, plan.teacher_layers)
        t_head, t_embed, t_final = teacher.head, teacher.embed, teacher.final_layer
    else:
        t_views, t_head, t_embed, t_final = {}, nn.Identity(), nn.Identity(), 0
    inputs = LossInputs(
        student=s_views, teacher=t_views, student_logits=logits, student_final=student_final,
        teacher_final=t_final, student_head=head, teacher_head=t_head, student_embed=input_embed(student),
        teacher_embed=t_embed, num_tokens=num_tokens, num_examples=num_examples,
        extras={"student_head_weight": head.weight},
    )
    out = loss_fn(inputs)
    # every student forward stays in the graph, even one whose rows are all padding (an "aux" pass over
    # unpaired records): ZeRO-3 gathers weights in backward per module call, so the students' backward
    # passes must visit the same modules
    unused = sum((h.sum() for v in s_views.values() for h in v.hidden.values()), logits.new_zeros(()))
    return LossOutput(out.total + 0.0 * unused, out.parts)


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
        """"student" and "loss" weights (whole, valid on the first replica), optimizer, scheduler."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_trained_state(self.student, state["student"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@dataclass
class DataParallel:
    """This process's place among `size` data-parallel student replicas.

    Every replica derives every replica's micro-batches from the shared sampler, so the
    global token count needs no communication; only the logged loss parts are summed
    over `group`. Rank 0 logs, evaluates, saves and exports.
    """

    size: int = 1
    rank: int = 0
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where collectives' tensors live (the rank's GPU under nccl)."""

    def sum(self, parts: dict[str, float]) -> dict[str, float]:
        """Sum per-replica values over the replicas (keys may differ between replicas)."""
        if self.size == 1:
            return dict(parts)
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, dict(parts), group=self.group)
        out: dict[str, float] = defaultdict(float)
        for g in gathered:
            for k, v in g.items():
                out[k] += v
        return dict(out)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any replica (collective over the replicas)."""
        return flag if self.size == 1 else any_rank(flag, self.group, self.device)


def response_tokens(samples: list[Sample], idx: list[int]) -> int:
    """Student main-format response tokens of the given samples."""
    return sum(len(samples[i].seqs["student"]["main"].ids) - samples[i].seqs["student"]["main"].prompt_len
               for i in idx)


@dataclass
class TrainResult:
    steps: int
    best_dev: float | None
    export_dir: Path
    history: list[dict[str, float]]
    interrupted: bool = False
    """Stopped early on request (`should_stop`) after checkpointing; resume to go on."""


def train(
    *,
    run_dir: Path,
    student: PreTrainedModel,
    student_tok: PreTrainedTokenizerBase,
    loss_fn: DistillLoss,
    teacher: TeacherSource | None,
    samples: list[Sample],
    pad_ids: dict[str, int],
    cfg: TrainConfig,
    projector_lr: float,
    needs_aux: bool,
    seed: int,
    logger: MetricsLogger,
    log_cfg: LoggingConfig,
    dev: list[Example] | None = None,
    eval_cfg: EvalConfig | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    make_stepper: Callable[[int], Stepper] | None = None,
    data_parallel: DataParallel | None = None,
    device: torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `student` (and the loss's projectors) on `samples`; export the best/final model.

    history: one row per optimizer step with the step's loss parts summed over the global
    batch (for tests and reports). stop_after: return after this many steps without the
    final export (tests of resume). make_stepper(total_steps): the optimizer (default
    `PlainStepper`; the served runtime passes a DeepSpeed one). data_parallel: this
    process's replica among the students (default: the only one). device: where batches go.
    should_stop(): polled on every replica after each step but the last (at least one step
    per call of train() is made): when it returns True on any replica, every replica
    checkpoints, the teacher source is told, and train() returns with `interrupted` set
    (preemption; see `cot2align.preemption`).
    """
    from cot2align.models import num_layers

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    dp = data_parallel or DataParallel()
    main = dp.rank == 0
    sampler = GlobalBatchSampler(len(samples), cfg.micro_batch_size, cfg.grad_accum, dp.size, seed)
    total_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    student_final = num_layers(student)
    plan = plan_step(loss_fn, student_final, teacher.final_layer if teacher else 0, teacher is not None,
                     needs_aux)
    stepper = (make_stepper or (lambda n: PlainStepper(student, loss_fn, cfg, projector_lr, n)))(total_steps)
    step, best = 0, None
    history: list[dict[str, float]] = []
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        stepper.load_state_dict(state)  # weights too (may be collective)
        set_rng_state(state["rng"])
        step, best, history = state["step"], state["best"], state["history"]
        log.info("resumed from %s at step %d", ckpt, step)

    def save(at: int) -> None:
        trained = stepper.state_dict()  # on every replica: may be collective
        if main:
            save_checkpoint(run_dir, at, {
                **trained, "rng": rng_state(), "step": at, "best": best, "history": history, "sampler": {"step": at},
            })

    def export(name: str, full: FullWeights) -> Path:
        out = run_dir / name
        save_export(full.student, out)  # LoRA: merged, adapters in out/adapter
        student_tok.save_pretrained(out)
        torch.save(full.loss, out / "loss_modules.pt")
        return out

    autocast = torch.autocast(device.type if device else "cpu", dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bfloat16")
    student.train()
    loss_fn.train()
    if teacher is not None:
        teacher.start(step, total_steps, plan.teacher_layers if plan.needs_teacher else [], plan.fmts)
    running: dict[str, list[float]] = defaultdict(list)
    t_last, tokens_since = time.perf_counter(), 0
    first_step, source_last = step, teacher.metrics() if teacher is not None else {}
    progress = _progress(total_steps, step, log_cfg.progress and main)
    while step < total_steps:
        micro = sampler.micro_batches(step, dp_rank=dp.rank)
        every = [m for r in range(dp.size) for m in sampler.micro_batches(step, dp_rank=r)]  # global batch
        num_tokens = float(sum(response_tokens(samples, m) for m in every))
        num_examples = float(sum(len(m) for m in every))
        stepper.zero_grad()
        parts_sum: dict[str, float] = defaultdict(float)
        for idx in micro:
            batch = collate([samples[i] for i in idx], pad_ids, plan.fmts)
            batch = batch.to(device) if device is not None else batch
            with autocast:
                out = stepper.forward(partial(micro_batch_loss, student, student_final, loss_fn, batch, teacher,
                                              plan, num_tokens, num_examples))
            stepper.backward(out.total)
            parts_sum["loss"] += float(out.total.detach())
            for k, v in out.parts.items():
                parts_sum[k] += float(v)
        grad_norm = stepper.step()
        parts_sum = defaultdict(float, dp.sum(parts_sum))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {step} (loss parts {dict(parts_sum)})")
        step += 1
        tokens_since += int(num_tokens)
        row = {**parts_sum, "grad_norm": grad_norm, "lr": stepper.lr()}
        history.append({"step": step, **row})
        for key, value in row.items():
            running[key].append(value)
        progress.update(1)
        if step % log_cfg.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            source_now = dp.sum(teacher.metrics()) if teacher is not None else {}
            if main:
                metrics = {k: sum(v) / len(v) for k, v in running.items()}
                metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                metrics["epoch"] = sampler.epoch_of(step - 1)
                logger.log(step, metrics, prefix="train/")
                if source_now:
                    logger.log(step, _source_metrics(source_now, source_last, (now - t_last) * dp.size), "serve/")
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            running.clear()
            t_last, tokens_since, source_last = now, 0, source_now
        if main and log_cfg.heatmap_every:  # OT plans of this step's last micro-batch (report.ot_plan_hook)
            from cot2align.report import ot_plan_hook

            ot_plan_hook(loss_fn, step, log_cfg.heatmap_every, run_dir, logger)
        eval_due = step == total_steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
        full = stepper.full_weights() if eval_due else None  # every replica: may be collective
        if main and full is not None and dev is not None and eval_cfg is not None:
            subset = dev[: eval_cfg.dev_limit] if eval_cfg.dev_limit else dev
            res = evaluate_examples(full.student, student_tok, subset, eval_cfg.for_dev())  # type: ignore[arg-type]
            score = res.get("exact_match", res["rouge_l"])
            logger.log(step, {k: v for k, v in res.items() if isinstance(v, float)}, prefix="dev/")
            if best is None or score > best:
                best = score
                export("best", full)
            student.train()
        saved = (cfg.save_every and step % cfg.save_every == 0) or step == total_steps
        if saved:
            save(step)
        if should_stop is not None and first_step < step < total_steps and dp.any(should_stop()):
            if not saved:
                save(step)
            if teacher is not None:
                teacher.stop(step)
            progress.close()
            log.info("stopped at step %d of %d on request; the checkpoint resumes from here", step, total_steps)
            return TrainResult(step, best, run_dir, history, interrupted=True)
        if stop_after is not None and step >= stop_after:
            progress.close()
            return TrainResult(step, best, run_dir, history)
    progress.close()
    weights = stepper.full_weights()  # every replica (gathered at the last step already)
    if not main:
        return TrainResult(step, best, run_dir / "final", history)
    final = export("final", weights)
    return TrainResult(step, best, run_dir / "best" if best is not None else final, history)


def _source_metrics(now: dict[str, float], last: dict[str, float], seconds: float) -> dict[str, float]:
    """Serving statistics of an interval: each cumulative time as a fraction of the interval's
    wall time (summed over replicas, so `seconds` is the interval times the replica count)."""
    return {k.removesuffix("_s") + "_frac": (v - last.get(k, 0.0)) / max(seconds, 1e-9) for k, v in now.items()}


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True, leave=False)
