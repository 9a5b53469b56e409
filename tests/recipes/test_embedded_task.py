"""The embedded arithmetic task: correct answers, determinism, disjoint splits, extractors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cot2align.configbase import ConfigError
from cot2align.data.embedded import (
    GENERIC_INSTRUCTIONS,
    EmbeddedTaskConfig,
    extract_answer,
    generate_embedded_task,
    normalize_number,
    write_embedded_task,
)
from cot2align.data.jsonl import read_jsonl

SMALL = EmbeddedTaskConfig(n_train=400, n_dev=60, n_test=60, n_test_long=40)
_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
_START = re.compile(r"^[A-Z][a-z]+ starts with (\d+) [a-z]+\.")


@pytest.fixture(scope="module")
def default_splits() -> dict[str, list[dict[str, Any]]]:
    return generate_embedded_task(EmbeddedTaskConfig())


def _problem(row: dict[str, Any]) -> str:
    return row["input"] or row["instruction"]


def _check_row(row: dict[str, Any], cfg: EmbeddedTaskConfig) -> None:
    """Re-derive the answer from the rationale's arithmetic, independently of the generator."""
    start = _START.match(row["rationale"])
    assert start, row["rationale"]
    value = int(start.group(1))
    assert 2 <= value <= cfg.max_operand
    steps = _STEP.findall(row["rationale"])
    assert len(steps) == row["steps"], row
    operands = [value]
    for a, op, b, c in steps:
        a_, b_, c_ = int(a), int(b), int(c)
        assert a_ == value, f"step does not chain from the previous result: {row['rationale']}"
        if op == "+":
            expected = a_ + b_
        elif op == "-":
            expected = a_ - b_
        elif op == "*":
            expected = a_ * b_
        else:
            assert a_ % b_ == 0, row["rationale"]
            expected = a_ // b_
        assert c_ == expected, row["rationale"]
        assert 2 <= c_ <= cfg.max_value
        assert b_ <= (cfg.max_operand if op in "+-" else cfg.max_factor)
        operands.append(b_)
        value = c_
    assert value == row["answer"]
    assert row["output"] == str(row["answer"])
    # Every number the problem states is, in order, the start value or an operand
    # ("doubles" / "keeps half" state the factor 2 in words).
    stated = [int(n) for n in re.findall(r"\d+", _problem(row))]
    assert stated and stated[0] == operands[0]
    it = iter(operands)
    assert all(any(n == o for o in it) for n in stated), (stated, operands)


def test_answers_rederived_from_rationales(default_splits: dict[str, list[dict[str, Any]]]) -> None:
    cfg = EmbeddedTaskConfig()
    for rows in default_splits.values():
        for row in rows:
            _check_row(row, cfg)


def test_sizes_and_step_ranges(default_splits: dict[str, list[dict[str, Any]]]) -> None:
    cfg = EmbeddedTaskConfig()
    assert [len(default_splits[s]) for s in ("train", "dev", "test")] == [2000, 200, 300]
    for split in ("train", "dev"):
        assert {r["steps"] for r in default_splits[split]} == {2, 3}
    test_steps = [r["steps"] for r in default_splits["test"]]
    assert test_steps.count(cfg.long_steps) == cfg.n_test_long
    assert {s for s in test_steps if s != cfg.long_steps} == {2, 3}
    assert max(r["steps"] for r in default_splits["train"]) < cfg.long_steps


def test_splits_are_disjoint_and_ids_unique(default_splits: dict[str, list[dict[str, Any]]]) -> None:
    problems = {split: [_problem(r) for r in rows] for split, rows in default_splits.items()}
    for split, items in problems.items():
        assert len(set(items)) == len(items), f"duplicates inside {split}"
    assert not set(problems["train"]) & set(problems["dev"])
    assert not set(problems["train"]) & set(problems["test"])
    assert not set(problems["dev"]) & set(problems["test"])
    ids = [r["id"] for rows in default_splits.values() for r in rows]
    assert len(set(ids)) == len(ids)


def test_variety_of_templates_and_operations(default_splits: dict[str, list[dict[str, Any]]]) -> None:
    train = default_splits["train"]
    ops = {op for r in train for _, op, _, _ in _STEP.findall(r["rationale"])}
    assert ops == {"+", "-", "*", "/"}
    with_input = [r for r in train if r["input"]]
    assert 0.15 < len(with_input) / len(train) < 0.35
    assert {r["instruction"] for r in with_input} <= set(GENERIC_INSTRUCTIONS)
    assert len({_problem(r).split()[0] for r in train}) > 5  # several names / openings
    words = {w for r in train for w in re.findall(r"[A-Za-z']+", _problem(r) + " " + r["rationale"])}
    assert len(words) < 120  # small vocabulary for tiny tokenizers and models


