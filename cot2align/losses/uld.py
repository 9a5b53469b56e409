"""Universal Logit Distillation (`uld`): closed-form W1 between sorted distributions."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cot2align.losses.base import KDTerm, LossInputs
from cot2align.losses.kd import final_hidden, main_views, token_denominator, up


def aligned_prefix_indices(s_mask: Tensor, t_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the first min(n_s, n_t) response positions of every row, on both sides.

    s_mask [B, N_s], t_mask [B, N_t] bool (left-aligned) -> (s_idx [K], t_idx [K]) long, indexing
    the flattened [B*N_s] / [B*N_t] positions; element k of both refers to the same (row, offset).
    """
    keep = torch.minimum(s_mask.sum(1), t_mask.sum(1))  # [B]
    s_keep = torch.arange(s_mask.shape[1], device=s_mask.device)[None, :] < keep[:, None]
    t_keep = torch.arange(t_mask.shape[1], device=t_mask.device)[None, :] < keep[:, None]
    return s_keep.reshape(-1).nonzero().squeeze(1), t_keep.reshape(-1).nonzero().squeeze(1)


@lru_cache(maxsize=4)
def _sort_pool(workers: int) -> ThreadPoolExecutor:
    """Threads for numpy's partition / sort (they release the GIL), one per torch intra-op thread."""
    return ThreadPoolExecutor(workers, thread_name_prefix="uld-sort")


