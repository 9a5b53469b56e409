"""The shipped instruction set: deterministic, well-formed, answers that follow from the inputs."""

from __future__ import annotations

from pathlib import Path

from cot2align.configbase import REPO_ROOT
from cot2align.data.instructions import OPPOSITES, PLURALS, instruction_rows, write_instruction_set
from cot2align.data.jsonl import read_jsonl

SHIPPED = REPO_ROOT / "configs" / "data" / "instructions"


def test_generation_is_deterministic_and_the_shipped_copy_is_current(tmp_path: Path) -> None:
    assert instruction_rows(30, "train") == instruction_rows(30, "train")
    assert instruction_rows(30, "train") != instruction_rows(30, "dev")
    for split, path in write_instruction_set(tmp_path).items():
        assert path.read_text() == (SHIPPED / f"{split}.jsonl").read_text(), split


def test_every_answer_follows_from_its_input() -> None:
    rows, report = read_jsonl(SHIPPED / "train.jsonl")
    assert report.kept == 400 and not report.skipped
    for ex in rows:
        task, inp = ex.meta["task"], ex.input
        assert ex.answer == ex.output and ex.rationale
        if task == "sort":
            assert ex.output == ", ".join(map(str, sorted(int(x) for x in inp.split(", "))))
        elif task == "uppercase":
            assert ex.output == inp.upper()
        elif task == "reverse":
            assert ex.output.split() == inp.split()[::-1]
        elif task == "count":
            assert int(ex.output) == len(inp)
        elif task == "plural":
            assert ex.output == PLURALS[inp]
        elif task == "opposite":
            assert ex.output == OPPOSITES[inp]
        elif task == "add":
            a, b = (int(x) for x in inp.split(" and "))
            assert int(ex.output) == a + b
        elif task == "max":
            assert int(ex.output) == max(int(x) for x in inp.split(", "))
        else:
            raise AssertionError(f"unknown task {task}")
