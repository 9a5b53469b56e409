"""What the training loop does between steps beyond logging and checkpointing (`train.Callback`).

* `DevEvaluation`: dev scores every N steps and at the end; exports the best student; early stopping.
* `OTPlanHeatmaps`: saves (and plots) the Cross-CoT OT plans every N steps.
* `StopOnRequest`: stops every replica at a step boundary when one was asked to (preemption).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cot2align.data.jsonl import Example
from cot2align.evaluate import EvalConfig, evaluate_examples
from cot2align.report import ot_plan_hook
from cot2align.train import Loop


class DevEvaluation:
    """Evaluate on `dev` every `every` steps (0: only at the end) and export the best student as
    `<run_dir>/best`; with `patience` > 0, end the run (`Loop.finish`) once that many evaluations
    in a row were not better than the best. On every replica (gathering whole weights is collective
    under ZeRO-3, and all replicas must end together); only the first evaluates, so the others may
    pass dev=None."""

    def __init__(self, dev: list[Example] | None, cfg: EvalConfig, every: int, patience: int = 0) -> None:
        self.dev = (dev[: cfg.dev_limit] if cfg.dev_limit else dev) if dev is not None else None
        self.cfg = cfg.for_dev()
        self.every = every
        self.patience = patience

    def after_step(self, loop: Loop) -> None:
        if not (loop.step == loop.total_steps or (self.every and loop.step % self.every == 0)):
            return
        full = loop.full_weights()
        if loop.main and self.dev is not None:
            res = evaluate_examples(full.student, loop.job.student_tok, self.dev, self.cfg)  # type: ignore[arg-type]
            score = res.get("exact_match", res["rouge_l"])
            loop.logger.log(loop.step, {k: v for k, v in res.items() if isinstance(v, float)}, prefix="dev/")
            if loop.best is None or score > loop.best:
                loop.best, loop.since_best = score, 0
                loop.export("best", full)
            else:
                loop.since_best += 1
            loop.job.student.train()
        if self.patience:
            loop.finish = loop.job.data_parallel.any(loop.since_best >= self.patience)


class OTPlanHeatmaps:
    """Every `every` steps, save the OT plans of the step's last micro-batch under
    `<run_dir>/ot_plans/` and log their heatmaps (first replica only)."""

    def __init__(self, every: int, run_dir: Path) -> None:
        self.every, self.run_dir = every, run_dir

    def after_step(self, loop: Loop) -> None:
        if loop.main:
            ot_plan_hook(loop.job.loss_fn, loop.step, self.every, self.run_dir, loop.logger)


class StopOnRequest:
    """Stop at this step boundary when `requested()` is true on any replica (preemption: see
    `cot2align.preemption`). Never on the first step of a (resumed) run nor on the last."""

    def __init__(self, requested: Callable[[], bool]) -> None:
        self.requested = requested

    def after_step(self, loop: Loop) -> None:
        if loop.first_step < loop.step < loop.total_steps and loop.job.data_parallel.any(self.requested()):
            loop.stop = True
