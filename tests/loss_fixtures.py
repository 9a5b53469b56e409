"""Shared builders of random LossInputs for the KD-term tests (a plain module, not a conftest).

`make_case` returns a `Case`: the LossInputs plus the leaf tensors and weights behind them, so
reference implementations in the tests can recompute everything independently (float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ot
import torch
from torch import Tensor, nn

from cot2align.losses.base import LossContext, LossInputs, ResponseView
from cot2align.losses.config import LossConfig

#: value written into padded positions: large but finite garbage a loss must ignore
PAD_GARBAGE = 37.0


@dataclass
class Case:
    """Random inputs for one micro-batch and the tensors they are made of.

    s_hidden [B, N_s, d_s] (leaf, requires grad), s_logits [B, N_s, V_s] (leaf, requires grad),
    t_hidden [B, N_t, d_t]; E_s [V_s, d_s], W_s [V_s, d_s], E_t [V_t, d_t], W_t [V_t, d_t];
    s_len / t_len: response lengths per row.
    """

    inputs: LossInputs
    ctx: LossContext
    s_hidden: Tensor
    s_logits: Tensor
    t_hidden: Tensor
    E_s: Tensor
    W_s: Tensor
    E_t: Tensor
    W_t: Tensor
    s_len: list[int]
    t_len: list[int]
    extra: dict[str, object] = field(default_factory=dict)


def _view(
    hidden: Tensor, lengths: list[int], ids: list[list[int]], final: int, vocab: int, gen: torch.Generator
) -> ResponseView:
    bsz, n = hidden.shape[0], hidden.shape[1]
    mask = torch.zeros(bsz, n, dtype=torch.bool)
    inputs = torch.zeros(bsz, n, dtype=torch.long)
    targets = torch.zeros(bsz, n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = True
        row = ids[b] if ids else torch.randint(0, vocab, (length + 1,), generator=gen).tolist()
        inputs[b, :length] = torch.tensor(row[:length], dtype=torch.long)
        targets[b, :length] = torch.tensor(row[1 : length + 1], dtype=torch.long)
    return ResponseView(hidden={0: hidden, final: hidden}, mask=mask, inputs=inputs, targets=targets)


def make_case(
    *,
    s_len: list[int],
    t_len: list[int] | None = None,
    d_s: int = 6,
    d_t: int = 10,
    v_s: int = 23,
    v_t: int = 31,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    pad_s: int = 2,
    pad_t: int = 1,
    s_ids: list[list[int]] | None = None,
    t_ids: list[list[int]] | None = None,
    same: bool = False,
    logit_scale: float = 3.0,
    student_tokenizer: object | None = None,
    teacher_tokenizer: object | None = None,
    num_tokens: float | None = None,
    num_examples: float | None = None,
) -> Case:
    """Random LossInputs with main views only; see `Case`.

    s_len / t_len: response lengths per row (t_len defaults to s_len); the padded widths are
    max(len) + pad_s / pad_t. s_ids / t_ids: token ids per row (length len + 1: inputs are
    ids[:-1], targets ids[1:]); random when None. same=True makes the teacher share the
    student's vocabulary, lengths and ids (for `kd`). num_tokens defaults to the number of
    student response tokens (+ 3, to check the global denominator is used), num_examples to
    B + 1.
    """
    gen = torch.Generator().manual_seed(seed)
    if same:
        t_len, v_t, t_ids, pad_t = list(s_len), v_s, s_ids, pad_s
    t_len = list(s_len) if t_len is None else t_len
    bsz = len(s_len)
    n_s, n_t = max(s_len, default=0) + pad_s, max(t_len, default=0) + pad_t

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    E_s, W_s = rnd(v_s, d_s), rnd(v_s, d_s, scale=0.7)
    E_t, W_t = rnd(v_t, d_t), rnd(v_t, d_t, scale=0.7)
    s_hidden = rnd(bsz, n_s, d_s)
    t_hidden = rnd(bsz, n_t, d_t)
    s_logits = rnd(bsz, n_s, v_s, scale=logit_scale)
    for b in range(bsz):  # garbage on padding
        s_hidden[b, s_len[b] :] = PAD_GARBAGE
        t_hidden[b, t_len[b] :] = -PAD_GARBAGE
        s_logits[b, s_len[b] :] = PAD_GARBAGE
    if same:
        t_hidden = rnd(bsz, n_s, d_t)
        for b in range(bsz):
            t_hidden[b, t_len[b] :] = -PAD_GARBAGE
    s_hidden.requires_grad_(True)
    s_logits.requires_grad_(True)
    s_view = _view(s_hidden, s_len, s_ids or [], 3, v_s, gen)
    t_view = _view(t_hidden, t_len, t_ids or [], 5, v_t, gen)
    if same and s_ids is None:
        t_view = ResponseView(
            hidden={0: t_hidden, 5: t_hidden}, mask=s_view.mask.clone(), inputs=s_view.inputs.clone(),
            targets=s_view.targets.clone(),
        )
    head = nn.Linear(d_s, v_s, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(W_s)
    inputs = LossInputs(
        student={"main": s_view},
        teacher={"main": t_view},
        student_logits=s_logits,
        student_final=3,
        teacher_final=5,
        student_head=head,
        teacher_head=lambda h: h @ W_t.T,
        student_embed=lambda ids: E_s[ids],
        teacher_embed=lambda ids: E_t[ids],
        num_tokens=float(sum(s_len) + 3) if num_tokens is None else num_tokens,
        num_examples=float(bsz + 1) if num_examples is None else num_examples,
        extras={"student_head_weight": W_s},
    )
    ctx = LossContext(
        d_student=d_s,
        d_teacher=d_t,
        vocab_student=v_s,
        vocab_teacher=v_t,
        same_tokenizer=same,
        student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer,
    )
    return Case(inputs, ctx, s_hidden, s_logits, t_hidden, E_s, W_s, E_t, W_t, list(s_len), list(t_len))


def config(**kw: object) -> LossConfig:
    """LossConfig from dotted-free keyword overrides, e.g. config(name="uld", temperature=1.0)."""
    return LossConfig.from_dict(dict(kw))


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """d loss / d each tensor (zeros where unused)."""
    out = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors)]


def assert_close(a: Tensor, b: Tensor, rtol: float = 1e-7, atol: float = 1e-9, what: str = "") -> None:
    """torch.testing.assert_close in float64 with a label."""
    torch.testing.assert_close(
        a.detach().double(), b.detach().double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Let's think step by step. There are 3 apples and 4 pears, so 7 fruits in total.",
    "Therefore, the answer is: 42.",
    "A student distils knowledge from a teacher with a different tokenizer.",
    "Optimal transport aligns sequences of different lengths without token alignment.",
    "She sold 48 clips in April and half as many in May; altogether 72 clips.",
    "Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input.",
    "naive cafe resume: the tokenizers split these words differently!",
    "Numbers like 1234 and 56.78 are tokenized digit by digit or in groups.",
]


def train_tokenizers() -> tuple[Any, Any]:
    """(student, teacher) PreTrainedTokenizerFast: byte-level BPE (300) vs Metaspace Unigram (~200)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = CORPUS * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    student = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train_from_iterator(
        corpus, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], unk_token="<unk>")
    )
    teacher = PreTrainedTokenizerFast(tokenizer_object=uni, eos_token="</s>", unk_token="<unk>")
    return student, teacher


def uniform_marginals(c: Tensor) -> tuple[Tensor, Tensor]:
    """a = 1/n, b = 1/m for a cost [n, m]."""
    return (torch.full((c.shape[0],), 1.0 / c.shape[0], dtype=c.dtype),
            torch.full((c.shape[1],), 1.0 / c.shape[1], dtype=c.dtype))


def pot_value(c: Tensor, eps: float, iters: int, method: str = "sinkhorn") -> Tensor:
    """POT's <P, C> after exactly `iters` Sinkhorn iterations with uniform marginals (differentiable
    through them): the reference every OT test compares against."""
    a, b = uniform_marginals(c)
    return ot.sinkhorn2(a, b, c, reg=eps, numItermax=iters, stopThr=0.0, method=method, warn=False)
