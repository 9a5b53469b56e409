"""LoRA students (`student_lora.*`): only adapters train, colocated and served under every ZeRO stage
give the same losses, resume is exact, and the exports are plain HF checkpoints with the adapters merged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import STUDENT
from transformers import AutoModelForCausalLM

from cot2align.checkpoint import latest_checkpoint, load_checkpoint
from cot2align.config import Config
from cot2align.lora import ADAPTER_DIR, GPT2_PROJECTIONS, LoraConfig, apply_lora, merged_model
from cot2align.models import load_tokenizer
from cot2align.recipes.build import student_model
from cot2align.recipes.pipeline import distill
from cot2align.train import TrainResult

LORA = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(GPT2_PROJECTIONS)}
STEPS = 5
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


def _cfg(tiny_task: dict[str, Path], teacher_dir: Path, out: Path, mode: str, overrides: list[str] | None = None,
         dp: int = 2, base: str = "dskd") -> Config:
    """cot2align with a LoRA GPT-2 student; colocated runs dp micro-batches per step in one process."""
    cfg = Config().merged({
        "run": {"output_dir": str(out), "name": f"{mode}-lora-{base}", "seed": 3, "work_dir": str(out / "work"),
                "resume": False},
        "data": {"train_file": str(tiny_task["train"]), "dev_file": str(tiny_task["dev"]),
                 "test_file": str(tiny_task["test"]), "max_length": 128, "max_prompt_length": 40},
        "cot": {"enabled": False},
        "teacher": {"path": str(teacher_dir), "tokenizer": str(tiny_task["tok_teacher"])},
        "student": {"tokenizer": str(tiny_task["tok_student"]), "parallel": {"dp": dp}},
        "student_lora": LORA,
        "embedded": {"student_model": STUDENT.to_dict()},
        "loss": {"name": "cot2align", "base": base},
        "train": {"lr": 1e-2, "min_lr": 1e-4, "max_steps": STEPS, "micro_batch_size": 4, "save_every": 2,
                  "grad_accum": dp if mode == "colocated" else 1},
        "eval": {"dev_limit": 2, "max_new_tokens": 4, "seeds": [1]},
        "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
        "runtime": {"mode": mode, "timeout_s": 90},
    }).with_overrides(overrides or [])
    cfg.validate()
    return cfg


_COLOCATED: dict[str, tuple[Config, TrainResult]] = {}


def _colocated(tiny_task: dict[str, Path], teacher_dir: Path, out: Path, base: str = "dskd") -> tuple[Config, TrainResult]:
    """The colocated reference run of a KD base (cached: the served cases compare with it)."""
    if base not in _COLOCATED:
        cfg = _cfg(tiny_task, teacher_dir, out, "colocated", base=base)
        _COLOCATED[base] = (cfg, distill(cfg))
    return _COLOCATED[base]


def _losses(res: TrainResult) -> torch.Tensor:
    return torch.tensor([h["loss"] for h in res.history])


def _check_export(cfg: Config, tiny_task: dict[str, Path]) -> dict[str, torch.Tensor]:
    """final/ is a plain HF checkpoint = the fresh base with final/adapter merged in; only the targeted
    projections moved. Returns its weights."""
    final = cfg.run_dir / "final"
    assert not (final / "adapter_config.json").exists() and (final / ADAPTER_DIR / "adapter_config.json").is_file()
    exported = load_file(final / "model.safetensors")
    assert exported and not any("lora" in k for k in exported)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "GPT2LMHeadModel"
    fresh = student_model(cfg.merged({"student_lora": {"enabled": False}}), load_tokenizer(tiny_task["tok_student"]))
    again = merged_model(apply_lora(fresh, LoraConfig(**LORA), "student_lora"), final / ADAPTER_DIR)
    want = again.state_dict()
    base = student_model(cfg.merged({"student_lora": {"enabled": False}}), load_tokenizer(tiny_task["tok_student"]))
    moved = set()
    for k, v in exported.items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7, msg=k)
        if not torch.equal(v, base.state_dict()[k]):
            moved.add(k.split(".")[-2])
    assert moved == set(GPT2_PROJECTIONS)  # the embeddings, norms and head stay the base's
    return exported


def _resume_from_step_4(cfg: Config, res: TrainResult) -> None:
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None
    saved = load_checkpoint(ckpt)["student"]
    assert saved and all("lora_" in k for k in saved)  # the adapters, not a copy of the frozen base
    (cfg.run_dir / "checkpoints" / "latest").write_text("step_00000004")  # kept: steps 4 and 5
    resumed = distill(cfg.with_overrides(["run.resume=true"]))
    assert [h["step"] for h in resumed.history] == list(range(1, STEPS + 1))
    torch.testing.assert_close(_losses(resumed)[-1], _losses(res)[-1], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_colocated_lora_student_trains_adapters_resumes_and_exports_merged(
        tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path) -> None:
    cfg, res = _colocated(tiny_task, teacher_dir, tmp_path)
    student = student_model(cfg, load_tokenizer(tiny_task["tok_student"]))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(res.history) == STEPS and bool(torch.isfinite(_losses(res)).all())
    _check_export(cfg, tiny_task)
    _resume_from_step_4(cfg, res)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_served_lora_student_matches_colocated_resumes_and_exports(
        tiny_task: dict[str, Path], teacher_dir: Path, tmp_path: Path, zero_stage: int) -> None:
    """1 HF teacher rank + 2 DeepSpeed LoRA students (ZeRO-3: every weight partitioned) == one colocated
    process step by step; the merged export == the colocated one; resuming from step 4 reproduces step 5.
    KD base dskd, except under ZeRO-3, which does not support it (OT only there)."""
    base = "none" if zero_stage == 3 else "dskd"
    ref_cfg, ref = _colocated(tiny_task, teacher_dir, tmp_path / "ref", base)
    cfg = _cfg(tiny_task, teacher_dir, tmp_path, "served",
               [f"runtime.zero_stage={zero_stage}", "runtime.zero3_persist_below=0"], base=base)
    res = distill(cfg)
    torch.testing.assert_close(_losses(res), _losses(ref), rtol=1e-4, atol=0)
    exported = _check_export(cfg, tiny_task)
    colocated = load_file(ref_cfg.run_dir / "final" / "model.safetensors")
    for k, v in exported.items():
        torch.testing.assert_close(v, colocated[k], rtol=1e-3, atol=1e-4, msg=k)
    _resume_from_step_4(cfg, res)