def _top_ascending_np(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy half of `top_ascending` on rows x [c, V]."""
    v = x.shape[-1]
    if w < v:
        x = np.partition(x, v - w, axis=-1)  # [c, V]: the w largest in the last w columns
    rest = x[:, : v - w].sum(-1) if w < v else np.zeros(x.shape[0], dtype=x.dtype)
    return np.sort(x[:, v - w :], axis=-1), rest


def top_ascending(p: Tensor, w: int) -> tuple[Tensor, Tensor]:
    """(the w largest entries of each row in ascending order [c, w], sum of the other entries [c]).

    p [c, V] with w <= V. Values only (no indices): on CPU through numpy's partition + sort
    (SIMD sorting, ~3x faster than torch.sort, which also builds an index tensor), rows split
    over torch's intra-op thread count; elsewhere torch.sort.
    """
    v = p.shape[-1]
    if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.numel() > 0:
        x = p.detach().numpy()
        workers = min(torch.get_num_threads(), x.shape[0])
        if workers > 1:
            parts = list(_sort_pool(workers).map(lambda r: _top_ascending_np(r, w), np.array_split(x, workers)))
            top, rest = np.concatenate([t for t, _ in parts]), np.concatenate([r for _, r in parts])
        else:
            top, rest = _top_ascending_np(x, w)
        return torch.from_numpy(top), torch.from_numpy(rest)
    s = torch.sort(p.detach(), dim=-1).values
    return s[:, v - w :], s[:, : v - w].sum(-1)


def sign_runs(a_top: Tensor, b_top: Tensor) -> tuple[Tensor, Tensor]:
    """The step function rank -> sign(a_(r) - b_(r)) of two ascending rows, as value thresholds.

    a_top, b_top [c, w] ascending. Returns (thresholds [c, R] ascending, +inf padded; signs
    [c, R]): run k covers the a-values >= thresholds[k] (and < thresholds[k + 1]); the
    gradient of sum_r |a_(r) - b_(r)| at an entry of value x of the row behind a_top is the sign
    of the run x falls in (+1 below thresholds[0]: ranks past the other vocabulary, where
    |a - 0| = a). R is the largest number of sign changes of a row, plus 1 (the two sorted
    curves cross a few times, so this is small).
    """
    s = torch.sign(a_top - b_top)  # [c, w]
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    counts = start.sum(-1)  # [c]
    r = int(counts.max()) if counts.numel() else 0
    thresholds = a_top.new_full((a_top.shape[0], r), float("inf"))
    signs = a_top.new_zeros((a_top.shape[0], r))
    rows, cols = start.nonzero(as_tuple=True)
    slot = torch.cumsum(start, -1)[rows, cols] - 1
    thresholds[rows, slot] = a_top[rows, cols]
    signs[rows, slot] = s[rows, cols]
    return thresholds, signs


def _lookup_signs(p: Tensor, thresholds: Tensor, signs: Tensor) -> Tensor:
    """Per entry of p [c, V], the sign of the `sign_runs` run its value falls in -> [c, V] (signs' dtype)."""
    run = torch.searchsorted(thresholds, p.to(thresholds.dtype).contiguous(), right=True) - 1
    return torch.where(run >= 0, signs.gather(1, run.clamp(min=0)), torch.ones((), dtype=signs.dtype))


class _SortedL1Sum(torch.autograd.Function):
    """sum over chunks of rows idx of flat_s of sum_r |sort(p_S)_r - sort(p_T)_r| (zero padded).

    Forward, per chunk: p_S = softmax(flat_s[idx] / tau) [c, V_S]; the teacher callback gives
    (top w of p_T ascending, sum of the rest); the value and the step function of the
    gradient (`sign_runs`) are kept, nothing of size V. Backward recomputes p_S (cheap) and
    applies the softmax Jacobian to the looked-up signs: the teacher head and the sorts run
    once, never again in backward. When the step function has so many steps that its
    thresholds outweigh one byte per entry, the signs are looked up in forward and kept as
    int8 [chunk, V_S] instead (at most a quarter of the chunk's fp32 logits).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        flat_s: Tensor,
        idx: Tensor,
        teacher: Callable[[int, int, int], tuple[Tensor, Tensor]],
        tau: float,
        chunk: int,
    ) -> Tensor:
        v_s = flat_s.shape[-1]
        total = torch.zeros((), dtype=up(flat_s[:0]).dtype, device=flat_s.device)
        runs: list[tuple[int, int, Tensor, Tensor | None]] = []  # (a, b, thresholds, signs) or (a, b, signs, None)
        for a in range(0, idx.numel(), chunk):
            b = min(a + chunk, idx.numel())
            p_s = F.softmax(up(flat_s[idx[a:b]]) / tau, dim=-1)  # [c, V_S]
            t_top, t_rest = teacher(a, b, v_s)  # [c, w], [c]
            w = t_top.shape[-1]
            s_top, s_rest = top_ascending(p_s, w)  # [c, w], [c]
            t_top, t_rest = t_top.to(s_top), t_rest.to(s_top)
            total = total + ((s_top - t_top).abs().sum() + s_rest.sum() + t_rest.sum()).to(total)
            thresholds, signs = sign_runs(s_top, t_top)
            if thresholds.shape[-1] * (thresholds.element_size() + 1) > v_s:
                # many crossings (near-equal sorted curves): one int8 sign per entry is smaller
                runs.append((a, b, _lookup_signs(p_s, thresholds, signs).to(torch.int8), None))
            else:
                runs.append((a, b, thresholds, signs.to(torch.int8)))
        ctx.save_for_backward(flat_s, idx)
        ctx.runs, ctx.tau = runs, tau
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat_s, idx = ctx.saved_tensors
        grad = torch.zeros_like(flat_s)  # [B*N_s, V_S]: the gradient autograd needs anyway
        for a, b, thresholds, signs in ctx.runs:
            ii = idx[a:b]
            p = F.softmax(up(flat_s[ii]) / ctx.tau, dim=-1)  # [c, V_S]
            g = (thresholds if signs is None else _lookup_signs(p, thresholds, signs)).to(p)  # d/dp_S
            dz = p * (g - (p * g).sum(-1, keepdim=True)) * (grad_out / ctx.tau)
            grad.index_copy_(0, ii, dz.to(grad.dtype))
        return grad, None, None, None, None


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
    empty response on either side contributes 0. tau = loss.uld.temperature, default 1: the ULD
    reference uses no temperature (loss.temperature, the other KD terms' tau, does not apply).

    Cost: only the top w = min(V_S, V_T) entries of each side need sorting (the padded ranks
    past w contribute the plain sum of the rest), values only. The gradient is taken in
    closed form: d/dp_S at rank r is sign(p_S,(r) - p_T,(r)), a step function of p_S's value
    with a few steps, kept per position (`sign_runs`); backward recomputes only p_S. So the
    frozen teacher head and the sorts run once per step (no recomputation in backward);
    cfg.chunk_checkpoint has no effect here.

    Memory: kept positions are processed in chunks of cfg.token_chunk; per chunk one
    [chunk, V_S] and one [chunk, V_T] probability tensor plus their sorted tops exist, none
    kept across chunks. No full [tokens, V] tensor besides inputs.student_logits (owned by the
    trainer) and, in backward, its gradient.

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
        tau = self.cfg.uld.temperature

        def teacher(a: int, b: int, v_s: int) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                p_t = F.softmax(up(inputs.teacher_head(flat_t[t_idx[a:b]])) / tau, dim=-1)  # [c, V_T]
                return top_ascending(p_t, min(v_s, p_t.shape[-1]))

        total = _SortedL1Sum.apply(flat_s, s_idx, teacher, tau, self.cfg.token_chunk)
        uld = total / token_denominator(inputs.num_tokens)
        return uld, {"uld": uld.detach()}
