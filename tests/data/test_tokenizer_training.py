"""Tokenizer training: round trips, digit splitting, sizes, specials, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cot2align.data.embedded import EmbeddedTaskConfig, generate_embedded_task
from cot2align.data.prompts import template_texts
from cot2align.data.tokenizer_training import (
    SPECIAL_TOKENS,
    TokenizerKind,
    _metaspace_pre_tokenizer,
    _word_counts,
    tokenizer_corpus,
    train_tokenizer,
)

KINDS_AND_SIZES: dict[TokenizerKind, int] = {"bpe": 320, "wordpiece": 200, "unigram": 120}
KINDS: tuple[TokenizerKind, ...] = tuple(KINDS_AND_SIZES)
PROMPT = (
    "Below is an instruction that describes a task. Write a response with reasoning step by step "
    "that appropriately completes the request.\n\n### Instruction:\nTom has 15 apples. He buys 7 more "
    "apples. How many apples does Tom have now?\n\n### Response:\nLet's think step by step.\n"
    "Tom starts with 15 apples. He buys 7 more: 15 + 7 = 22.\nTherefore, the answer is: 22"
)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    cfg = EmbeddedTaskConfig(n_train=300, n_dev=10, n_test=10, n_test_long=5)
    return generate_embedded_task(cfg)["train"]


@pytest.fixture(scope="module")
def corpus(rows: list[dict[str, Any]]) -> list[str]:
    return list(tokenizer_corpus(rows))


@pytest.fixture(scope="module")
def tokenizers(
    corpus: list[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PreTrainedTokenizerBase]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: train_tokenizer(corpus, kind, size, root / kind) for kind, size in KINDS_AND_SIZES.items()}


def test_corpus_covers_templates_and_both_formats(rows: list[dict[str, Any]], corpus: list[str]) -> None:
    assert corpus[: len(template_texts())] == template_texts()
    with_rationale = sum(1 for r in rows if r.get("rationale"))
    assert len(corpus) == len(template_texts()) + len(rows) + with_rationale
    assert any("Let's think step by step." in t and "Therefore, the answer is: " in t for t in corpus)
    assert any("### Input:\n" in t for t in corpus)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(
    kind: TokenizerKind, tokenizers: dict[str, PreTrainedTokenizerBase], corpus: list[str]
) -> None:
    tok = tokenizers[kind]
    texts = [PROMPT, "a  b\n\n c", "12 + 305 = 317.\n", "Tom\nhas\n\n\n9", *corpus[::37]]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, (kind, text)
        assert tok.decode(ids) == text, (kind, text)


def test_bpe_round_trips_any_text(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    tok = tokenizers["bpe"]
    text = " leading space, tab\there, ünïcode ✓ and 1,234.5\r\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_digits_are_single_tokens(
    kind: TokenizerKind, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    tok = tokenizers[kind]
    for token in tok.get_vocab():
        if any(c.isdigit() for c in token):
            assert len(token) == 1, (kind, token)
    pieces = tok.convert_ids_to_tokens(tok.encode("He has 125 apples", add_special_tokens=False))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "5"]


def test_digits_can_stay_together(corpus: list[str], tmp_path: Path) -> None:
    tok = train_tokenizer(corpus, "bpe", 2000, tmp_path, split_digits=False)
    assert any(sum(c.isdigit() for c in t) >= 2 for t in tok.get_vocab())


def test_kinds_tokenize_differently(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    encodings = {k: tuple(t.convert_ids_to_tokens(t.encode(PROMPT))) for k, t in tokenizers.items()}
    assert len(set(encodings.values())) == len(encodings)
    assert any(p.startswith("Ġ") for p in encodings["bpe"])
    assert any(p.startswith("▁") for p in encodings["unigram"])
    assert any(p.startswith("##") for p in tokenizers["wordpiece"].get_vocab())


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_and_special_tokens(
    kind: TokenizerKind, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    tok = tokenizers[kind]
    assert len(tok) == KINDS_AND_SIZES[kind]
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == SPECIAL_TOKENS
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok.encode("Tom has 3 apples.")
    assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode("Tom has 3 apples.", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "Tom has 3 apples."


def test_vocab_capped_when_corpus_is_small(corpus: list[str], tmp_path: Path) -> None:
    for kind in KINDS:
        tok = train_tokenizer(corpus[:200], kind, 5000, tmp_path / kind)
        assert len(SPECIAL_TOKENS) < len(tok) <= 5000


def test_no_bos_option(corpus: list[str], tmp_path: Path) -> None:
    tok = train_tokenizer(corpus[:100], "wordpiece", 150, tmp_path, add_bos=False)
    assert tok.encode("Tom has 3") == tok.encode("Tom has 3", add_special_tokens=False)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_reloads_identically(
    kind: TokenizerKind, tokenizers: dict[str, PreTrainedTokenizerBase], corpus: list[str], tmp_path: Path
) -> None:
    again = train_tokenizer(corpus, kind, KINDS_AND_SIZES[kind], tmp_path / "again")
    first = tokenizers[kind]
    assert again.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()  # deterministic training
    loaded = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert loaded.encode(PROMPT) == first.encode(PROMPT)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 3)


def test_saved_files_are_byte_identical(corpus: list[str], tmp_path: Path) -> None:
    for kind in KINDS[1:]:
        train_tokenizer(corpus, kind, 150, tmp_path / "a" / kind)
        train_tokenizer(corpus, kind, 150, tmp_path / "b" / kind)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / "a" / kind / name).read_bytes() == (tmp_path / "b" / kind / name).read_bytes()


def test_word_counts_match_whole_text_pre_tokenization(corpus: list[str]) -> None:
    texts = [*corpus[:50], "", "\n", "\n\n x", " lead\n\n  two  spaces \n", "end\n"]
    pre_tokenizer = _metaspace_pre_tokenizer(split_digits=True)
    direct = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(t))
    assert _word_counts(texts, pre_tokenizer) == direct


def test_invalid_arguments(corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(corpus, "sentencepiece", 100, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, "bpe", 200, tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, "unigram", 4, tmp_path)
