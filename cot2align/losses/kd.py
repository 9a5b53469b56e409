"""Same-vocabulary logit KD (`kd`) and the token-chunking helpers the KD terms share.

Divergences, on log-probabilities at temperature tau (p = softmax(z_T / tau) the teacher,
q = softmax(z_S / tau) the student, one vocabulary of size V):

* forward_kl      KL(p || q) = sum_v p_v (log p_v - log q_v)
* reverse_kl      KL(q || p)
* js              0.5 KL(p || m) + 0.5 KL(q || m),  m = (p + q) / 2
* skew_forward_kl KL(p || a p + (1 - a) q),  a = kd.skew (0.1)
* skew_reverse_kl KL(q || a q + (1 - a) p)
* adaptive_kl     AKL (Wu et al. 2024), see `adaptive_kl`.

No tau^2 factor: like the DSKD code base, the divergence at temperature tau is used as is
(so kd_rate keeps the same meaning across temperatures of the paper presets).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from cot2align.data.views import ResponseView
from cot2align.losses.base import KDTerm, LossInputs

#: log-probabilities are clamped here before differences, so 0 * (-inf) never yields NaN
_LOG_FLOOR = -1e30


# ----------------------------------------------------------------------------- shared helpers
def final_hidden(view: ResponseView, layer: int, who: str) -> Tensor:
    """The view's hidden state at resolved layer `layer` ([B, N, d]); clear error when absent."""
    if layer in view.hidden:
        return view.hidden[layer]
    if -1 in view.hidden:
        return view.hidden[-1]
    raise KeyError(f"{who}: hidden state of layer {layer} (final) missing; have layers {sorted(view.hidden)}")


def main_views(inputs: LossInputs, who: str) -> tuple[ResponseView, ResponseView]:
    """(student main view, teacher main view), or a clear error naming the missing one."""
    for side, views in (("student", inputs.student), ("teacher", inputs.teacher)):
        if "main" not in views:
            raise KeyError(f"{who}: LossInputs.{side} has no 'main' view (have {sorted(views)})")
    return inputs.student["main"], inputs.teacher["main"]


def up(x: Tensor) -> Tensor:
    """x in fp32 when it is a half type (bf16 / fp16); fp32 and fp64 pass unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_denominator(num_tokens: float) -> float:
    """The global token count used as denominator (at least 1, like masked_token_ce)."""
    return max(float(num_tokens), 1.0)


def chunked_sum(
    fn: Callable[[int, int], Tensor],
    total: int,
    chunk: int,
    n_parts: int,
    device: torch.device,
    use_checkpoint: bool,
) -> Tensor:
    """sum over chunks [a, b) of range(total) of fn(a, b) -> [n_parts] (fn's dtype).

    With `use_checkpoint` (and autograd on) each chunk runs under activation checkpointing,
    so only one chunk's [chunk, vocab] intermediates exist at a time, in forward and backward.
    Returns fp32 zeros([n_parts]) when total == 0.
    """
    out: Tensor | None = None
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        if use_checkpoint and torch.is_grad_enabled():
            part = checkpoint(fn, start, end, use_reentrant=False)
        else:
            part = fn(start, end)
        assert isinstance(part, Tensor)
        out = part if out is None else out + part
    return torch.zeros(n_parts, device=device, dtype=torch.float32) if out is None else out


class _FusedChunkSum(torch.autograd.Function):
    """sum over chunks of fn(x[idx[a:b]], a, b), with d/dx taken chunk by chunk inside forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, idx: Tensor, fn: Callable[[Tensor, int, int], Tensor], chunk: int
    ) -> Tensor:
        need_grad = x.requires_grad
        grad = torch.zeros_like(x) if need_grad else None  # [T, d]
        total: Tensor | None = None
        for a in range(0, idx.numel(), chunk):
            ii = idx[a : a + chunk]
            xc = x[ii].detach().requires_grad_(need_grad)  # [c, d]
            with torch.enable_grad():
                value = fn(xc, a, a + ii.numel())
            if grad is not None and value.requires_grad:
                (gx,) = torch.autograd.grad(value, xc)
                grad.index_add_(0, ii, gx)
            total = value.detach() if total is None else total + value.detach()
        ctx.save_for_backward(grad)
        return torch.zeros((), dtype=up(x[:0]).dtype, device=x.device) if total is None else total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None


