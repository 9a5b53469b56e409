"""What every distillation loss receives and returns.

Losses know nothing about distribution or models: they see, for the student and the
teacher, each format ("main" and "aux") restricted to RESPONSE positions and padded
to the batch maximum, plus callables that turn final hidden states into logits.

Formats: "main" is the CoT member of a paired example and the std sample of an
unpaired one; "aux" is the std member of a paired example (all-False mask for rows of
unpaired examples). CE and token-level KD use main only; Cross-CoT OT uses
(S_main, T_main), (S_aux, T_main), (S_main, T_aux).

Position convention (causal LM, after the shift): response position k of a sequence
is an input position t whose NEXT token is a response token. At that position
`inputs[k]` = token at t, `targets[k]` = token at t + 1 (the label), and
`hidden[layer][k]` is the model's state at t (layer 0 = embedding output, layer L =
final-norm output), which is what predicts `targets[k]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cot2align.data.views import ResponseView

FORMATS = ("main", "aux")


@dataclass
class LossInputs:
    """Everything a loss may use for one micro-batch.

    student/teacher: format name ("main", "aux") -> ResponseView; "aux" may be absent
    when no row of the batch is paired.
    `hidden` keys are resolved layer indices 0..L (0 = embedding output, L = final-norm
    output); student_final / teacher_final give each model's L.
    student_logits: [B, N_s, V_s] logits of the student on main response positions
    (with grad), computed once by the trainer.
    student_head / teacher_head: hidden [..., d] -> logits [..., V]; the teacher's is a
    frozen copy of its output layer (teachers never ship logits).
    student_embed / teacher_embed: token ids [...] -> input embeddings [..., d].
    num_tokens: response tokens of the main format in the GLOBAL batch (all accumulation
    steps and data-parallel ranks): token-level terms are sum / num_tokens.
    num_examples: examples in the global batch (the OT term's B).
    """

    student: dict[str, ResponseView]
    teacher: dict[str, ResponseView]
    student_logits: Tensor
    student_final: int
    teacher_final: int
    student_head: Callable[[Tensor], Tensor]
    teacher_head: Callable[[Tensor], Tensor]
    student_embed: Callable[[Tensor], Tensor]
    teacher_embed: Callable[[Tensor], Tensor]
    num_tokens: float
    num_examples: float
    extras: dict[str, object] = field(default_factory=dict)


@dataclass
class LossOutput:
    """total: scalar to backpropagate; parts: named scalars (detached for logging)."""

    total: Tensor
    parts: dict[str, Tensor]


@dataclass
class LossContext:
    """Static facts a loss is built from (dimensions, tokenizers, where to cache)."""

    d_student: int
    d_teacher: int
    vocab_student: int
    vocab_teacher: int
    same_tokenizer: bool
    student_tokenizer: object | None = None
    teacher_tokenizer: object | None = None
    cache_dir: str | None = None


class DistillLoss(nn.Module):
    """Base class: subclasses hold their trainable parts (projectors) as submodules.

    Parameters of a loss module are trained with `loss.projector_lr`.
    """

    #: layers of the student / teacher this loss needs in `hidden` (besides the final one)
    def required_layers(self) -> tuple[list[int], list[int]]:
        """(student layers, teacher layers) needed in ResponseView.hidden; -1 = final."""
        return [-1], [-1]

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class KDTerm(nn.Module):
    """Base of the KD terms (`loss.base` / baseline names): built as Cls(cfg, ctx), called as
    term(inputs) -> (scalar, {part: scalar}); they use the final layer of each side only."""

    def __init__(self, cfg: Any, ctx: LossContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def required_layers(self) -> tuple[list[int], list[int]]:
        """Final layers only."""
        return [-1], [-1]

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError


def masked_token_ce(logits: Tensor, targets: Tensor, mask: Tensor, num_tokens: float) -> Tensor:
    """Cross-entropy summed over masked positions / num_tokens.

    logits [B, N, V], targets [B, N] long, mask [B, N] bool -> scalar.
    """
    flat = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return (flat * mask.reshape(-1).to(flat.dtype)).sum() / max(num_tokens, 1.0)
