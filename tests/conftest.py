"""Shared fixtures: a small generated task and two DIFFERENT tokenizers trained on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import submitit  # noqa: F401  # see below
from jobs import tiny_teacher

# submitit configures logging when first imported (logging.config.dictConfig), which closes every
# logging handler that exists by then. absl's handler (imported with rouge-score) closes its stream
# on close; inside a test that stream is pytest's capture, so a test importing submitit after a
# rouge-score test broke pytest's teardown. Importing submitit here, first, avoids that.

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/dev/test JSONL of a small embedded task + teacher (BPE) and student (WordPiece) tokenizers."""
    from cot2align.data.embedded import EmbeddedTaskConfig, write_embedded_task
    from cot2align.data.jsonl import read_jsonl
    from cot2align.data.tokenizer_training import tokenizer_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_task")
    cfg = EmbeddedTaskConfig(n_train=96, n_dev=16, n_test=16, n_test_long=8)
    files = write_embedded_task(cfg, root / "data")
    rows, _ = read_jsonl(files["train"])
    corpus = [{"instruction": e.instruction, "input": e.input, "output": e.output, "rationale": e.rationale}
              for e in rows]
    train_tokenizer(tokenizer_corpus(corpus), "bpe", 400, root / "tok_teacher")
    train_tokenizer(tokenizer_corpus(corpus), "wordpiece", 300, root / "tok_student")
    return {**files, "tok_teacher": root / "tok_teacher", "tok_student": root / "tok_student", "root": root}


@pytest.fixture
def no_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without sbatch / srun (the launcher runs locally)."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def teacher_dir(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama teacher checkpoint (safetensors) with the teacher tokenizer (`jobs.tiny_teacher`)."""
    return tiny_teacher(tiny_task, tmp_path_factory.mktemp("teacher"))
