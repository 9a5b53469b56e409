"""Universal Logit Distillation (`uld`): closed-form W1 between sorted distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cot2align.losses.base import KDTerm, LossInputs
from cot2align.losses.kd import chunked_sum, final_hidden, main_views, token_denominator, up


def aligned_prefix_indices(s_mask: Tensor, t_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the first min(n_s, n_t) response positions of every row, on both sides.

    s_mask [B, N_s], t_mask [B, N_t] bool (left-aligned) -> (s_idx [K], t_idx [K]) long, indexing
    the flattened [B*N_s] / [B*N_t] positions; element k of both refers to the same (row, offset).
    """
    keep = torch.minimum(s_mask.sum(1), t_mask.sum(1))  # [B]
    s_keep = torch.arange(s_mask.shape[1], device=s_mask.device)[None, :] < keep[:, None]
    t_keep = torch.arange(t_mask.shape[1], device=t_mask.device)[None, :] < keep[:, None]
    return s_keep.reshape(-1).nonzero().squeeze(1), t_keep.reshape(-1).nonzero().squeeze(1)


def sorted_l1(p_s: Tensor, p_t: Tensor) -> Tensor:
    """sum_i |sort_desc(p_s)_i - sort_desc(p_t)_i| with the shorter side zero-padded: [c, V_a], [c, V_b] -> [c]."""
    a = torch.sort(p_s, dim=-1, descending=True).values
    b = torch.sort(p_t, dim=-1, descending=True).values
    w = min(a.shape[-1], b.shape[-1])
    out = (a[:, :w] - b[:, :w]).abs().sum(-1)
    # past the shorter vocabulary the other side is 0: |x - 0| = x (probabilities are >= 0)
    return out + a[:, w:].sum(-1) + b[:, w:].sum(-1)


class ULD(KDTerm):
    """ULD loss (Boizard et al. 2024) for models with different tokenizers.

    The two responses are aligned at their starts (the views are left-aligned); in row b the
    first K_b = min(n_s[b], n_t[b]) positions are kept. At each kept position k,
    p_S = softmax(student_logits / tau), p_T = softmax(teacher_head(h_T) / tau) are sorted in
    descending order, the shorter vocabulary is zero-padded, and

        ULD = sum_b sum_{k < K_b} sum_i |p_S,(i) - p_T,(i)| / num_tokens

    i.e. the per-position W1 distance under a uniform ground cost, token-normalised by the
    global number of student response tokens (the DSKD code base's batch_denom). This equals
    "averaged over positions and batch" whenever the student side is the shorter one; when
    the teacher response is shorter, student positions past it contribute 0 (they have no
    teacher counterpart) but still count in the denominator, as they do for CE. A row with an
    empty response on either side contributes 0. No temperature is used in the ULD paper:
    set loss.temperature = 1 to reproduce it.

    Memory: kept positions are processed in chunks of cfg.token_chunk; per chunk one
    [chunk, V_S] and one [chunk, V_T] probability tensor plus their sorted copies exist (with
    cfg.chunk_checkpoint they are recomputed in backward). No full [tokens, V] tensor is made
    besides inputs.student_logits (owned by the trainer).

    Returns (uld [], {"uld": uld}).
    """

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """ULD scalar and its parts; see the class docstring."""
        s_view, t_view = main_views(inputs, "uld")
        if s_view.mask.shape[0] != t_view.mask.shape[0]:
            raise ValueError(
                f"uld: student and teacher batches differ ({s_view.mask.shape[0]} vs {t_view.mask.shape[0]} rows)"
            )
        logits = inputs.student_logits
        flat_s = logits.reshape(-1, logits.shape[-1])  # [B*N_s, V_S]
        h_t = final_hidden(t_view, inputs.teacher_final, "uld teacher")
        flat_t = h_t.reshape(-1, h_t.shape[-1])  # [B*N_t, d_T]
        s_idx, t_idx = aligned_prefix_indices(s_view.mask, t_view.mask)
        tau = self.cfg.temperature

        def chunk(a: int, b: int) -> Tensor:
            p_s = F.softmax(up(flat_s[s_idx[a:b]]) / tau, dim=-1)  # [c, V_S]
            with torch.no_grad():
                p_t = F.softmax(up(inputs.teacher_head(flat_t[t_idx[a:b]])) / tau, dim=-1)  # [c, V_T]
            return sorted_l1(p_s, p_t).sum().reshape(1)

        total = chunked_sum(
            chunk, s_idx.numel(), self.cfg.token_chunk, 1, logits.device, self.cfg.chunk_checkpoint
        )
        uld = total[0] / token_denominator(inputs.num_tokens)
        return uld, {"uld": uld.detach()}
