"""The training loop: loss decreases; save -> resume gives the same next losses; export loads in transformers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from tiny import STUDENT, TEACHER
from transformers import AutoModelForCausalLM

from cot2align.callbacks import DevEvaluation
from cot2align.data.dataset import DataConfig, build_samples, collate
from cot2align.data.jsonl import read_jsonl
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.evaluate import EvalConfig
from cot2align.logging import LoggingConfig, MetricsLogger
from cot2align.losses import LossConfig, LossContext, build_loss
from cot2align.models import build_tiny_model, hidden_size, load_tokenizer, num_layers
from cot2align.optim import TrainConfig
from cot2align.teacher.colocated import ColocatedTeacher
from cot2align.train import (
    Callback,
    TrainJob,
    TrainResult,
    micro_batch_loss,
    plan_step,
    response_tokens,
    train,
)


def _job(tiny_task: dict[str, Path], run_dir: Path, loss_cfg: LossConfig, steps: int, resume: bool = True) -> TrainJob:
    """A colocated distillation job on the tiny task; deterministic: two calls build identical jobs."""
    s_tok, t_tok = load_tokenizer(tiny_task["tok_student"]), load_tokenizer(tiny_task["tok_teacher"])
    examples, _ = read_jsonl(tiny_task["train"])
    samples, _ = build_samples(examples[:32], s_tok, t_tok, DataConfig(max_length=128, max_prompt_length=40))
    student = build_tiny_model(STUDENT, s_tok, seed=1)
    teacher = build_tiny_model(TEACHER, t_tok, seed=2)
    ctx = LossContext(hidden_size(student), hidden_size(teacher), len(s_tok), len(t_tok), False, s_tok, t_tok)
    torch.manual_seed(0)  # the loss's projectors
    loss_fn = build_loss(loss_cfg, ctx)
    cfg = TrainConfig(lr=1e-2, max_steps=steps, micro_batch_size=4, grad_accum=2, min_lr=1e-4, save_every=2)
    return TrainJob(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn, samples=samples,
                    pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}, cfg=cfg, seed=3,
                    teacher=ColocatedTeacher(teacher), needs_aux=loss_cfg.name == "cot2align", resume=resume)


def _run(tiny_task: dict[str, Path], run_dir: Path, loss_cfg: LossConfig, steps: int,
         stop_after: int | None = None, resume: bool = True, job: TrainJob | None = None,
         callbacks: Sequence[Callback] = ()) -> TrainResult:
    job = job or _job(tiny_task, run_dir, loss_cfg, steps, resume)
    log_cfg = LoggingConfig(wandb_mode="disabled", log_every=1, progress=False)
    logger = MetricsLogger(run_dir, log_cfg, {}, name="t")
    try:
        return train(job, logger=logger, log_cfg=log_cfg, stop_after=stop_after, callbacks=callbacks)
    finally:
        logger.close()


def _first_batch_loss(job: TrainJob) -> float:
    """The loss of step 1's global batch, recomputed outside the loop (no gradient)."""
    sampler = GlobalBatchSampler(len(job.samples), job.cfg.micro_batch_size, job.cfg.grad_accum, 1, job.seed)
    micro = sampler.micro_batches(0, dp_rank=0)
    tokens = float(sum(response_tokens(job.samples, m) for m in micro))
    examples = float(sum(len(m) for m in micro))
    final = num_layers(job.student)
    assert job.teacher is not None
    plan = plan_step(job.loss_fn, final, job.teacher.final_layer, True, job.needs_aux)
    with torch.no_grad():
        return sum(float(micro_batch_loss(job.student, final, job.loss_fn, collate([job.samples[i] for i in m], job.pad_ids),
                                          job.teacher, plan, tokens, examples).total) for m in micro)


@pytest.mark.parametrize("name", ["sft", "cot2align"])
def test_loss_decreases_and_export_loads(tiny_task: dict[str, Path], tmp_path: Path, name: str) -> None:
    res = _run(tiny_task, tmp_path, LossConfig(name=name, base="none"), steps=16)  # CE (+ OT) only
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    if name == "cot2align":
        assert all(h["ot"] > 0 for h in res.history)
        assert {"ot/main_main", "ot/aux_main", "ot/main_aux"} <= set(res.history[0])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.model_type == "gpt2"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 16


