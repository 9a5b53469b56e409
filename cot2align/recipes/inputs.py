"""Everything a distillation reads, made once: data, tokenizers, the teacher, its rationales."""

from __future__ import annotations

import dataclasses

from cot2align.config import Config
from cot2align.recipes.cot import generate_cot, output_path
from cot2align.recipes.prepare import Paths, paths, train_teacher


def uses_rationales(cfg: Config) -> bool:
    """Distillation trains on teacher rationales (`cot.enabled` and `data.use_cot`)."""
    return cfg.cot.enabled and cfg.data.use_cot


def input_paths(cfg: Config) -> Paths:
    """Where distillation reads its inputs (made by `ensure_inputs`): `train` is the rationale file
    when rationales are used."""
    p = paths(cfg)
    return dataclasses.replace(p, train=output_path(cfg)) if uses_rationales(cfg) else p


def ensure_inputs(cfg: Config) -> Paths:
    """Prepare the data and tokenizers, train (or check) the teacher and generate its rationales
    when they are used; each step reuses what earlier runs cached. Returns `input_paths(cfg)`."""
    train_teacher(cfg)  # prepares the data first
    if uses_rationales(cfg):
        generate_cot(cfg)
    return input_paths(cfg)
