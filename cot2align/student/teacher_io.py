"""The small part of the teacher a student holds: its output layer and input embedding.

Teachers never send logits; a loss that needs them (KD terms of DSKD / ULD / MinED)
computes them on the student from the served final hidden state with a frozen copy of
the teacher's output layer. Only those two tensors are read from the teacher's HF
checkpoint (safetensors, sharded or not): the skeleton is built on the meta device, so
a 70B teacher costs a student its embedding matrices, not 140 GB.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from cot2align.models import frozen


@dataclass
class TeacherIO:
    """Frozen teacher output layer (hidden [..., d] -> logits [..., V]) and input embedding
    (ids [...] -> [..., d]), plus the teacher's sizes (L = final-norm layer index, d)."""

    head: nn.Module
    embed: nn.Module
    num_layers: int
    hidden_size: int


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of an HF checkpoint folder."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors(.index.json): the served runtime reads the "
                                "teacher's output layer from safetensors (save the teacher with "
                                "safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _read(files: dict[str, Path], name: str) -> Tensor | None:
    """Read tensor `name`, also under a checkpoint prefix that differs from the module path."""
    from safetensors import safe_open

    key = name if name in files else next((k for k in files if k.endswith("." + name) or name.endswith("." + k)),
                                          None)
    if key is None:
        return None
    with safe_open(str(files[key]), framework="pt") as f:
        return f.get_tensor(key)


def _materialize(module: nn.Module, prefix: str, files: dict[str, Path], fallback: dict[str, Tensor],
                 config: object, dtype: torch.dtype) -> nn.Module:
    """Allocate a meta-device module on CPU and fill it from the checkpoint."""
    module = module.to_empty(device="cpu")
    for pname, p in module.named_parameters():
        t = _read(files, f"{prefix}.{pname}") if prefix else _read(files, pname)
        if t is None:
            t = fallback.get(pname)
        if t is None:
            raise KeyError(f"teacher checkpoint has no tensor {prefix}.{pname}")
        p.data = t.to(dtype)
    for bname, b in module.named_buffers():
        if bname == "embed_scale":  # Gemma-style scaled embeddings: sqrt(hidden size)
            b.data = torch.tensor(math.sqrt(int(getattr(config, "hidden_size", 0))), dtype=b.dtype)
        else:
            raise NotImplementedError(f"cannot rebuild buffer {prefix}.{bname} of {type(module).__name__} "
                                      "without loading the whole teacher")
    return frozen(module)


def load_teacher_io(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> TeacherIO:
    """Read the teacher's output layer and input embedding from its HF checkpoint folder."""
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in skeleton.named_modules()}
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    if head is None:
        raise ValueError(f"{type(skeleton).__name__} has no output layer")
    files = _checkpoint_files(path)
    embed_m = _materialize(embed, names[id(embed)], files, {}, text_cfg, dtype)
    tied = {"weight": dict(embed_m.named_parameters())["weight"].data} if getattr(text_cfg, "tie_word_embeddings", False) else {}
    head_m = _materialize(head, names[id(head)], files, tied, text_cfg, dtype)
    layers = int(getattr(text_cfg, "num_hidden_layers", None) or text_cfg.n_layer)
    hidden = int(getattr(text_cfg, "hidden_size", None) or text_cfg.n_embd)
    return TeacherIO(head=head_m.to(device), embed=embed_m.to(device), num_layers=layers, hidden_size=hidden)
