"""LoRA teacher SFT: only adapters train, the merged export equals the peft model, resume is exact
(LoRA students: tests/test_lora_student.py)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import TEACHER
from transformers import AutoModelForCausalLM

from cot2align.configbase import ConfigError
from cot2align.data.dataset import DataConfig, build_samples, collate
from cot2align.data.jsonl import read_jsonl
from cot2align.logging import LoggingConfig, MetricsLogger
from cot2align.lora import ADAPTER_DIR, LLAMA_PROJECTIONS, LoraConfig, apply_lora, export_merged, require_peft
from cot2align.losses import LossConfig, LossContext, build_loss
from cot2align.models import build_tiny_model, hidden_size, load_tokenizer
from cot2align.optim import TrainConfig
from cot2align.train import TrainJob, train

# a fresh tiny model's output layer (std 0.02, d=32) caps its logits below ~1, so adapters on the
# projections alone could barely lower the loss of a random base: adapt the output layer too
LORA = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.1, target_modules=[*LLAMA_PROJECTIONS, "lm_head"])
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install -e '.[dev]' or 'cot2align[lora]')")


def _samples(tiny_task: dict[str, Path], tok: Any) -> list[Any]:
    examples, _ = read_jsonl(tiny_task["train"])
    data = DataConfig(pairing="separate", max_length=128, max_prompt_length=48)
    return build_samples(examples[:24], tok, tok, data)[0]


def _train_lora(tiny_task: dict[str, Path], run_dir: Path, steps: int, stop_after: int | None = None) -> tuple:
    """LoRA SFT of a fresh tiny Llama with the one training loop; returns (peft model, result, base state)."""
    tok = load_tokenizer(tiny_task["tok_teacher"])
    base = build_tiny_model(TEACHER, tok, seed=5)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LORA)
    d = hidden_size(base)
    sft = build_loss(LossConfig(name="sft"), LossContext(d, d, len(tok), len(tok), True))
    cfg = TrainConfig(lr=2e-2, max_steps=steps, micro_batch_size=4, grad_accum=2, min_lr=1e-4, save_every=2)
    log_cfg = LoggingConfig(wandb_mode="disabled", log_every=1, progress=False)
    logger = MetricsLogger(run_dir, log_cfg, {}, name="lora")
    try:
        job = TrainJob(run_dir=run_dir, student=model, student_tok=tok, loss_fn=sft, samples=_samples(tiny_task, tok),
                       pad_ids={"student": tok.pad_token_id, "teacher": tok.pad_token_id}, cfg=cfg, seed=3)
        res = train(job, logger=logger, log_cfg=log_cfg, stop_after=stop_after)
    finally:
        logger.close()
    return model, res, before


@pytest.fixture(scope="module")
def lora_run(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _train_lora(tiny_task, tmp_path_factory.mktemp("lora"), steps=12)


def _logits(model: Any, tiny_task: dict[str, Path]) -> torch.Tensor:
    tok = load_tokenizer(tiny_task["tok_teacher"])
    batch = collate(_samples(tiny_task, tok)[:4], {"student": tok.pad_token_id, "teacher": tok.pad_token_id})
    seq = batch.seqs["student"]["main"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits  # (B, T, V)


@needs_peft
def test_only_adapters_train_and_loss_decreases(lora_run: tuple) -> None:
    model, res, before = lora_run
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every targeted projection of both layers got an adapter pair
    assert len(trainable) == 2 * (len(LLAMA_PROJECTIONS) * TEACHER.layers + 1)  # A and B of each adapted layer
    # peft moves a wrapped layer's weight to <layer>.base_layer.weight
    base_now = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()
                if "lora_" not in k}
    assert base_now.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], base_now[k])] == []  # bit-for-bit, before the merge
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@needs_peft
def test_merged_export_equals_peft_model(lora_run: tuple, tiny_task: dict[str, Path], tmp_path: Path) -> None:
    model, res, _ = lora_run
    peft_logits = _logits(model, tiny_task)
    out = export_merged(copy.deepcopy(model), load_tokenizer(tiny_task["tok_teacher"]), tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()  # a plain checkpoint: transformers loads it without peft
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged.state_dict())
    diff = (_logits(merged, tiny_task) - peft_logits).abs().max()
    assert diff <= 1e-5, diff
    base = build_tiny_model(TEACHER, load_tokenizer(tiny_task["tok_teacher"]), seed=5)
    assert (_logits(base, tiny_task) - peft_logits).abs().max() > 1e-3  # the adapters did change the model
    # the loop's exports are merged checkpoints equal to the peft model, with the adapter folder beside them
    assert (res.export_dir / ADAPTER_DIR / "adapter_config.json").is_file()
    assert not (res.export_dir / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(res.export_dir)
    assert (_logits(exported, tiny_task) - _logits(model, tiny_task)).abs().max() <= 1e-5


@needs_peft
def test_resume_reproduces_lora_losses(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    full_model, full, _ = _train_lora(tiny_task, tmp_path / "full", steps=6)
    cut_model, _, _ = _train_lora(tiny_task, tmp_path / "cut", steps=6, stop_after=4)
    from cot2align.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None
    saved = load_checkpoint(ckpt)["student"]  # the adapters only, not a copy of the frozen base model
    trainable = {n for n, p in cut_model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and all("lora_" in k or "lm_head" in k for k in saved)
    resumed_model, resumed, _ = _train_lora(tiny_task, tmp_path / "cut", steps=6)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed.history]),
                               torch.tensor([h["loss"] for h in full.history]), rtol=1e-6, atol=0)
    adapters = {k: v for k, v in full_model.state_dict().items() if "lora_" in k}
    for k, v in resumed_model.state_dict().items():
        if "lora_" in k:
            torch.testing.assert_close(v, adapters[k], rtol=1e-6, atol=1e-7)


@needs_peft
def test_train_teacher_stage_with_lora(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from cot2align.config import Config
    from cot2align.recipes.prepare import paths, train_teacher

    cfg = Config().with_overrides([
        f"run.work_dir={tmp_path / 'work'}", f"data.train_file={tiny_task['train']}",
        f"data.dev_file={tiny_task['dev']}", f"data.test_file={tiny_task['test']}",
        f"teacher.tokenizer={tiny_task['tok_teacher']}", f"student.tokenizer={tiny_task['tok_student']}",
        "embedded.teacher_model.layers=1", "embedded.teacher_model.hidden=32", "embedded.teacher_model.heads=2",
        "embedded.teacher_model.kv_heads=1", "embedded.teacher_model.intermediate=64",
        "teacher_train.max_steps=3", "teacher_train.micro_batch_size=8", "eval.dev_limit=2",
        "eval.max_new_tokens=4", "logging.wandb_mode=disabled", "logging.progress=false",
        "teacher_train_lora.enabled=true", "teacher_train_lora.r=2", "teacher_train_lora.target_modules=[q_proj,v_proj]"])
    cfg.validate()
    out = train_teacher(cfg)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    run_dir = out.parent / (out.name + ".run")
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "best" / ADAPTER_DIR / "adapter_config.json").is_file()
    # only the targeted projections moved away from the fresh model
    fresh = build_tiny_model(cfg.embedded.teacher_model, load_tokenizer(tiny_task["tok_teacher"]), seed=cfg.run.seed)
    moved = {k.split(".")[-2] for k, v in merged.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert moved == {"q_proj", "v_proj"}
    # LoRA settings are part of the cache key: full fine-tuning would not reuse this teacher
    assert train_teacher(cfg) == out
    assert out != paths(cfg.merged({"teacher_train_lora": {"enabled": False}})).teacher_model


def test_lora_config_errors_name_the_key(monkeypatch: pytest.MonkeyPatch, tiny_task: dict[str, Path]) -> None:
    from cot2align.config import Config

    with pytest.raises(ConfigError, match=r"teacher_train_lora\.r: must be >= 1"):
        Config().with_overrides(["teacher_train_lora.r=0"]).validate()
    with pytest.raises(ConfigError, match=r"teacher_train_lora\.dropout"):
        Config().with_overrides(["teacher_train_lora.dropout=1.5"]).validate()
    with pytest.raises(ConfigError, match=r"teacher\.init"):
        Config().with_overrides(["teacher.path=a", "teacher.init=b"]).validate()
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"pip install 'cot2align\[lora\]'"):
        require_peft()


@needs_peft
def test_unknown_target_module_is_a_config_error(tiny_task: dict[str, Path]) -> None:
    model = build_tiny_model(TEACHER, load_tokenizer(tiny_task["tok_teacher"]), seed=0)
    with pytest.raises(ConfigError, match=r"teacher_train_lora\.target_modules: \['c_attn'\].*q_proj"):
        apply_lora(model, LoraConfig(enabled=True, target_modules=["q_proj", "c_attn"]))
