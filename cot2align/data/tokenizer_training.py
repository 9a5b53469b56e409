"""Train small tokenizers (byte-level BPE, Unigram, WordPiece) for the embedded task.

The teacher and the student of the embedded task use DIFFERENT tokenizers trained here, so
every cross-tokenizer path of the framework is exercised without downloads. All three kinds
round-trip text exactly (`decode(encode(x)) == x` for text without leading spaces),
newlines and repeated spaces included, because prompts contain "\\n\\n### Response:\\n":

* bpe: GPT-2 style byte-level BPE; spaces become "Ġ", newlines "Ċ"; the full 256-byte
  alphabet is in the vocabulary, so any text encodes without <unk>.
* unigram: SentencePiece-style Unigram over Metaspace pieces ("▁" marks a space; "▁" is
  prepended to the first word and removed again when decoding). Newlines are ordinary
  characters inside pieces; characters never seen in training become <unk>.
* wordpiece: WordPiece with "##" continuations over the same Metaspace pieces (instead of
  BERT's whitespace split, which drops newlines). The decoder strips a leading "##" and maps
  "▁" back to spaces, so it inserts no spaces of its own. A word with a character never seen
  in training becomes a single <unk>.

Digits are split individually by default (`split_digits`), so numbers are sequences of
digit tokens and arithmetic is learnable by tiny models. Training is deterministic: the
same texts give byte-identical `tokenizer.json` files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TokenizerKind = Literal["bpe", "unigram", "wordpiece"]

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
"""Special tokens, in id order 0..3."""

# The fixed strings of the prompt templates of method.md section 2.
STD_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
STD_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
COT_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response with reasoning step by step that appropriately completes the request."
)
COT_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response with reasoning step by step that appropriately completes the request."
)
INSTRUCTION_MARK = "\n\n### Instruction:\n"
INPUT_MARK = "\n\n### Input:\n"
RESPONSE_MARK = "\n\n### Response:\n"
COT_START = "Let's think step by step."
ANSWER_PREFIX = "\nTherefore, the answer is: "
TEMPLATE_STRINGS = (
    STD_HEADER_INPUT,
    STD_HEADER,
    COT_HEADER_INPUT,
    COT_HEADER,
    INSTRUCTION_MARK,
    INPUT_MARK,
    RESPONSE_MARK,
    COT_START,
    ANSWER_PREFIX,
)


def tokenizer_corpus(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Training texts for a task tokenizer: each row as a standard and (if it has a rationale)
    a CoT example, in the prompt formats of method.md section 2, so that prompt words are as
    frequent as they will be in training and tokenize compactly. The template strings are
    yielded once first, so they are covered even for an empty row set.
    """
    yield from TEMPLATE_STRINGS
    for row in rows:
        instruction = str(row.get("instruction", ""))
        input_text = str(row.get("input", "") or "")
        output = str(row.get("output", ""))
        body = INSTRUCTION_MARK + instruction + (INPUT_MARK + input_text if input_text else "") + RESPONSE_MARK
        yield (STD_HEADER_INPUT if input_text else STD_HEADER) + body + output
        rationale = row.get("rationale")
        if rationale:
            header = COT_HEADER_INPUT if input_text else COT_HEADER
            yield header + body + COT_START + "\n" + str(rationale) + ANSWER_PREFIX + output


def _metaspace_pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    """Words with a "▁" space marker; newlines, punctuation and (optionally) digits on their own."""
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ]
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


def _build(kind: TokenizerKind, vocab_size: int, split_digits: bool) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer pipeline of `kind` and its trainer."""
    specials = list(SPECIAL_TOKENS)
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        trainer: trainers.Trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = _metaspace_pre_tokenizer(split_digits)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            unk_token=UNK,
            shrinking_factor=0.75,
            max_piece_length=16,
            n_sub_iterations=2,
            show_progress=False,
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##", max_input_chars_per_word=100))
        tok.pre_tokenizer = _metaspace_pre_tokenizer(split_digits)
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace(Regex("\\A##"), ""),
                decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            ]
        )
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=specials,
            continuing_subword_prefix="##",
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe', 'unigram' or 'wordpiece'")
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str],
    kind: TokenizerKind,
    vocab_size: int,
    out_dir: str | Path,
    *,
    split_digits: bool = True,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a `kind` tokenizer with at most `vocab_size` tokens (special tokens included) on
    `texts`, save it in Hugging Face format under `out_dir` and return it.

    Special tokens: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3. With `add_bos`, encoding
    with `add_special_tokens=True` prepends <s> (Llama style); EOS is never added
    automatically. `split_digits` makes every digit its own token. The vocabulary can come
    out smaller than requested when the corpus has fewer distinct pieces to learn.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if kind == "bpe" and vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok, trainer = _build(kind, vocab_size, split_digits)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf
