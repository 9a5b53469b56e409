"""OT transport-plan extraction, the heatmap hook of the training loop, and `cot2align report`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ot as pot
import pytest
import torch
from tiny import STUDENT, TEACHER
from torch import nn

from cot2align.callbacks import DevEvaluation, OTPlanHeatmaps
from cot2align.data.dataset import DataConfig, build_samples
from cot2align.data.jsonl import read_jsonl
from cot2align.evaluate import EvalConfig, evaluate_files
from cot2align.logging import LoggingConfig, MetricsLogger
from cot2align.losses import LossConfig, LossContext, build_loss
from cot2align.losses.base import LossInputs, ResponseView
from cot2align.losses.config import OTConfig, SinkhornConfig
from cot2align.losses.ot import CrossCoTOT, transport_plans
from cot2align.models import build_tiny_model, hidden_size, load_tokenizer
from cot2align.optim import TrainConfig
from cot2align.teacher.colocated import ColocatedTeacher
from cot2align.train import TrainJob, train

PNG = b"\x89PNG\r\n\x1a\n"


def _view(hidden: dict[int, torch.Tensor], lengths: list[int]) -> ResponseView:
    b, n = next(iter(hidden.values())).shape[:2]
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    ids = torch.arange(b * n).view(b, n) * mask
    return ResponseView(hidden=hidden, mask=mask, inputs=ids, targets=ids)


def _inputs(s_len: list[int], t_len: list[int], seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    b, ns, nt = len(s_len), max(s_len), max(t_len)
    s = _view({0: torch.randn(b, ns, 6, generator=g), 2: torch.randn(b, ns, 6, generator=g)}, s_len)
    t = _view({0: torch.randn(b, nt, 5, generator=g), 3: torch.randn(b, nt, 5, generator=g)}, t_len)
    return LossInputs(student={"main": s}, teacher={"main": t}, student_logits=torch.zeros(b, ns, 3),
                      student_final=2, teacher_final=3, student_head=nn.Identity(), teacher_head=nn.Identity(),
                      student_embed=nn.Identity(), teacher_embed=nn.Identity(), num_tokens=float(sum(s_len)),
                      num_examples=float(b))


def _module() -> CrossCoTOT:
    torch.manual_seed(0)
    cfg = OTConfig(cost="cosine", sinkhorn=SinkhornConfig(epsilon=0.2, iterations=2000))
    return CrossCoTOT(cfg, LossContext(6, 5, 10, 10, False))


def test_transport_plans_match_pot_and_the_loss() -> None:
    mod = _module()
    inputs = _inputs([4, 2], [6, 3])
    plans = transport_plans(mod, inputs, sample=0)
    assert set(plans) == {"main_main/layer0_0", "main_main/layer2_3"}
    for name, (ls, lt) in {"main_main/layer0_0": (0, 0), "main_main/layer2_3": (2, 3)}.items():
        p = plans[name].double()
        assert p.shape == (4, 6)
        assert torch.allclose(p.sum(1), torch.full((4,), 1 / 4, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(p.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-5)
        # independent reference: cosine cost by hand, POT's Sinkhorn
        x = inputs.student["main"].hidden[ls][0, :4].double()
        y = mod.projector(inputs.teacher["main"].hidden[lt][0, :6]).detach().double()
        c = 1 - (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).T
        ref = pot.sinkhorn(np.full(4, 1 / 4), np.full(6, 1 / 6), c.numpy(), 0.2, numItermax=5000, stopThr=1e-12)
        assert np.allclose(p.numpy(), ref, atol=1e-5)
    # the loss of a one-sample batch is normalizer * sum over layers of <P, C>
    one = _inputs([4], [6])
    one.student["main"].hidden = {k: v[:1] for k, v in inputs.student["main"].hidden.items()}
    one.teacher["main"].hidden = {k: v[:1] for k, v in inputs.teacher["main"].hidden.items()}
    _, parts = mod(one)
    again = transport_plans(mod, one)
    x = one.student["main"].hidden[0][0]
    y = mod.projector(one.teacher["main"].hidden[0][0]).detach()
    c = 1 - torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=-1)
    assert float(parts["layer0_0"]) == pytest.approx(0.25 * float((again["main_main/layer0_0"] * c).sum()), rel=1e-4)


def test_recorded_plans_equal_fresh_ones_and_cost_nothing_when_off() -> None:
    mod = _module()
    inputs = _inputs([3, 5], [4, 2], seed=1)
    mod(inputs)
    assert mod.recorded is None
    with pytest.raises(ValueError, match="record_plans"):
        transport_plans(mod)
    mod.record_plans = True
    mod(inputs)
    rec, fresh = transport_plans(mod), transport_plans(mod, inputs)
    assert set(rec) == set(fresh)
    assert all(torch.equal(rec[k], fresh[k]) for k in rec)
    assert mod.recorded is not None
    assert mod.recorded.token_ids["main_main/layer0_0"] == ([0, 1, 2], [0, 1, 2, 3])


@pytest.fixture(scope="module")
def run_dir(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step cot2align distillation with heatmap_every=2, dev evaluation and offline W&B."""
    out = tmp_path_factory.mktemp("run")
    s_tok, t_tok = load_tokenizer(tiny_task["tok_student"]), load_tokenizer(tiny_task["tok_teacher"])
    examples, _ = read_jsonl(tiny_task["train"])
    samples, _ = build_samples(examples[:16], s_tok, t_tok, DataConfig(max_length=128, max_prompt_length=40))
    student, teacher = build_tiny_model(STUDENT, s_tok, seed=1), build_tiny_model(TEACHER, t_tok, seed=2)
    ctx = LossContext(hidden_size(student), hidden_size(teacher), len(s_tok), len(t_tok), False, s_tok, t_tok)
    loss_fn = build_loss(LossConfig(name="cot2align"), ctx)
    log_cfg = LoggingConfig(wandb_mode="offline", log_every=1, progress=False, heatmap_every=2)
    logger = MetricsLogger(out, log_cfg, {}, name="t")
    dev, _ = read_jsonl(tiny_task["dev"])
    eval_cfg = EvalConfig(decoding="greedy", max_new_tokens=2, dev_decoding="greedy")
    try:
        job = TrainJob(run_dir=out, student=student, student_tok=s_tok, loss_fn=loss_fn, samples=samples,
                       pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id},
                       cfg=TrainConfig(lr=1e-2, max_steps=4, micro_batch_size=4, eval_every=2), seed=3,
                       teacher=ColocatedTeacher(teacher), needs_aux=True)
        train(job, logger=logger, log_cfg=log_cfg,
              callbacks=[OTPlanHeatmaps(2, out), DevEvaluation(dev[:3], eval_cfg, every=2)])
    finally:
        logger.close()
    return out