def test_write_is_deterministic_and_readable(tmp_path: Path) -> None:
    a = write_embedded_task(SMALL, tmp_path / "a")
    b = write_embedded_task(SMALL, tmp_path / "b")
    for split in ("train", "dev", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        examples, _ = read_jsonl(a[split])
        assert examples[0].rationale and examples[0].answer == examples[0].output
    other = write_embedded_task(EmbeddedTaskConfig.from_dict({**SMALL.to_dict(), "seed": 7}), tmp_path / "c")
    assert other["train"].read_bytes() != a["train"].read_bytes()


def test_train_size_does_not_change_dev_and_test() -> None:
    small = generate_embedded_task(SMALL)
    bigger = generate_embedded_task(EmbeddedTaskConfig.from_dict({**SMALL.to_dict(), "n_train": 500}))
    assert small["dev"] == bigger["dev"] and small["test"] == bigger["test"]
    assert bigger["train"][:400] == small["train"]


def test_fast_path_and_rebuild(tmp_path: Path) -> None:
    paths = write_embedded_task(SMALL, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 400, "dev": 60, "test": 100}
    stamp = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    write_embedded_task(SMALL, tmp_path)
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == stamp  # nothing rewritten
    original = paths["dev"].read_bytes()
    paths["dev"].write_text("corrupted\n")
    write_embedded_task(SMALL, tmp_path)
    assert paths["dev"].read_bytes() == original
    changed = EmbeddedTaskConfig.from_dict({**SMALL.to_dict(), "n_dev": 10})
    write_embedded_task(changed, tmp_path)
    assert len(paths["dev"].read_text().splitlines()) == 10


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"task\.long_steps"):
        EmbeddedTaskConfig(max_steps=3, long_steps=3).validate("task")
    with pytest.raises(ConfigError, match="operations"):
        EmbeddedTaskConfig(operations=["multiply"]).validate()
    with pytest.raises(ConfigError, match="operations"):
        EmbeddedTaskConfig.from_dict({"operations": ["add", "modulo"]})
    with pytest.raises(ConfigError, match="input_fraction"):
        EmbeddedTaskConfig(input_fraction=1.5).validate()
    cfg = EmbeddedTaskConfig().with_overrides(["n_train=50", "max_operand=10"])
    assert (cfg.n_train, cfg.max_operand) == (50, 10)
    assert cfg.fingerprint() != EmbeddedTaskConfig().fingerprint()


def test_add_only_config_stays_in_range() -> None:
    cfg = EmbeddedTaskConfig(
        n_train=50, n_dev=5, n_test=5, n_test_long=5, operations=["add"], max_operand=10, max_value=40
    )
    for rows in generate_embedded_task(cfg).values():
        for row in rows:
            _check_row(row, cfg)
            assert "-" not in row["rationale"] and "*" not in row["rationale"]


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("He has 5 + 3 = 8. Then 8 - 2 = 6.", "last_number", "6"),
        ("The total is 1,234 apples.", "last_number", "1234"),
        ("It comes to 6.0", "last_number", "6"),
        ("It comes to 6.50.", "last_number", "6.5"),
        ("x = -3", "last_number", "-3"),
        ("10-3", "last_number", "3"),
        ("no digits here", "last_number", None),
        ("so 3 * 4 = 12\n#### 12", "gsm8k", "12"),
        ("#### 1,000.00", "gsm8k", "1000"),
        ("answer 12 without the marker", "gsm8k", None),
        ("He keeps 6.\nTherefore, the answer is: 6", "the_answer_is", "6"),
        ("the answer is 42 apples, not 7", "the_answer_is", "42"),
        ("The answer is: $1,200.", "the_answer_is", "1200"),
        ("5 + 3 = 8 so he has 8", "the_answer_is", "8"),
        ("nothing", "the_answer_is", None),
    ],
)
def test_extract_answer(text: str, mode: str, expected: str | None) -> None:
    assert extract_answer(text, mode) == expected


def test_extract_answer_matches_gold_cot_target(default_splits: dict[str, list[dict[str, Any]]]) -> None:
    for row in default_splits["dev"]:
        target = row["rationale"] + "\nTherefore, the answer is: " + row["output"]
        assert extract_answer(target, "the_answer_is") == row["output"]
        assert extract_answer(target, "last_number") == row["output"]


def test_extract_answer_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown answer extraction mode"):
        extract_answer("6", "boxed")


def test_normalize_number() -> None:
    assert [normalize_number(s) for s in ["6.0", "007", "-0", "1,200", "3.140", "+5"]] == [
        "6",
        "7",
        "0",
        "1200",
        "3.14",
        "5",
    ]
