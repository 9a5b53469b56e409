"""DSKD's identity gate in the MinED token alignment: a teacher position stands for a student
position only where the teacher token maps to exactly the student's token."""

from __future__ import annotations

import pytest
from loss_fixtures import config, make_case
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from cot2align.data.token_alignment import TokenAligner
from cot2align.losses.mined import MinED

WORDS = ["<unk>", "cat", "cats", "ab", "abc", "12", "1", "dog"]


def _word_tokenizer(words: list[str]) -> Tokenizer:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return tok


@pytest.fixture(scope="module")
def aligner() -> TokenAligner:
    # the teacher's ids are a permutation of the student's, so every teacher token has a student id
    return TokenAligner(_word_tokenizer(WORDS), _word_tokenizer(list(reversed(WORDS))), window=0)


def _sid(word: str) -> int:
    return WORDS.index(word)


def _tid(word: str) -> int:
    return list(reversed(WORDS)).index(word)


@pytest.mark.parametrize("student,teacher", [("cat", "cats"), ("ab", "abc"), ("12", "1"),
                                             ("cats", "cat"), ("abc", "ab"), ("1", "12")])
def test_gate_rejects_overlapping_but_different_tokens(aligner: TokenAligner, student: str, teacher: str) -> None:
    assert aligner.id_map[_tid(teacher)] == _sid(teacher) >= 0  # the teacher token does map
    assert aligner.align_row([_sid(student)], [_tid(teacher)]) == []


def test_gate_keeps_identical_tokens(aligner: TokenAligner) -> None:
    s = [_sid(w) for w in ["dog", "cat", "12"]]
    t = [_tid(w) for w in ["dog", "cats", "12"]]
    assert aligner.align_row(s, t) == [(0, 0), (2, 2)]
    assert aligner.align_row([_sid("cat")], [_tid("cat")]) == [(0, 0)]


def test_mined_loss_uses_the_gate() -> None:
    student, teacher = _word_tokenizer(WORDS), _word_tokenizer(list(reversed(WORDS)))
    case = make_case(s_len=[1], t_len=[1], v_s=len(WORDS), v_t=len(WORDS), student_tokenizer=student,
                     teacher_tokenizer=teacher, s_ids=[[_sid("dog"), _sid("cat")]],
                     t_ids=[[_tid("dog"), _tid("cats")]])
    _, parts = MinED(config(name="mined"), case.ctx)(case.inputs)
    assert float(parts["aligned_frac"]) == 0.0  # the only position falls back to the one-hot gold target