def test_training_saves_plans_and_logs_wandb_images(run_dir: Path) -> None:
    files = sorted(p.name for p in (run_dir / "ot_plans").glob("step_*.pt"))
    assert files == ["step_000002.pt", "step_000004.pt"]
    rec = torch.load(run_dir / "ot_plans" / "step_000004.pt", weights_only=False)
    assert rec["step"] == 4
    assert "main_main/layer0_0" in rec["plans"] and "main_main/layer2_2" in rec["plans"]
    for name, plan in rec["plans"].items():
        n, m = len(rec["student_tokens"][name]), len(rec["teacher_tokens"][name])
        assert plan.shape == (n, m) and n > 0 and m > 0
        assert torch.allclose(plan.sum(1), torch.full((n,), 1 / n), rtol=1e-4)
        assert all(isinstance(t, str) for t in rec["student_tokens"][name] + rec["teacher_tokens"][name])
    images = list(run_dir.glob("wandb/offline-run-*/files/media/images/ot_plan/main_main/layer0_0_*.png"))
    assert len(images) == 2 and all(p.read_bytes()[:8] == PNG for p in images)  # steps 2 and 4


def test_report_writes_plots_and_summary(run_dir: Path, tiny_task: dict[str, Path]) -> None:
    from cot2align.cli import main

    evaluate_files(run_dir / "final", [tiny_task["test"]], EvalConfig(seeds=[10, 20], max_new_tokens=2),
                   run_dir / "eval" / "final")
    with (run_dir / "metrics.jsonl").open("a") as f:  # teacher-side throughput, as the served runtime logs it
        f.write(json.dumps({"step": 4, "time": 0.0, "teacher/tokens_per_s": 1234.5}) + "\n")
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report"
    md = (out / "report.md").read_text()
    keys = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    parts = sorted(k for k in keys if k.startswith("train/") and k.split("/", 1)[1] not in
                   ("grad_norm", "lr", "epoch", "tokens_per_s"))
    assert {"train/loss", "train/ce", "train/ot", "train/ot/main_main"} <= set(parts)
    for key in parts:
        assert f"![{key}]" in md
        png = out / f"loss_{key.removeprefix('train/').replace('/', '_')}.png"
        assert png.read_bytes()[:8] == PNG
    for name in ("optimizer", "throughput", "dev"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    assert "teacher/tokens_per_s" in md and "| loss.name | cot2align |" not in md  # no config.yaml here
    assert "## Evaluation: eval/final" in md and "| test |" in md
    heatmaps = list((out / "ot_plans").glob("step_*.png"))
    assert heatmaps and all(f"ot_plans/{p.name}" in md for p in heatmaps)


def test_report_without_metrics_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cot2align.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path: Path) -> None:
    from cot2align.report import read_metrics

    rows = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0, "note": "x"},
            {"step": 1, "train/loss": 2.5, "train/lr": float("nan")}, {"step": 3, "dev/rouge_l": 10}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(path) == {"train/loss": [(1, 2.5), (2, 2.0)], "dev/rouge_l": [(3, 10.0)]}
    path.write_text("{broken\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1"):
        read_metrics(path)
