"""LoRA for teacher SFT (`teacher_train_lora.*`) and for students (`student_lora.*`), with peft as
an optional dependency.

`train-teacher` and `distill` wrap the model with `apply_lora` before handing it to the one
training loop (`cot2align.train.train`, colocated or under DeepSpeed on the served students):
only the adapter matrices require grad, so the loop's optimizer, checkpoints and resume cover
them without knowing about LoRA. The loop exports a peft model with `save_export`: a plain HF
checkpoint with the adapters merged (what evaluation loads, no peft needed) and the adapter
folder beside it in `adapter/`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from cot2align.configbase import ConfigBase, ConfigError, require

#: attention and MLP projections of Llama-family models (Llama, Qwen2, Mistral, SmolLM2, ...)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: attention and MLP projections of GPT-2 (transformers' Conv1D layers)
GPT2_PROJECTIONS = ["c_attn", "c_proj", "c_fc"]
#: sub-folder of an export that holds the adapters of a LoRA model
ADAPTER_DIR = "adapter"


@dataclass
class LoraConfig(ConfigBase):
    """LoRA adapters (`teacher_train_lora.*`, `student_lora.*`; needs `pip install 'cot2align[lora]'`)."""

    enabled: bool = False
    """Train low-rank adapters on a frozen teacher instead of every weight."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scale: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    """Names (last component) of the linear layers (nn.Linear, GPT-2's Conv1D) that get adapters; each
    must exist in the model."""

    def check(self, prefix: str) -> None:
        require(self.r >= 1, f"{prefix}.r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, f"{prefix}.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")
        require(len(self.target_modules) >= 1, f"{prefix}.target_modules", "needs at least one module name")
        require(all(m.strip() for m in self.target_modules), f"{prefix}.target_modules",
                f"empty module name in {self.target_modules}")


def require_peft(key: str = "teacher_train_lora.enabled") -> ModuleType:
    """Import peft, or raise ImportError saying how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"{key}=true needs the peft package: pip install 'cot2align[lora]' ({e})") from None
    return peft


def linear_names(model: nn.Module) -> list[str]:
    """Sorted distinct last-component names of the model's linear layers, nn.Linear and transformers'
    Conv1D (GPT-2): what target_modules can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, key: str = "teacher_train_lora") -> Any:
    """Wrap `model` in a peft model with LoRA adapters on `cfg.target_modules`; base weights frozen.

    Returns the peft model (a PeftModelForCausalLM, an nn.Module whose forward/generate take the base
    model's arguments). The adapters start as a no-op (B = 0), so its outputs equal the base model's.
    Raises ConfigError naming `key.target_modules` when a name matches no linear layer of the model.
    """
    peft = require_peft(f"{key}.enabled")
    have = linear_names(model)
    missing = [m for m in cfg.target_modules if m not in have]
    if missing:
        raise ConfigError(f"{key}.target_modules: {missing} match no linear layer of this "
                          f"{type(model).__name__}; its linear layers are {have}")
    lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lcfg)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged_model(peft_model: Any, adapter_dir: Path | None = None) -> PreTrainedModel:
    """The base model with the adapters folded into its weights (W + alpha/r * B @ A); a plain HF model.

    adapter_dir: a folder saved by the peft model's `save_pretrained` (e.g. the loop's `best` export)
    whose adapter weights are loaded first; None merges the adapters as they are. `peft_model` is
    consumed: its base model's weights are modified in place.
    """
    peft = require_peft()
    if adapter_dir is not None:
        from safetensors.torch import load_file

        weights = Path(adapter_dir) / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{adapter_dir} holds no LoRA adapter (adapter_model.safetensors)")
        result = peft.set_peft_model_state_dict(peft_model, load_file(str(weights)))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"{weights}: adapter weights do not fit this model ({unexpected[:3]} ...)")
    merged: PreTrainedModel = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def export_merged(peft_model: Any, tok: PreTrainedTokenizerBase, out: Path, adapter_dir: Path | None = None) -> Path:
    """Merge (see `merged_model`) and save a safetensors HF checkpoint + tokenizer to `out`."""
    merged = merged_model(peft_model, adapter_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def is_peft_model(model: object) -> bool:
    """Whether `model` is a peft wrapper (has adapters to merge)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def base_model(model: Any) -> PreTrainedModel:
    """The HF model under a peft wrapper (itself for a plain model)."""
    return model.get_base_model() if is_peft_model(model) else model  # type: ignore[no-any-return]


def save_export(model: Any, out: Path) -> Path:
    """Save a model the way the training loop exports it: a plain HF safetensors checkpoint in `out`.

    A peft model is saved merged (a copy: `model` keeps training) with its adapters in
    `out/adapter` (peft's adapter folder, for `merged_model(adapter_dir=...)`).
    """
    if not is_peft_model(model):
        model.save_pretrained(out, safe_serialization=True)
        return out
    model.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    merged.save_pretrained(out, safe_serialization=True)
    return out
