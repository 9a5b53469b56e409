"""A small instruction-following set the project makes itself (for real-model demos).

No instruction dataset can be downloaded here, so `write_instruction_set` generates one in
the standard instruction / input / output JSONL (with a short step-by-step rationale per
row for the CoT format): list and word manipulations a ~100M-parameter instruct model can
attempt, each with a checkable answer. Deterministic in its seed; the shipped copy lives in
``configs/data/instructions/`` (regenerate with ``python -m cot2align.data.instructions``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORDS = ["apple", "river", "garden", "pencil", "window", "music", "orange", "planet", "silver", "tiger",
         "candle", "forest", "bridge", "yellow", "rocket", "summer", "kitten", "marble", "violin", "harbor",
         "lemon", "castle", "meadow", "copper", "dragon", "winter", "button", "island", "pepper", "saddle"]
PLURALS = {"box": "boxes", "city": "cities", "leaf": "leaves", "child": "children", "mouse": "mice",
           "baby": "babies", "glass": "glasses", "wolf": "wolves", "tooth": "teeth", "story": "stories",
           "knife": "knives", "bus": "buses", "foot": "feet", "party": "parties", "dish": "dishes"}
OPPOSITES = {"hot": "cold", "tall": "short", "early": "late", "happy": "sad", "open": "closed",
             "light": "dark", "fast": "slow", "full": "empty", "rich": "poor", "strong": "weak",
             "wet": "dry", "loud": "quiet", "hard": "soft", "young": "old", "clean": "dirty"}

Row = dict[str, Any]


def _sort_numbers(rng: random.Random) -> Row:
    nums = rng.sample(range(1, 60), rng.randint(3, 5))
    out = sorted(nums)
    steps = [f"The smallest number left is {x}." for x in out]
    return {"instruction": "Sort the numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, out)), "rationale": " ".join(steps)}


def _uppercase(rng: random.Random) -> Row:
    words = rng.sample(WORDS, rng.randint(2, 3))
    return {"instruction": "Rewrite the words in capital letters.", "input": " ".join(words),
            "output": " ".join(w.upper() for w in words),
            "rationale": " ".join(f"{w} in capitals is {w.upper()}." for w in words)}


def _reverse_words(rng: random.Random) -> Row:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return {"instruction": "Write the words in reverse order.", "input": " ".join(words),
            "output": " ".join(reversed(words)),
            "rationale": f"The last word is {words[-1]} and the first word is {words[0]}, so the order flips."}


def _count_letters(rng: random.Random) -> Row:
    word = rng.choice(WORDS)
    letters = " ".join(word)
    return {"instruction": "How many letters does the word have?", "input": word, "output": str(len(word)),
            "rationale": f"The letters are {letters}. Counting them gives {len(word)}."}


def _plural(rng: random.Random) -> Row:
    word = rng.choice(sorted(PLURALS))
    return {"instruction": "Give the plural of the noun.", "input": word, "output": PLURALS[word],
            "rationale": f"One {word}, two {PLURALS[word]}."}


def _opposite(rng: random.Random) -> Row:
    word = rng.choice(sorted(OPPOSITES))
    return {"instruction": "Give the opposite of the adjective.", "input": word, "output": OPPOSITES[word],
            "rationale": f"The opposite of {word} is {OPPOSITES[word]}."}


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b),
            "rationale": f"{a} + {b} = {a + b}."}


def _max_number(rng: random.Random) -> Row:
    nums = rng.sample(range(1, 100), 4)
    return {"instruction": "Which number is the largest?", "input": ", ".join(map(str, nums)),
            "output": str(max(nums)), "rationale": f"Comparing {', '.join(map(str, nums))}, the largest is {max(nums)}."}


TASKS: dict[str, Callable[[random.Random], Row]] = {
    "sort": _sort_numbers, "uppercase": _uppercase, "reverse": _reverse_words, "count": _count_letters,
    "plural": _plural, "opposite": _opposite, "add": _add, "max": _max_number,
}


def instruction_rows(n: int, split: str, seed: int = 0) -> list[Row]:
    """`n` rows of `split`, tasks in turn; the answer of every row is its `output`."""
    rng = random.Random(f"cot2align-instructions/{seed}/{split}")
    names = sorted(TASKS)
    rows = []
    for i in range(n):
        task = names[i % len(names)]
        row = TASKS[task](rng)
        rows.append({"id": f"instr-{split}-{i:04d}", **row, "answer": row["output"], "task": task})
    return rows


def write_instruction_set(out_dir: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write train / dev / test JSONL files; returns split -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (sizes or {"train": 400, "dev": 40, "test": 80}).items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(n, split, seed)))
    return paths


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "configs" / "data"
                                                           / "instructions")
    for split, path in write_instruction_set(target).items():
        print(f"{split}: {path}")
