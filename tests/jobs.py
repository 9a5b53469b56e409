"""A tiny served job for launcher tests: a 2-layer Llama teacher checkpoint and a job config.

    teacher = tiny_teacher(tiny_task, tmp_path / "teacher")
    cfg = tiny_job_config(tiny_task, teacher, tmp_path / "runs", "name", train={"max_steps": 2})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiny import TEACHER


def tiny_teacher(tiny_task: dict[str, Path], out: Path) -> Path:
    """A random 2-layer Llama (GQA) saved as safetensors with the teacher tokenizer."""
    from cot2align.models import build_tiny_model, load_tokenizer

    tok = load_tokenizer(tiny_task["tok_teacher"])
    build_tiny_model(TEACHER, tok, seed=2).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_job_config(tiny_task: dict[str, Path], teacher: Path, out: Path, name: str,
                    **sections: dict[str, Any]) -> dict[str, Any]:
    """A served job (hf teacher rank + students) on the tiny task; `sections` update its sections."""
    cfg: dict[str, Any] = {
        "run": {"output_dir": str(out), "name": name, "work_dir": str(out / "work")},
        "data": {"train_file": str(tiny_task["train"]), "dev_file": str(tiny_task["dev"]),
                 "test_file": str(tiny_task["test"]), "max_length": 96, "max_prompt_length": 40},
        "cot": {"enabled": False},
        "teacher": {"path": str(teacher), "tokenizer": str(tiny_task["tok_teacher"])},
        "student": {"tokenizer": str(tiny_task["tok_student"])},
        "embedded": {"student_model": {"arch": "gpt2", "layers": 1, "hidden": 24, "heads": 2, "kv_heads": 2,
                                       "intermediate": 48}},
        "train": {"max_steps": 2, "micro_batch_size": 2},
        "eval": {"dev_limit": 2, "max_new_tokens": 4, "seeds": [1]},
        "logging": {"wandb_mode": "disabled", "progress": False},
        "runtime": {"timeout_s": 120, "startup_timeout_s": 300},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    return cfg