def test_resume_reproduces_next_losses(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    cfg = LossConfig(name="cot2align")
    full = _run(tiny_task, tmp_path / "full", cfg, steps=6)
    _run(tiny_task, tmp_path / "cut", cfg, steps=6, stop_after=4)
    resumed = _run(tiny_task, tmp_path / "cut", cfg, steps=6)
    a = [h["loss"] for h in full.history]
    b = [h["loss"] for h in resumed.history]
    assert len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=0)
    # a run that does not resume starts over (and so cannot pass the check above by accident)
    fresh = _run(tiny_task, tmp_path / "cut", cfg, steps=6, resume=False)
    assert fresh.history[0]["step"] == 1


def test_patience_ends_the_run_at_the_best_dev_score(tiny_task: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Dev scores 10, 20, 15, 20 with patience 2: the run ends after the 4th evaluation (the 2nd
    not better than 20), exports the step-2 student as best, and a resume trains no further."""
    scores = iter([10.0, 20.0, 15.0, 20.0] + [99.0] * 20)
    monkeypatch.setattr("cot2align.callbacks.evaluate_examples",
                        lambda *a, **k: {"exact_match": next(scores), "rouge_l": 0.0})
    cfg = LossConfig(name="sft")

    def early(run_dir: Path) -> TrainResult:
        job = _job(tiny_task, run_dir, cfg, steps=10)
        job.cfg = dataclasses.replace(job.cfg, eval_every=1, patience=2)
        dev_eval = DevEvaluation([], EvalConfig(), every=1, patience=2)
        return _run(tiny_task, run_dir, cfg, steps=10, job=job, callbacks=[dev_eval])

    res = early(tmp_path / "early")
    assert (res.steps, res.early_stopped, res.best_dev) == (4, True, 20.0)
    assert len(res.history) == 4 and res.export_dir == tmp_path / "early" / "best"
    assert (tmp_path / "early" / "final").is_dir()
    # the best export is the student after step 2 of the same (10-step) schedule
    ref = _job(tiny_task, tmp_path / "ref", cfg, steps=10)
    _run(tiny_task, tmp_path / "ref", cfg, steps=10, job=ref, stop_after=2)
    best = AutoModelForCausalLM.from_pretrained(res.export_dir).state_dict()
    for name, value in ref.student.state_dict().items():
        torch.testing.assert_close(best[name], value, msg=lambda m, n=name: f"{n}: {m}")
    # resuming a run that ended early does not train on
    again = early(tmp_path / "early")
    assert (again.steps, again.early_stopped, len(again.history)) == (4, True, 4)


def test_patience_needs_dev_evaluations() -> None:
    with pytest.raises(ValueError, match=r"train\.patience.*eval_every"):
        TrainConfig(patience=3).check("train")


@pytest.mark.parametrize(
    "loss_cfg",
    [LossConfig(name="uld"), LossConfig(name="mined"), LossConfig(name="dskd"), LossConfig(name="multilevel_ot"),
     LossConfig(name="cot2align", base="dskd"), LossConfig(name="cot2align", base="uld")],
    ids=lambda c: f"{c.name}-{c.base}",
)
def test_every_loss_trains_from_config(tiny_task: dict[str, Path], tmp_path: Path, loss_cfg: LossConfig) -> None:
    """Each registered loss runs in the trainer on real different tokenizers: the loop's first loss is
    the loss of the sampler's first global batch (recomputed outside the loop), and three steps lower it."""
    before = _first_batch_loss(_job(tiny_task, tmp_path / "ref", loss_cfg, steps=3))
    job = _job(tiny_task, tmp_path / "run", loss_cfg, steps=3)
    res = _run(tiny_task, tmp_path / "run", loss_cfg, steps=3, job=job)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert _first_batch_loss(job) < before
    if loss_cfg.name != "multilevel_ot":
        assert res.history[0]["kd"] != 0.0
