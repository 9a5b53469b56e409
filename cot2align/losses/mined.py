"""MinED (`mined`): KD in the student vocabulary on edit-distance-aligned positions.

The alignment itself (token tables, id map, DTW, DSKD's identity gate) is data and lives in
`cot2align.data.token_alignment`; this module holds the loss computed on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cot2align.data.token_alignment import TokenAligner
from cot2align.losses.base import KDTerm, LossContext, LossInputs
from cot2align.losses.config import LossConfig
from cot2align.losses.kd import chunked_sum, final_hidden, main_views, token_denominator, up


class _TargetKLSum(torch.autograd.Function):
    """sum over chunks of rows idx of flat_s of KL(q || softmax(flat_s[idx] / tau)), q from a callback.

    Forward, per chunk: log q [c, V] = target(a, b) (no grad; entries -inf where q = 0) and the
    KL value; q is kept for backward (the teacher side's one [tokens, V] tensor), so the
    callback (the frozen teacher head) runs once. Backward recomputes softmax(z / tau) per
    chunk: d KL / dz = (sum(q) softmax(z / tau) - q) / tau.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, flat_s: Tensor, idx: Tensor, target: Callable[[int, int], Tensor], tau: float, chunk: int
    ) -> Tensor:
        total = torch.zeros((), dtype=up(flat_s[:0]).dtype, device=flat_s.device)
        kept: list[Tensor] = []
        for a in range(0, idx.numel(), chunk):
            b = min(a + chunk, idx.numel())
            ls = F.log_softmax(up(flat_s[idx[a:b]]) / tau, dim=-1)  # [c, V]
            lq = target(a, b).to(ls.dtype)  # [c, V]
            q = lq.exp()
            total = total + torch.where(q > 0, q * (lq.clamp(min=-1e30) - ls), 0.0).sum()
            kept.append(q)
        ctx.save_for_backward(flat_s, idx, *kept)
        ctx.tau, ctx.chunk = tau, chunk
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat_s, idx, *kept = ctx.saved_tensors
        grad = torch.zeros_like(flat_s)  # [B*N_s, V]: the gradient autograd needs anyway
        for k, q in enumerate(kept):
            ii = idx[k * ctx.chunk : k * ctx.chunk + q.shape[0]]
            p = F.softmax(up(flat_s[ii]) / ctx.tau, dim=-1)  # [c, V]
            dz = (q.sum(-1, keepdim=True) * p - q) * (grad_out / ctx.tau)
            grad.index_copy_(0, ii, dz.to(grad.dtype))
        return grad, None, None, None, None


