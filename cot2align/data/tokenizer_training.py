"""Train small tokenizers (byte-level BPE, Unigram, WordPiece) for the embedded task.

The teacher and the student of the embedded task use DIFFERENT tokenizers trained here, so
every cross-tokenizer path of the framework is exercised without downloads. All three kinds
round-trip text (`decode(encode(x)) == x`), newlines and repeated spaces included, since
prompts contain "\\n\\n### Response:\\n":

* bpe: GPT-2 style byte-level BPE; spaces become "Ġ", newlines "Ċ"; the full 256-byte
  alphabet is in the vocabulary, so any text encodes (no <unk>) and round-trips exactly.
* unigram: SentencePiece-style Unigram over Metaspace words ("▁" marks a space; one "▁" is
  prepended to the text and removed again when decoding), trained by our own deterministic
  Viterbi-EM trainer (see `_train_unigram_pieces` for why not the library's).
* wordpiece: WordPiece with "##" continuations over the same Metaspace words (instead of
  BERT's whitespace split, which loses newlines and spacing). The decoder strips a leading
  "##" and maps "▁" back to spaces; it inserts no spaces of its own.

For unigram and wordpiece, newlines, punctuation and digits are pre-tokens of their own;
a character never seen in training becomes <unk> (a whole word for wordpiece), and one
leading space of a text is not restored by decoding (it is merged with the prepended "▁").
Digits are split individually by default (`split_digits`), so numbers are sequences of digit
tokens and arithmetic is learnable by tiny models. Training is deterministic: the same texts
give byte-identical `tokenizer.json` files.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cot2align.data.jsonl import Example
from cot2align.data.prompts import cot_prompt, cot_target, std_prompt, template_texts

TokenizerKind = Literal["bpe", "unigram", "wordpiece"]

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
"""Special tokens, in id order 0..3."""


def _as_example(row: Mapping[str, Any] | Example) -> Example:
    if isinstance(row, Example):
        return row
    rationale = row.get("rationale")
    return Example(
        id=str(row.get("id", "")),
        instruction=str(row.get("instruction", "")),
        input=str(row.get("input") or ""),
        output=str(row.get("output", "")),
        rationale=None if rationale is None else str(rationale),
    )


def tokenizer_corpus(rows: Iterable[Mapping[str, Any] | Example]) -> Iterator[str]:
    """Training texts for a task tokenizer: the fixed template strings once, then each row
    (a JSONL mapping or an `Example`) as a standard example and, if it has a rationale, a
    CoT example, in the prompt formats of `cot2align.data.prompts`, so prompt words are as
    frequent as in training and tokenize compactly.
    """
    yield from template_texts()
    for row in rows:
        ex = _as_example(row)
        yield std_prompt(ex) + ex.output
        if ex.rationale:
            yield cot_prompt(ex) + cot_target(ex.rationale, ex.output)


def _metaspace_pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    """Words with a "▁" space marker; newlines, punctuation and (optionally) digits on their own."""
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split(Regex("\\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ]
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


def _metaspace_decoder() -> decoders.Decoder:
    return decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)


def _train_bpe(texts: list[str], vocab_size: int, split_digits: bool) -> Tokenizer:
    """GPT-2 style byte-level BPE (deterministic in the tokenizers trainer)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_wordpiece(texts: list[str], vocab_size: int, split_digits: bool) -> Tokenizer:
    """WordPiece over Metaspace words.

    The tokenizers WordPiece trainer numbers the "##x" continuation characters in hash-map
    order, which changes merge tie-breaks from run to run. Registering every "##x" up front
    (sorted, as trainer special tokens) fixes their ids and makes training deterministic;
    the final tokenizer is rebuilt so that only the four real special tokens are special.
    The trainer counts those "##x" twice against its budget, so it gets room for them and
    the tokens past `vocab_size` (the last merges) are cut afterwards.
    """
    pre_tokenizer = _metaspace_pre_tokenizer(split_digits)
    continuations = [
        f"##{c}" for c in sorted({c for word in _word_counts(texts, pre_tokenizer) for c in word[1:]})
    ]
    draft = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    draft.pre_tokenizer = pre_tokenizer
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size + len(continuations),
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *continuations],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    draft.train_from_iterator(texts, trainer=trainer)
    trained = draft.get_vocab(with_added_tokens=True)
    vocab = {token: i for token, i in trained.items() if i < vocab_size}  # ids are contiguous from 0
    tok = Tokenizer(
        models.WordPiece(
            vocab=vocab, unk_token=UNK, continuing_subword_prefix="##", max_input_chars_per_word=100
        )
    )
    tok.pre_tokenizer = pre_tokenizer
    # "\A##": strip the continuation prefix only at the start of a token.
    tok.decoder = decoders.Sequence([decoders.Replace(Regex("\\A##"), ""), _metaspace_decoder()])
    return tok


def _viterbi(word: str, scores: Mapping[str, float], max_len: int) -> tuple[float, list[str]]:
    """Best segmentation of `word` into pieces of `scores` (log-probabilities) and its score.

    Ties keep the longest first piece, so the result is deterministic. Every single character
    of `word` must be in `scores`.
    """
    n = len(word)
    best = [0.0] + [-math.inf] * n
    back = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_len), end):
            score = scores.get(word[start:end])
            if score is not None and best[start] + score > best[end]:
                best[end], back[end] = best[start] + score, start
    pieces: list[str] = []
    end = n
    while end > 0:
        pieces.append(word[back[end] : end])
        end = back[end]
    return best[n], pieces[::-1]