def fused_chunk_sum(fn: Callable[[Tensor, int, int], Tensor], x: Tensor, idx: Tensor, chunk: int) -> Tensor:
    """sum over chunks [a, b) of idx of fn(x[idx[a:b]], a, b) -> [] (fn returns a scalar).

    x [T, d] is a SMALL differentiable input (hidden states, not logits). The gradient with
    respect to each chunk of x is computed right after that chunk's forward and kept ([T, d]
    in all); nothing of the chunk (its [chunk, vocab] tensors) survives it, and backward only
    scales the kept gradient. Unlike activation checkpointing, nothing is recomputed: a frozen
    [chunk, d] x [d, V] product inside fn runs once forward and once for its input gradient.
    Only d/dx is taken: fn must not depend on other tensors that need a gradient (frozen
    heads and no-grad teacher values only).
    """
    out = _FusedChunkSum.apply(x, idx, fn, chunk)
    assert isinstance(out, Tensor)
    return out


def kl_log(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probs [..., V] -> [...]; 0 log 0 = 0."""
    lp_c = lp.clamp(min=_LOG_FLOOR)
    lq_c = lq.clamp(min=_LOG_FLOOR)
    return (lp_c.exp() * (lp_c - lq_c)).sum(-1)


def _log_mix(la: Tensor, lb: Tensor, wa: float) -> Tensor:
    """log(wa * exp(la) + (1 - wa) * exp(lb)), stably; [..., V]."""
    return torch.logaddexp(la + math.log(wa), lb + math.log1p(-wa))


def adaptive_kl(ls: Tensor, lt: Tensor, mu: float) -> Tensor:
    """AKL per position [c] from student / teacher log-probs [c, V].

    Sort the teacher distribution p in descending order (stable). The HEAD is the smallest
    prefix of that order whose teacher mass reaches mu (token of rank r is in the head iff the
    teacher mass of the tokens ranked before it is < mu); the TAIL is the rest.
    g_head = sum_head |p_v - q_v|, g_tail = sum_tail |p_v - q_v| (detached: they are gates),
    AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p),
    with weights 1/2, 1/2 when g_head + g_tail = 0 (then p = q and both KLs are 0).
    """
    with torch.no_grad():
        p = lt.exp()
        q = ls.exp()
        p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        head_sorted = before < mu
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (p - q).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        g_sum = g_head + g_tail
        safe = g_sum > 0
        w_head = torch.where(safe, g_head / torch.where(safe, g_sum, 1.0), 0.5)
        w_tail = torch.where(safe, g_tail / torch.where(safe, g_sum, 1.0), 0.5)
    return w_head * kl_log(lt, ls) + w_tail * kl_log(ls, lt)


def divergence(name: str, ls: Tensor, lt: Tensor, skew: float, mu: float) -> Tensor:
    """Per-position divergence [c] between student log-probs `ls` and teacher log-probs `lt` [c, V].

    name: forward_kl | reverse_kl | js | skew_forward_kl | skew_reverse_kl | adaptive_kl
    (formulas in the module docstring).
    """
    if name == "forward_kl":
        return kl_log(lt, ls)
    if name == "reverse_kl":
        return kl_log(ls, lt)
    if name == "js":
        lm = _log_mix(lt, ls, 0.5)
        return 0.5 * kl_log(lt, lm) + 0.5 * kl_log(ls, lm)
    if name == "skew_forward_kl":
        return kl_log(lt, _log_mix(lt, ls, skew))
    if name == "skew_reverse_kl":
        return kl_log(ls, _log_mix(ls, lt, skew))
    if name == "adaptive_kl":
        return adaptive_kl(ls, lt, mu)
    raise ValueError(
        f"loss.kd.divergence: unknown {name!r}; expected forward_kl, reverse_kl, js, skew_forward_kl, "
        "skew_reverse_kl or adaptive_kl"
    )


# ----------------------------------------------------------------------------- LogitKD
class LogitKD(KDTerm):
    """Token-level KD between two models that share ONE tokenizer (`kd`).

    On every main response position (student and teacher masks must be identical: the same
    tokenizer yields the same positions), with p_T = softmax(teacher_head(h_T) / tau) and
    p_S = softmax(student_logits / tau):

        KD = sum_{b, k in response} D(p_T[b, k], p_S[b, k]) / num_tokens

    D = cfg.kd.divergence (module docstring); no tau^2 factor. If the two logit widths differ
    (same tokenizer, embedding matrices padded differently) only the first min(V_S, V_T)
    columns are used: ids past the tokenizer's size are never targets.

    Memory and cost: positions are processed in chunks of cfg.token_chunk; per chunk one
    [chunk, V] student log-prob tensor and one [chunk, V] teacher log-prob tensor exist (AKL
    adds its sort buffers). The teacher log-probs are computed once, outside the checkpointed
    student part, and kept for backward: one [tokens, V] tensor on the teacher side, so the
    frozen teacher head (a [tokens, d_T] x [d_T, V] product) never runs again in backward.
    With cfg.chunk_checkpoint the student side of each chunk is recomputed in backward instead
    of kept. Besides those, the only full [tokens, V] tensor is inputs.student_logits, which
    the trainer owns (and, in backward, its gradient).

    Returns (kd [], {"kd": kd}).
    """

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """KD scalar and its parts; see the class docstring."""
        s_view, t_view = main_views(inputs, "kd")
        if s_view.mask.shape != t_view.mask.shape or not torch.equal(s_view.mask, t_view.mask):
            raise ValueError(
                "kd: student and teacher main response masks differ (shapes "
                f"{tuple(s_view.mask.shape)} vs {tuple(t_view.mask.shape)}); 'kd' needs one shared "
                "tokenizer so that response positions coincide; use uld, mined or dskd otherwise"
            )
        logits = inputs.student_logits
        flat_s = logits.reshape(-1, logits.shape[-1])  # [B*N, V_S]
        h_t = final_hidden(t_view, inputs.teacher_final, "kd teacher")
        flat_t = h_t.reshape(-1, h_t.shape[-1])  # [B*N, d_T]
        idx = s_view.mask.reshape(-1).nonzero().squeeze(1)  # [T]
        tau = self.cfg.temperature
        kcfg = self.cfg.kd

        def student(ii: Tensor, lt: Tensor) -> Tensor:
            ls = F.log_softmax(up(flat_s[ii, : lt.shape[-1]]) / tau, dim=-1)  # [c, width]
            return divergence(kcfg.divergence, ls, lt, kcfg.skew, kcfg.adaptive_mu).sum().reshape(1)

        def chunk(a: int, b: int) -> Tensor:
            ii = idx[a:b]
            with torch.no_grad():
                zt = up(inputs.teacher_head(flat_t[ii]))  # [c, V_T]
                lt = F.log_softmax(zt[:, : flat_s.shape[-1]] / tau, dim=-1)  # [c, min(V_S, V_T)]
            if self.cfg.chunk_checkpoint and torch.is_grad_enabled():
                out = checkpoint(student, ii, lt, use_reentrant=False)
                assert isinstance(out, Tensor)
                return out
            return student(ii, lt)

        total = chunked_sum(chunk, idx.numel(), self.cfg.token_chunk, 1, logits.device, False)
        kd = total[0] / token_denominator(inputs.num_tokens)
        return kd, {"kd": kd.detach()}
