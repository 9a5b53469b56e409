"""Prompt templates (method.md section 2): standard (Alpaca) and chain-of-thought."""

from __future__ import annotations

from cot2align.data.jsonl import Example

_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
)
_HEADER_NO_INPUT = "Below is an instruction that describes a task. "
_STD_ASK = "Write a response that appropriately completes the request."
_COT_ASK = "Write a response with reasoning step by step that appropriately completes the request."
COT_OPENING = "Let's think step by step."
ANSWER_BRIDGE = "\nTherefore, the answer is: "


def _prompt(ex: Example, ask: str) -> str:
    if ex.input.strip():
        return (
            f"{_HEADER_INPUT}{ask}\n\n### Instruction:\n{ex.instruction}\n\n"
            f"### Input:\n{ex.input}\n\n### Response:\n"
        )
    return f"{_HEADER_NO_INPUT}{ask}\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n"


def std_prompt(ex: Example) -> str:
    """The standard prompt; the target is the gold output."""
    return _prompt(ex, _STD_ASK)


def cot_prompt(ex: Example) -> str:
    """The CoT prompt; the response part opens with "Let's think step by step." (kept in the prompt)."""
    return _prompt(ex, _COT_ASK) + COT_OPENING + "\n"


def cot_target(rationale: str, output: str) -> str:
    """CoT target: rationale + "\\nTherefore, the answer is: " + output."""
    return rationale.rstrip() + ANSWER_BRIDGE + output


def template_texts() -> list[str]:
    """The fixed words of every template (for training tokenizers that encode prompts compactly)."""
    return [_HEADER_INPUT, _HEADER_NO_INPUT, _STD_ASK, _COT_ASK, COT_OPENING, ANSWER_BRIDGE,
            "\n\n### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n"]