def _log_normalize(counts: Mapping[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {p: math.log(c / total) for p, c in counts.items()}


def _train_unigram_pieces(
    word_counts: Mapping[str, int],
    n_pieces: int,
    max_piece_length: int = 16,
    shrink: float = 0.75,
    em_steps: int = 2,
) -> list[tuple[str, float]]:
    """Unigram LM pieces (Kudo 2018) with hard (Viterbi) EM and loss-based pruning.

    Our own small, deterministic trainer: the tokenizers Unigram trainer is not reproducible
    (float sums in hash-map order) and, on a small corpus with few distinct words, never
    proposes whole words as seeds (only substrings that occur in >= 2 distinct words).
    Seeds: every substring of a word up to `max_piece_length` characters seen >= 2 times;
    each round runs `em_steps` Viterbi re-estimations, then drops the pieces whose removal
    costs the least corpus log-likelihood (`shrink` of them kept per round) until `n_pieces`
    remain. All single characters are always kept; multi-character pieces that no word uses
    in the end are dropped, so the result can be smaller than `n_pieces` on a small corpus.
    Returns (piece, log-prob) sorted by descending score, then by piece.
    """
    char_counts: Counter[str] = Counter()
    sub_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for i, ch in enumerate(word):
            char_counts[ch] += count
            for j in range(i + 2, min(len(word), i + max_piece_length) + 1):
                sub_counts[word[i:j]] += count
    chars = set(char_counts)
    seeds = {p: float(c) for p, c in sub_counts.items() if c >= 2}
    scores = _log_normalize({**{c: float(n) for c, n in char_counts.items()}, **seeds})
    while True:
        for _ in range(em_steps):
            used: Counter[str] = Counter()
            for word, count in word_counts.items():
                for piece in _viterbi(word, scores, max_piece_length)[1]:
                    used[piece] += count
            # Unused pieces keep a small pseudo-count so that they stay below every used one.
            scores = _log_normalize({p: used[p] + 1e-3 for p in scores})
        multi = [p for p in scores if p not in chars]
        if len(scores) <= n_pieces or not multi:
            break
        losses: dict[str, float] = {}
        for piece in multi:
            score = scores.pop(piece)  # re-inserted below: same order every run
            alternative, _ = _viterbi(piece, scores, max_piece_length)
            scores[piece] = score
            losses[piece] = used[piece] * (score - alternative)
        keep = max(n_pieces, int(len(scores) * shrink)) - len(chars)
        kept = set(sorted(multi, key=lambda p: (-losses[p], p))[: max(keep, 0)])
        scores = {p: s for p, s in scores.items() if p in chars or p in kept}
    final = {p: s for p, s in scores.items() if p in chars or used[p] > 0}
    return sorted(((p, round(s, 6)) for p, s in final.items()), key=lambda item: (-item[1], item[0]))


def _word_counts(texts: Iterable[str], pre_tokenizer: pre_tokenizers.PreTokenizer) -> Counter[str]:
    """How often each pre-token (word) of a Metaspace pipeline occurs in `texts`.

    Newlines are isolated pre-tokens, so texts are counted line by line and each distinct
    line is pre-tokenized once (prompt headers repeat thousands of times). A line after a
    newline is pre-tokenized behind a "\\n" so that it gets no "▁" prepended, as in context.
    """
    lines: Counter[tuple[bool, str]] = Counter()
    for text in texts:
        *body, last = text.split("\n")
        lines.update((i == 0, line + "\n") for i, line in enumerate(body))
        lines[(not body, last)] += 1
    counts: Counter[str] = Counter()
    for (is_first, line), n in lines.items():
        words = [w for w, _ in pre_tokenizer.pre_tokenize_str(line if is_first else "\n" + line)]
        if not is_first:
            words = words[words.index("\n") + 1 :]
        for word in words:
            counts[word] += n
    return counts


def _train_unigram(texts: list[str], vocab_size: int, split_digits: bool) -> Tokenizer:
    """SentencePiece-style Unigram over Metaspace words, trained by `_train_unigram_pieces`."""
    pre_tokenizer = _metaspace_pre_tokenizer(split_digits)
    pieces = _train_unigram_pieces(_word_counts(texts, pre_tokenizer), vocab_size - len(SPECIAL_TOKENS))
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + pieces
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = _metaspace_decoder()
    return tok


_TRAINERS = {"bpe": _train_bpe, "unigram": _train_unigram, "wordpiece": _train_wordpiece}


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
    automatically. `split_digits` makes every digit its own token. The vocabulary comes out
    smaller than requested when the corpus has too few distinct pieces to learn (on the
    default embedded task: about 560 for BPE, 395 for WordPiece, 170 for Unigram).
    """
    if kind not in _TRAINERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(_TRAINERS)}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if kind == "bpe" and vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"a byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    tok = _TRAINERS[kind](list(texts), vocab_size, split_digits)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
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
    # Name the generic fast class (transformers 5 writes its own "TokenizersBackend"), so the
    # folder also loads with transformers 4.x; both resolve it to the same tokenizer.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return hf
