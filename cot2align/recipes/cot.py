"""The generate-cot stage: the teacher writes a rationale for every training example.

The generation itself (prompting, the answer-consistency filter, resumable sharded output)
is `cot2align.cot.generate`; this recipe resolves what it reads and writes from the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

from cot2align.config import Config
from cot2align.configbase import ConfigError
from cot2align.cot.generate import LazyTeacher, generate_rationales, merge_shards, shard_path
from cot2align.data.jsonl import Example
from cot2align.data.prompts import generation_tokenizer
from cot2align.evaluate import prompt_ids
from cot2align.models import load_tokenizer
from cot2align.recipes.prepare import load_split, paths, train_teacher


def output_path(cfg: Config) -> Path:
    """`cot.output`, else <run.work_dir>/cot-<digest of the teacher, train data and sampling settings>.jsonl."""
    if cfg.cot.output:
        return Path(cfg.cot.output)
    p = paths(cfg)
    sampling = {k: v for k, v in cfg.cot.to_dict().items() if k not in ("enabled", "output", "batch_size", "backend")}
    if sampling.get("chat_template") == "auto":  # the default: keeps the names of outputs made before the key
        del sampling["chat_template"]
    blob = json.dumps({"teacher": str(p.teacher_model), "train": str(p.train), "cot": sampling,
                       "seed": cfg.run.seed}, sort_keys=True)
    return Path(cfg.run.work_dir) / f"cot-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"


def read_source(cfg: Config) -> list[Example]:
    """The train split WITHOUT its gold rationales (the teacher's replace them)."""
    examples = load_split(paths(cfg).train, cfg.data)
    return [dataclasses.replace(ex, rationale=None) for ex in examples]


def generate_cot(cfg: Config, rank: int = 0, world_size: int = 1) -> Path:
    """Teacher rationales for the train split; returns the written JSONL.

    Trains the embedded teacher first when it is missing. With world_size > 1 this rank writes
    its shard (`shard_path`) and returns it; `merge_cot_shards` joins the shards afterwards.
    """
    if cfg.cot.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("cot.backend=vllm: vLLM is not installed (pip install vllm, on a GPU machine); "
                          "use cot.backend=hf")
    teacher = train_teacher(cfg)
    out = output_path(cfg)
    target = out if world_size == 1 else shard_path(out, rank, world_size)
    tok = load_tokenizer(paths(cfg).teacher_tokenizer)
    gen_tok = generation_tokenizer(tok, cfg.cot.chat_template)
    stats = generate_rationales(read_source(cfg), LazyTeacher(teacher, cfg.teacher.dtype, tok, cfg.cot),
                                cfg.cot, target, rank=rank, world_size=world_size, seed=cfg.run.seed,
                                sort_key=lambda s: len(prompt_ids(gen_tok, s)))
    print(stats.summary())
    return target


def merge_cot_shards(cfg: Config, world_size: int) -> Path:
    """Join the `world_size` shard files of `generate_cot` into its output path (run once, after all ranks)."""
    out = output_path(cfg)
    stats = merge_shards(read_source(cfg), [shard_path(out, r, world_size) for r in range(world_size)], out)
    print(stats.summary())
    return out
