"""Prompt templates (docs/method.md section 2): standard (Alpaca) and chain-of-thought; model input.

`model_input_ids` is the one place a prompt string becomes the token ids a model is asked to
continue: BOS + prompt, or, for chat (instruct) models, the prompt as a user turn in the
tokenizer's chat template followed by the assistant header (`chat_template: auto`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

from cot2align.data.jsonl import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ChatTemplateMode = Literal["auto", "none"]
"""auto: wrap prompts in the tokenizer's chat template when it has one; none: never."""

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


# ----------------------------------------------------------------------------- model input


def uses_chat_template(tok: PreTrainedTokenizerBase, mode: ChatTemplateMode) -> bool:
    """Whether prompts for `tok` are wrapped in its chat template under `mode`."""
    if mode not in ("auto", "none"):
        raise ValueError(f"chat_template: got {mode!r}, expected 'auto' or 'none'")
    return mode == "auto" and bool(getattr(tok, "chat_template", None))


def model_input_text(tok: PreTrainedTokenizerBase, prompt: str, mode: ChatTemplateMode = "auto") -> str:
    """The text the model continues: `prompt` itself, or (chat template in use) the prompt as the user
    turn of a one-message conversation followed by the assistant header (e.g. ChatML's
    "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", plus the template's own system turn)."""
    if not uses_chat_template(tok, mode):
        return prompt
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    return str(text)


def model_input_ids(tok: PreTrainedTokenizerBase, prompt: str, mode: ChatTemplateMode = "auto") -> list[int]:
    """Token ids [T] the model continues for `prompt`: BOS + prompt (as training builds them), or the
    chat-templated prompt (the template writes its own special tokens; no BOS is added)."""
    if uses_chat_template(tok, mode):
        return list(tok.encode(model_input_text(tok, prompt, mode), add_special_tokens=False))
    ids = tok.encode(prompt, add_special_tokens=False)
    return [tok.bos_token_id, *ids] if tok.bos_token_id is not None else list(ids)


_SENTINEL = "@@cot2align-reply@@"


def end_of_turn_id(tok: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML: <|im_end|>), or None
    (no template, or it writes no special token right after the reply)."""
    if not getattr(tok, "chat_template", None):
        return None
    try:
        text = str(tok.apply_chat_template([{"role": "user", "content": "?"},
                                            {"role": "assistant", "content": _SENTINEL}], tokenize=False))
    except Exception:  # templates may refuse such a conversation (jinja raise_exception): no end-of-turn known
        return None
    if _SENTINEL not in text:
        return None
    after = tok.encode(text.split(_SENTINEL, 1)[1], add_special_tokens=False)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    return int(after[0]) if after and after[0] in special else None


def generation_tokenizer(tok: PreTrainedTokenizerBase, mode: ChatTemplateMode) -> PreTrainedTokenizerBase:
    """The tokenizer generation code should use under `mode` (`tok` itself when nothing changes).

    none: a copy without a chat template, so `model_input_ids(.., "auto")` builds BOS + prompt.
    Chat template in use whose end-of-turn token is not EOS: a copy whose EOS is that token, so
    generation stops and is cut at the end of the assistant turn.
    """
    if not getattr(tok, "chat_template", None):
        return tok
    if mode == "none":
        plain = copy.deepcopy(tok)  # a shallow copy would share the special-token map
        plain.chat_template = None
        return plain
    eot = end_of_turn_id(tok)
    if eot is None or eot == tok.eos_token_id:
        return tok
    chat = copy.deepcopy(tok)
    chat.eos_token = chat.convert_ids_to_tokens(eot)
    return chat
