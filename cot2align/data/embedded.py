"""The embedded default task: seeded multi-step arithmetic word problems with gold rationales.

Each problem starts with a quantity of objects and applies 2-4 operations (add, subtract,
multiply by a small factor, keep an equal share), e.g.

    instruction: "Tom has 5 apples. He buys 3 more apples. Then he gives away 2 apples.
                  How many apples does Tom have now?"
    rationale:   "Tom starts with 5 apples. He buys 3 more: 5 + 3 = 8. He gives away 2: 8 - 2 = 6."
    output:      "6"

Numbers stay small (operands <= `max_operand`, factors <= `max_factor`, every intermediate
value in [2, `max_value`]) and the vocabulary is a few dozen words, so a ~1M-parameter LM
with a tiny tokenizer can learn the task on a CPU in minutes. Train and dev use
`min_steps..max_steps` operations; test holds the same range plus a harder part with
`long_steps` operations (marked by the `steps` field) to measure reasoning transfer.

Splits are generated from per-split RNG streams in the fixed order test-long, test, dev,
train, deduplicated on the problem text, so changing the train size does not change dev or
test. `write_embedded_task` writes byte-identical JSONL for the same config.

`extract_answer` pulls the final answer out of generated text for exact-match scoring.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cot2align.configbase import ConfigBase, require
from cot2align.data.jsonl import write_jsonl

GENERATOR_VERSION = 1
"""Bumped whenever generation changes, so cached task directories are rebuilt."""

Operation = Literal["add", "subtract", "multiply", "divide"]
SPLIT_FILES = ("train", "dev", "test")
GENERIC_INSTRUCTIONS = ("Solve the math word problem.", "Answer the question.")

# name -> (subject pronoun, object pronoun, possessive)
_NAMES: dict[str, tuple[str, str, str]] = {
    "Tom": ("he", "him", "his"),
    "Ben": ("he", "him", "his"),
    "Sam": ("he", "him", "his"),
    "Max": ("he", "him", "his"),
    "Anna": ("she", "her", "her"),
    "Lily": ("she", "her", "her"),
    "Mia": ("she", "her", "her"),
    "Emma": ("she", "her", "her"),
}
_OBJECTS = ("apples", "pencils", "cookies", "marbles", "stickers", "books", "coins", "cards")
_OPENINGS = ("{N} has {x} {o}.", "{N} starts with {x} {o}.", "At first, {N} has {x} {o}.")
_CONNECTORS = ("", "Then ", "After that, ", "Next, ")
_QUESTIONS = (
    "How many {o} does {N} have now?",
    "How many {o} does {N} have in the end?",
    "How many {o} does {N} have at the end?",
)

# Per operation: (problem sentence, rationale sentence prefix). Placeholders: {P} pronoun,
# {Q} object pronoun, {R} possessive, {F} another name, {o} objects, {k} operand.
_Template = tuple[str, str]
_ADD: tuple[_Template, ...] = (
    ("{P} buys {k} more {o}.", "{P} buys {k} more"),
    ("{P} finds {k} more {o}.", "{P} finds {k} more"),
    ("{P} gets {k} more {o}.", "{P} gets {k} more"),
    ("{F} gives {Q} {k} {o}.", "{F} gives {Q} {k}"),
)
_SUBTRACT: tuple[_Template, ...] = (
    ("{P} gives away {k} {o}.", "{P} gives away {k}"),
    ("{P} loses {k} {o}.", "{P} loses {k}"),
    ("{P} sells {k} {o}.", "{P} sells {k}"),
    ("{P} gives {k} {o} to {F}.", "{P} gives {k} to {F}"),
)
_MULTIPLY: tuple[_Template, ...] = (("{P} ends up with {k} times as many {o}.", "{P} has {k} times as many"),)
_DOUBLE: _Template = ("{P} doubles {R} {o}.", "{P} doubles them")
_DIVIDE: tuple[_Template, ...] = (
    ("{P} splits the {o} into {k} equal groups and keeps one group.", "{P} keeps one of {k} equal groups"),
)
_HALVE: _Template = ("{P} keeps half of the {o}.", "{P} keeps half")
_SYMBOL: dict[str, str] = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}


@dataclass
class EmbeddedTaskConfig(ConfigBase):
    """The built-in arithmetic word-problem task (generated, no downloads)."""

    seed: int = 1234
    """Seed of every split's RNG stream; the same seed gives byte-identical files."""
    n_train: int = 2000
    """Number of training problems."""
    n_dev: int = 200
    """Number of dev problems (same step range as train)."""
    n_test: int = 200
    """Number of test problems within the training step range."""
    n_test_long: int = 100
    """Number of held-out test problems with `long_steps` operations (harder than training)."""
    min_steps: int = 2
    """Fewest operations per train/dev/test problem."""
    max_steps: int = 3
    """Most operations per train/dev/test problem."""
    long_steps: int = 4
    """Operations per problem of the long test part; must exceed max_steps."""
    max_operand: int = 20
    """Largest starting amount and add/subtract operand (operands are >= 2)."""
    max_factor: int = 5
    """Largest multiplication factor and number of equal groups (>= 2)."""
    max_value: int = 200
    """Largest intermediate value; every value stays in [2, max_value]."""
    operations: list[Operation] = field(default_factory=lambda: ["add", "subtract", "multiply", "divide"])
    """Operations to draw from (uniformly among those feasible at each step)."""
    input_fraction: float = 0.25
    """Share of problems put in `input` under a generic instruction (the rest: instruction only)."""

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        require(self.n_train >= 1, f"{p}n_train", f"must be >= 1, got {self.n_train}")
        for name in ("n_dev", "n_test", "n_test_long"):
            value = getattr(self, name)
            require(value >= 0, f"{p}{name}", f"must be >= 0, got {value}")
        require(self.min_steps >= 1, f"{p}min_steps", f"must be >= 1, got {self.min_steps}")
        require(
            self.max_steps >= self.min_steps,
            f"{p}max_steps",
            f"must be >= min_steps ({self.min_steps}), got {self.max_steps}",
        )
        require(
            self.long_steps > self.max_steps,
            f"{p}long_steps",
            f"must be > max_steps ({self.max_steps}) so the long test part is harder, got {self.long_steps}",
        )
        require(self.max_operand >= 3, f"{p}max_operand", f"must be >= 3, got {self.max_operand}")
        require(self.max_factor >= 2, f"{p}max_factor", f"must be >= 2, got {self.max_factor}")
        require(
            self.max_value >= 2 * self.max_operand,
            f"{p}max_value",
            f"must be >= 2 * max_operand ({2 * self.max_operand}), got {self.max_value}",
        )
        require(len(self.operations) >= 1, f"{p}operations", "needs at least one operation")
        require(
            len(set(self.operations)) == len(self.operations),
            f"{p}operations",
            f"has duplicates: {self.operations}",
        )
        require(
            "add" in self.operations or "subtract" in self.operations,
            f"{p}operations",
            "must include 'add' or 'subtract' (otherwise some problems have no feasible step)",
        )
        require(
            0.0 <= self.input_fraction <= 1.0,
            f"{p}input_fraction",
            f"must be in [0, 1], got {self.input_fraction}",
        )

    def fingerprint(self) -> str:
        """SHA-256 of the config and the generator version: names a generated task exactly."""
        payload = json.dumps({"version": GENERATOR_VERSION, "config": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _feasible_operands(op: str, x: int, cfg: EmbeddedTaskConfig) -> list[int]:
    """Operands k for which applying `op` to `x` keeps the result an integer in [2, max_value]."""
    if op == "add":
        return list(range(2, min(cfg.max_operand, cfg.max_value - x) + 1))
    if op == "subtract":
        return list(range(2, min(cfg.max_operand, x - 2) + 1))
    if op == "multiply":
        return [k for k in range(2, cfg.max_factor + 1) if x * k <= cfg.max_value]
    return [k for k in range(2, cfg.max_factor + 1) if x % k == 0 and x // k >= 2]


def _apply(op: str, x: int, k: int) -> int:
    """The result of one operation (division is exact by construction)."""
    if op == "add":
        return x + k
    if op == "subtract":
        return x - k
    if op == "multiply":
        return x * k
    return x // k


def _pick_template(op: str, k: int, rng: random.Random) -> _Template:
    """A (problem sentence, rationale prefix) template for `op` with operand `k`."""
    if op == "add":
        return rng.choice(_ADD)
    if op == "subtract":
        return rng.choice(_SUBTRACT)
    if op == "multiply":
        return rng.choice((*_MULTIPLY, _DOUBLE)) if k == 2 else rng.choice(_MULTIPLY)
    return rng.choice((*_DIVIDE, _HALVE)) if k == 2 else rng.choice(_DIVIDE)


def _capitalize(text: str) -> str:
    """Upper-case the first character only (keeps names and the rest as they are)."""
    return text[:1].upper() + text[1:]


def make_problem(rng: random.Random, steps: int, cfg: EmbeddedTaskConfig) -> dict[str, Any] | None:
    """One problem with exactly `steps` operations, or None if the draw ran into a dead end.

    Returns a dict with `problem` (the question text), `rationale` (one sentence per step with
    the explicit arithmetic), `answer` (int) and `steps`.
    """
    name = rng.choice(sorted(_NAMES))
    pronoun, obj_pronoun, possessive = _NAMES[name]
    friend = rng.choice([n for n in sorted(_NAMES) if n != name])
    objects = rng.choice(_OBJECTS)
    x = rng.randint(2, cfg.max_operand)
    problem = [rng.choice(_OPENINGS).format(N=name, x=x, o=objects)]
    rationale = [f"{name} starts with {x} {objects}."]
    for step in range(steps):
        ops = [op for op in cfg.operations if _feasible_operands(op, x, cfg)]
        if not ops:
            return None
        op = rng.choice(ops)
        k = rng.choice(_feasible_operands(op, x, cfg))
        y = _apply(op, x, k)
        question_t, rationale_t = _pick_template(op, k, rng)
        slots = {"Q": obj_pronoun, "R": possessive, "F": friend, "o": objects, "k": k}
        connector = rng.choice(_CONNECTORS) if step > 0 else ""
        sentence = question_t.format(P=pronoun, **slots)
        problem.append(connector + sentence if connector else _capitalize(sentence))
        said = _capitalize(rationale_t.format(P=pronoun, **slots))
        rationale.append(f"{said}: {x} {_SYMBOL[op]} {k} = {y}.")
        x = y
    problem.append(rng.choice(_QUESTIONS).format(N=name, o=objects))
    return {"problem": " ".join(problem), "rationale": " ".join(rationale), "answer": x, "steps": steps}


def _generate_split(
    name: str,
    count: int,
    step_range: tuple[int, int],
    cfg: EmbeddedTaskConfig,
    seen: set[str],
) -> list[dict[str, Any]]:
    """`count` rows with problems not in `seen` (which is updated); deterministic in cfg.seed."""
    rng = random.Random(f"cot2align-embedded/{cfg.seed}/{name}")
    rows: list[dict[str, Any]] = []
    attempts, max_attempts = 0, 50 * count + 1000
    while len(rows) < count:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"embedded task: could only generate {len(rows)} of {count} unique {name} problems; "
                "widen max_operand / operations or lower the split sizes"
            )
        item = make_problem(rng, rng.randint(*step_range), cfg)
        if item is None or item["problem"] in seen:
            continue
        seen.add(item["problem"])
        if rng.random() < cfg.input_fraction:
            instruction, input_text = rng.choice(GENERIC_INSTRUCTIONS), item["problem"]
        else:
            instruction, input_text = item["problem"], ""
        rows.append(
            {
                "id": f"embedded-{name}-{len(rows):05d}",
                "instruction": instruction,
                "input": input_text,
                "output": str(item["answer"]),
                "rationale": item["rationale"],
                "answer": item["answer"],
                "steps": item["steps"],
            }
        )
    return rows


def generate_embedded_task(cfg: EmbeddedTaskConfig) -> dict[str, list[dict[str, Any]]]:
    """Rows of the `train`, `dev` and `test` splits (test = in-range part, then the long part).

    Problems are unique across all splits (deduplicated on the problem text).
    """
    cfg.validate()
    seen: set[str] = set()
    short = (cfg.min_steps, cfg.max_steps)
    test_long = _generate_split("test-long", cfg.n_test_long, (cfg.long_steps, cfg.long_steps), cfg, seen)
    test = _generate_split("test", cfg.n_test, short, cfg, seen)
    dev = _generate_split("dev", cfg.n_dev, short, cfg, seen)
    train = _generate_split("train", cfg.n_train, short, cfg, seen)
    return {"train": train, "dev": dev, "test": test + test_long}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_matches(manifest_path: Path, out_dir: Path, fingerprint: str) -> bool:
    """True if `manifest.json` names this config and every listed file is intact."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return False
    files = manifest.get("files", {})
    if not isinstance(files, dict) or set(files) != set(SPLIT_FILES):
        return False
    for split, digest in files.items():
        path = out_dir / f"{split}.jsonl"
        if not path.is_file() or _sha256(path) != digest:
            return False
    return True


def write_embedded_task(cfg: EmbeddedTaskConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write `train.jsonl`, `dev.jsonl`, `test.jsonl` and `manifest.json` under `out_dir`.

    Returns {split: path}. Files are byte-identical for the same config. If `out_dir`
    already holds a manifest with this config's fingerprint and intact files, nothing is
    regenerated (fast path).
    """
    out_dir = Path(out_dir)
    paths = {split: out_dir / f"{split}.jsonl" for split in SPLIT_FILES}
    manifest_path = out_dir / "manifest.json"
    fingerprint = cfg.fingerprint()
    if _manifest_matches(manifest_path, out_dir, fingerprint):
        return paths
    splits = generate_embedded_task(cfg)
    digests: dict[str, str] = {}
    for split, path in paths.items():
        write_jsonl(splits[split], path)
        digests[split] = _sha256(path)
    manifest = {
        "task": "embedded-arithmetic",
        "generator_version": GENERATOR_VERSION,
        "fingerprint": fingerprint,
        "config": cfg.to_dict(),
        "counts": {split: len(rows) for split, rows in splits.items()},
        "files": digests,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    return paths


# ----------------------------------------------------------------------------- answers

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}|(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?")
_GSM8K_RE = re.compile(rf"####\s*\$?\s*({_NUMBER})")
_ANSWER_IS_RE = re.compile(rf"the\s+(?:final\s+)?answer\s+is\s*:?\s*\$?\s*({_NUMBER})", re.IGNORECASE)


def normalize_number(text: str) -> str:
    """Canonical form of a number string: no commas, no trailing zeros ("6.0" -> "6", "1,200" -> "1200")."""
    s = text.strip().replace(",", "")
    negative = s.startswith("-")
    s = s.lstrip("+-")
    whole, _, frac = s.partition(".")
    whole = str(int(whole)) if whole else "0"
    frac = frac.rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    return f"-{out}" if negative and out != "0" else out


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def _gsm8k(text: str) -> str | None:
    matches = _GSM8K_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def _the_answer_is(text: str) -> str | None:
    matches = _ANSWER_IS_RE.findall(text)
    return normalize_number(matches[-1]) if matches else _last_number(text)


ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_number": _last_number,
    "gsm8k": _gsm8k,
    "the_answer_is": _the_answer_is,
}
"""Extraction modes: last number; GSM8K "#### N"; "the answer is: N" falling back to the last number."""


def extract_answer(text: str, mode: str) -> str | None:
    """The normalised final answer in `text` under `mode` (see ANSWER_EXTRACTORS), or None.

    Raises ValueError for an unknown mode.
    """
    try:
        extractor = ANSWER_EXTRACTORS[mode]
    except KeyError:
        raise ValueError(
            f"unknown answer extraction mode {mode!r}; expected one of {', '.join(ANSWER_EXTRACTORS)}"
        ) from None
    return extractor(text)
