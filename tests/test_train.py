"""The training loop: loss decreases; save -> resume gives the same next losses; export loads in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cot2align.data.dataset import DataConfig, build_samples
from cot2align.data.jsonl import read_jsonl
from cot2align.logging import LoggingConfig, MetricsLogger
from cot2align.losses import LossConfig, LossContext, build_loss
from cot2align.models import TinyModelConfig, build_tiny_model, hidden_size, load_tokenizer
from cot2align.train import ColocatedTeacher, TrainConfig, train

TEACHER = TinyModelConfig(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
STUDENT = TinyModelConfig(arch="gpt2", layers=2, hidden=24, heads=2, kv_heads=2, intermediate=48)


def _run(tiny_task: dict[str, Path], run_dir: Path, loss_cfg: LossConfig, steps: int,
         stop_after: int | None = None, resume: bool = True):
    s_tok, t_tok = load_tokenizer(tiny_task["tok_student"]), load_tokenizer(tiny_task["tok_teacher"])
    examples, _ = read_jsonl(tiny_task["train"])
    samples, _ = build_samples(examples[:32], s_tok, t_tok, DataConfig(max_length=128, max_prompt_length=40))
    student = build_tiny_model(STUDENT, s_tok, seed=1)
    teacher = build_tiny_model(TEACHER, t_tok, seed=2)
    ctx = LossContext(hidden_size(student), hidden_size(teacher), len(s_tok), len(t_tok), False, s_tok, t_tok)
    loss_fn = build_loss(loss_cfg, ctx)
    cfg = TrainConfig(lr=1e-2, max_steps=steps, micro_batch_size=4, grad_accum=2, min_lr=1e-4, save_every=2)
    log_cfg = LoggingConfig(wandb_mode="disabled", log_every=1, progress=False)
    logger = MetricsLogger(run_dir, log_cfg, {}, name="t")
    try:
        return train(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn,
                     teacher=ColocatedTeacher(teacher), samples=samples,
                     pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}, cfg=cfg,
                     projector_lr=1e-3, needs_aux=loss_cfg.name == "cot2align", seed=3, logger=logger,
                     log_cfg=log_cfg, resume=resume, stop_after=stop_after)
    finally:
        logger.close()


@pytest.mark.parametrize("name", ["sft", "cot2align"])
def test_loss_decreases_and_export_loads(tiny_task: dict[str, Path], tmp_path: Path, name: str) -> None:
    res = _run(tiny_task, tmp_path, LossConfig(name=name), steps=16)
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


@pytest.mark.parametrize(
    "loss_cfg",
    [LossConfig(name="uld"), LossConfig(name="mined"), LossConfig(name="dskd"), LossConfig(name="multilevel_ot"),
     LossConfig(name="cot2align", base="dskd"), LossConfig(name="cot2align", base="uld")],
    ids=lambda c: f"{c.name}-{c.base}",
)
def test_every_loss_trains_from_config(tiny_task: dict[str, Path], tmp_path: Path, loss_cfg: LossConfig) -> None:
    """Each registered loss runs in the trainer on real different tokenizers and produces finite, moving losses."""
    res = _run(tiny_task, tmp_path, loss_cfg, steps=3)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] != losses[-1]
    if loss_cfg.name != "multilevel_ot":
        assert res.history[0]["kd"] != 0.0