# ----------------------------------------------------------------------------- the loss
class MinED(KDTerm):
    """MinED KD (Wan et al. 2024, as used by DSKD) for models with different tokenizers.

    For every row with a non-empty response on both sides:
    1. the student target tokens y_0..y_{n-1} and the teacher target tokens y'_0..y'_{m-1}
       (their `targets`, the tokens each position predicts) are turned into alignment strings
       (surface bytes without the "Ġ" / "▁" / word-start space markers) and aligned by
       `dtw_align` (Levenshtein local cost, band cfg.mined.dtw_window characters);
    2. student position i is ALIGNED to teacher position j when the path pairs them one to
       one, (cfg.mined.require_overlap, default on: our refinement) the two tokens' character
       spans in the marker-free texts overlap, and (DSKD's identity gate) the teacher token y'_j
       maps through the id map to exactly the student token y_i (`TokenAligner.align_row`);
    3. target distribution at an aligned i: with p = softmax(z_T[j] / tau) over the teacher
       vocabulary and M the id map, q_v = max_{u : M(u) = v} p_u for v in the image of M,
       0 elsewhere, renormalised to sum 1 (computed in log space: never NaN);
       at any other position: q = one-hot(y_i);
    4. loss at i: KL(q || softmax(z_S[i] / tau)) (= CE at temperature tau for one-hot q).

        MinED = sum_rows sum_i loss_i / num_tokens   (rows empty on either side contribute 0)

    No tau^2 factor. Parts: "mined" (total), "mined_kd" (aligned positions), "mined_onehot"
    (the rest), "aligned_frac" (fraction of local student positions that are aligned).

    The id map (teacher vocab -> student vocab) is built once from the tokenizers in `ctx`
    and cached to cfg.mined.id_map_cache or <ctx.cache_dir>/mined_id_map_<hash>.json.

    Memory and cost: aligned positions are processed in chunks of cfg.token_chunk with one
    [chunk, V_S] student log-prob tensor and one [chunk, V_T] teacher log-prob tensor at a
    time; the mapped targets q are KEPT for backward: one [aligned, V_S] tensor (the teacher
    side's one [tokens, vocab] tensor, in the student vocabulary), so the frozen teacher head
    runs once per step instead of again in backward; backward recomputes only the student
    softmax per chunk. One-hot positions need only a log-sum-exp per row (recomputed under
    cfg.chunk_checkpoint). Besides q, no full [tokens, V] tensor except inputs.student_logits
    (owned by the trainer) and, in backward, its gradient.
    """

    def __init__(self, cfg: LossConfig, ctx: LossContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.student_tokenizer is None or ctx.teacher_tokenizer is None:
            raise ValueError("mined: LossContext.student_tokenizer and .teacher_tokenizer are both required")
        self.aligner = TokenAligner(
            ctx.student_tokenizer, ctx.teacher_tokenizer, ctx.vocab_student, ctx.vocab_teacher,
            Path(cfg.mined.id_map_cache) if cfg.mined.id_map_cache else None,
            cfg.mined.dtw_window, cfg.mined.require_overlap,
            Path(ctx.cache_dir) if ctx.cache_dir else None,
        )
        self.student_table = self.aligner.student_table
        self.teacher_table = self.aligner.teacher_table
        self.cache_path = self.aligner.cache_path
        self.id_map: list[int] = self.aligner.id_map
        self.map_teacher: Tensor
        self.map_student: Tensor
        mapped = self.aligner.mapped_pairs()
        self.register_buffer(
            "map_teacher", torch.tensor([t for t, _ in mapped], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "map_student", torch.tensor([s for _, s in mapped], dtype=torch.long), persistent=False
        )

    def align_row(self, s_targets: list[int], t_targets: list[int]) -> list[tuple[int, int]]:
        """Aligned (student position, teacher position) pairs of one row: `TokenAligner.align_row`."""
        return self.aligner.align_row(s_targets, t_targets)

    def mapped_log_target(self, teacher_logits: Tensor, student_vocab: int) -> Tensor:
        """log q [c, V_S] from teacher logits [c, V_T] (step 3); -inf outside the map's image.

        max_u log p_u = max_u z_u / tau - logsumexp(z / tau): the teacher's normaliser is one
        constant per row and cancels in the renormalisation over the student vocabulary, so only
        the M mapped teacher columns are read ([c, M], no [c, V_T] log-softmax).
        """
        z = teacher_logits
        keep = (self.map_teacher < z.shape[-1]) & (self.map_student < student_vocab)
        src = up(z[:, self.map_teacher[keep]]) / self.cfg.temperature  # [c, M]
        dst = self.map_student[keep][None, :].expand_as(src)
        m = torch.full((z.shape[0], student_vocab), float("-inf"), device=z.device, dtype=src.dtype)
        m = m.scatter_reduce(1, dst, src, reduce="amax", include_self=True)
        return F.log_softmax(m, dim=-1)

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """MinED scalar and its parts; see the class docstring."""
        s_view, t_view = main_views(inputs, "mined")
        logits = inputs.student_logits
        bsz, n_s, v_s = logits.shape
        n_t = t_view.mask.shape[1]
        h_t = final_hidden(t_view, inputs.teacher_final, "mined teacher")
        flat_s = logits.reshape(-1, v_s)  # [B*N_s, V_S]
        flat_t = h_t.reshape(-1, h_t.shape[-1])  # [B*N_t, d_T]
        s_len = s_view.lengths.tolist()
        t_len = t_view.lengths.tolist()
        s_tg = s_view.targets.tolist()
        t_tg = t_view.targets.tolist()
        kd_s: list[int] = []
        kd_t: list[int] = []
        hot = torch.zeros(bsz, n_s, dtype=torch.bool, device=logits.device)
        for b in range(bsz):
            if s_len[b] == 0 or t_len[b] == 0:
                continue
            pairs = self.align_row(s_tg[b][: s_len[b]], t_tg[b][: t_len[b]])
            hot[b, : s_len[b]] = True
            for i, j in pairs:
                kd_s.append(b * n_s + i)
                kd_t.append(b * n_t + j)
                hot[b, i] = False
        dev = logits.device
        s_idx = torch.tensor(kd_s, dtype=torch.long, device=dev)
        t_idx = torch.tensor(kd_t, dtype=torch.long, device=dev)
        tau = self.cfg.temperature

        def target(a: int, b: int) -> Tensor:
            with torch.no_grad():
                return self.mapped_log_target(inputs.teacher_head(flat_t[t_idx[a:b]]), v_s)  # [c, V_S]

        kd_sum = _TargetKLSum.apply(flat_s, s_idx, target, tau, self.cfg.token_chunk)
        hot_idx = hot.reshape(-1).nonzero().squeeze(1)
        y = s_view.targets.reshape(-1)

        def hot_chunk(a: int, b: int) -> Tensor:
            ii = hot_idx[a:b]
            return F.cross_entropy(up(flat_s[ii]) / tau, y[ii], reduction="sum").reshape(1)

        hot_sum = chunked_sum(hot_chunk, hot_idx.numel(), self.cfg.token_chunk, 1, dev, self.cfg.chunk_checkpoint)[0]
        denom = token_denominator(inputs.num_tokens)
        total = (kd_sum + hot_sum) / denom
        local = len(kd_s) + hot_idx.numel()
        frac = torch.tensor(len(kd_s) / local if local else 0.0, device=dev)
        return total, {
            "mined": total.detach(),
            "mined_kd": (kd_sum / denom).detach(),
            "mined_onehot": (hot_sum / denom).detach(),
            "aligned_frac": frac,
        }
