"""Reading instruction data: JSONL rows with instruction / input / output (/ rationale).

Every malformed row is an error naming the file and line, or, with
`on_bad_row="skip"`, is skipped and counted with its reason. Nothing is dropped silently.

Types: `instruction`, `output`, `input` and `rationale` must be JSON strings (a number there
is almost always a column mix-up, so it is an error, not a guess). `id` and `answer` may also
be numbers (spreadsheet exports write `7`, not `"7"`): they are coerced to their decimal text
(`7` -> "7", `2.5` -> "2.5"); booleans, lists and objects are errors. A UTF-8 byte-order mark
at the start of a file (Windows and spreadsheet exports) is skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class DataError(ValueError):
    """A data file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    id: stable identifier (the row's `id`, else "<file stem>:<line>").
    rationale: a chain of thought for the CoT member, or None (std sample only).
    answer: the checkable final answer, when the task has one.
    """

    id: str
    instruction: str
    input: str
    output: str
    rationale: str | None = None
    answer: str | None = None
    source: str = ""
    """Where the row came from ("file:line")."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class ReadReport:
    """How many rows were read and, per reason, how many were skipped."""

    path: str
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


_REQUIRED = ("instruction", "output")
_OPTIONAL_STR = ("input", "rationale")
_OPTIONAL_STR_OR_NUMBER = ("id", "answer")
_BOM = b"\xef\xbb\xbf"


def parse_row(raw: bytes, where: str) -> Example:
    """Parse one JSONL line into an Example; raise DataError naming `where` (file:line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in _REQUIRED:
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj[key].strip():
            raise DataError(f"{where}: field {key!r} is empty")
    for key in _OPTIONAL_STR:
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__} "
                            f"({json.dumps(obj[key])[:40]}); quote it if it is meant as text")
    for key in _OPTIONAL_STR_OR_NUMBER:
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
            raise DataError(f"{where}: field {key!r} must be a string or a number, got {type(value).__name__}")
    rationale = obj.get("rationale")
    if rationale is not None and not str(rationale).strip():
        raise DataError(f"{where}: field 'rationale' is empty (omit it or set null for no rationale)")
    answer = obj.get("answer")
    meta = {k: v for k, v in obj.items() if k not in (*_REQUIRED, *_OPTIONAL_STR, *_OPTIONAL_STR_OR_NUMBER)}
    return Example(
        id=str(obj.get("id", where)),
        instruction=obj["instruction"],
        input=str(obj.get("input") or ""),
        output=obj["output"],
        rationale=None if rationale is None else str(rationale),
        answer=None if answer is None else str(answer),
        source=where,
        meta=meta,
    )


def read_jsonl(
    path: str | Path, on_bad_row: Literal["error", "skip"] = "error"
) -> tuple[list[Example], ReadReport]:
    """Read all rows of `path`; returns (examples, report). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    report = ReadReport(str(path))
    examples: list[Example] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                ex = parse_row(raw, where)
                if ex.id in seen:
                    raise DataError(f"{where}: duplicate id {ex.id!r} (first on line {seen[ex.id]})")
            except DataError as e:
                if on_bad_row == "error":
                    raise
                report.skipped[str(e).split(": ", 1)[1].split(" (")[0]] += 1
                continue
            seen[ex.id] = lineno
            examples.append(ex)
    report.kept = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable rows (skipped: {dict(report.skipped) or 'none'})")
    return examples, report


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """Write rows as UTF-8 JSONL (one object per line), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
