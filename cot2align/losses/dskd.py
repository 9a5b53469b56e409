"""Dual-Space KD with cross-model attention (`dskd`, Zhang et al. EMNLP 2024), docs/method.md section 4."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cot2align.losses.base import KDTerm, LossContext, LossInputs
from cot2align.losses.config import LossConfig
from cot2align.losses.kd import (
    chunked_sum,
    divergence,
    final_hidden,
    fused_chunk_sum,
    kl_log,
    main_views,
    token_denominator,
    up,
)


def masked_std(x: Tensor, mask: Tensor, scope: str) -> Tensor:
    """Population std of the elements of x [B, N, D] at mask [B, N] positions.

    scope "sequence": one std per row -> [B, 1, 1]; "batch": one for all rows -> [1, 1, 1].
    Rows without positions get 1; the result is floored at 1e-6 (never a division by 0).
    """
    m = mask[..., None]
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    dims = (1, 2) if scope == "sequence" else (0, 1, 2)
    count = (m.sum(dims, keepdim=True) * x.shape[-1]).to(x.dtype)
    mean = xm.sum(dims, keepdim=True) / count.clamp(min=1)
    var = (torch.where(m, x - mean, torch.zeros((), dtype=x.dtype, device=x.device)) ** 2).sum(dims, keepdim=True)
    std = (var / count.clamp(min=1)).sqrt()
    return torch.where(count > 0, std, torch.ones_like(std)).clamp(min=1e-6)


def student_head_params(inputs: LossInputs) -> tuple[Tensor, Tensor | None]:
    """(W_S [V_S, d_S], bias [V_S] or None) of the student's output layer, detached.

    Taken from inputs.extras["student_head_weight"] (and optional "student_head_bias"), which
    the trainer fills; falls back to the weight of inputs.student_head when it is an nn.Linear.
    """
    w = inputs.extras.get("student_head_weight")
    bias = inputs.extras.get("student_head_bias")
    if w is None and isinstance(inputs.student_head, nn.Linear):
        w, bias = inputs.student_head.weight, inputs.student_head.bias
    if not isinstance(w, Tensor):
        raise ValueError(
            "dskd: needs the student's output-layer weight [V_S, d_S]: put it in "
            "LossInputs.extras['student_head_weight'] (t2s logits use it frozen: t2s W_S^T)"
        )
    return w.detach(), bias.detach() if isinstance(bias, Tensor) else None


class DSKD(KDTerm):
    """DSKD-CMA KD term; projectors are trainable members (trained with loss.projector_lr).

    Per row (views restricted to response positions; x / y = student inputs / targets,
    x' / y' = teacher inputs / targets, h_S [n, d_S], h_T [m, d_T] final hidden states,
    E = input embeddings (detached, as in the DSKD code), std() = population std over the
    row's response elements (cfg.dskd.std_scope = "batch": over the micro-batch's)):

        Q   = P_q([E_S(x); E_S(y)])                          [n, 2 d_T]   P_q: 2 d_S -> 2 d_T
        K   = [E_T(x'); E_T(y')] / std([E_T(x'); E_T(y')])   [m, 2 d_T]
        S   = Q K^T / sqrt(2 d_T)                            [n, m]
        A   = softmax over teacher positions j of S          (rows: student positions)
        A'  = softmax over student positions i of S          (columns: the DSKD code's
              softmax(S^T); "A^T" of docs/method.md, each teacher position's weights over students)
        t2s = A P_t2s(h_T / std(h_T) + E_T(y') / std(E_T(y')))          [n, d_S]
        z_t2s = t2s W_S^T (+ b_S), W_S frozen (detached)                 [n, V_S]
        s2t = A'^T P_s2t(h_S)                                            [m, d_T]
        z_s2t = teacher_head(s2t) (frozen teacher output layer)          [m, V_T]

        KD = [ sum_i CE(z_t2s[i], y_i)
             + sum_i 1[argmax z_t2s[i] = y_i] D(softmax(z_t2s[i] / (tau tau_t)) (detached),
                                              softmax(z_S[i] / tau))
             + sum_j KL(softmax(z_T[j] / tau) || softmax(z_s2t[j] / tau)) ] / num_tokens

    D = cfg.kd.divergence (forward KL by default: KL(p_t2s || p_S)), tau = cfg.temperature,
    tau_t = cfg.dskd.teacher_temperature (1), z_S = inputs.student_logits, z_T =
    teacher_head(h_T). The CE term is at temperature 1 and trains P_q and P_t2s; the second
    term trains the student; the third trains the student (through h_S) and P_s2t (A' also
    reaches P_q). Like the DSKD code, no tau^2 factor, and all three sums are divided by the
    student token count (the teacher-side sum included). Rows with an empty response on
    either side contribute 0.

    The student head weight W_S comes from inputs.extras["student_head_weight"] (the trainer
    puts it there) or from inputs.student_head when that is an nn.Linear.

    Memory: the attention maps are [B, n, m]; logits are made in chunks of cfg.token_chunk
    positions: per chunk [chunk, V_S] t2s logits and student log-probs (recomputed in
    backward under cfg.chunk_checkpoint), then [chunk, V_T] s2t and teacher logits. No full
    [tokens, V] tensor besides inputs.student_logits (owned by the trainer).

    Cost: the teacher-vocabulary side is three [tokens, d_T] x [d_T, V_T] products, the floor:
    teacher logits (no grad), s2t logits, and their input gradient, taken inside forward per
    chunk (`fused_chunk_sum`: only the [tokens, d_T] gradient is kept), so the frozen teacher
    head never runs again in backward.
    """

    def __init__(self, cfg: LossConfig, ctx: LossContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.d_student <= 0 or ctx.d_teacher <= 0:
            raise ValueError(f"dskd: needs d_student and d_teacher > 0, got {ctx.d_student}, {ctx.d_teacher}")
        self.d_student = ctx.d_student
        self.d_teacher = ctx.d_teacher
        self.query = nn.Linear(2 * ctx.d_student, 2 * ctx.d_teacher)
        self.t2s = nn.Linear(ctx.d_teacher, ctx.d_student)
        self.s2t = nn.Linear(ctx.d_student, ctx.d_teacher)

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """KD scalar and its parts {"t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc"}; see the class docstring."""
        s_view, t_view = main_views(inputs, "dskd")
        s_mask, t_mask = s_view.mask, t_view.mask  # [B, n], [B, m]
        scope = self.cfg.dskd.std_scope
        h_s_raw = final_hidden(s_view, inputs.student_final, "dskd student")
        h_t_raw = final_hidden(t_view, inputs.teacher_final, "dskd teacher")
        zero = torch.zeros((), device=h_s_raw.device)
        h_s = torch.where(s_mask[..., None], up(h_s_raw), zero)  # [B, n, d_S]
        h_t = torch.where(t_mask[..., None], up(h_t_raw), zero)  # [B, m, d_T]
        with torch.no_grad():
            e_sx = up(inputs.student_embed(s_view.inputs))
            e_sy = up(inputs.student_embed(s_view.targets))
            e_tx = up(inputs.teacher_embed(t_view.inputs))
            e_ty = up(inputs.teacher_embed(t_view.targets))
            q_in = torch.where(s_mask[..., None], torch.cat([e_sx, e_sy], -1), zero)  # [B, n, 2 d_S]
            keys = torch.where(t_mask[..., None], torch.cat([e_tx, e_ty], -1), zero)  # [B, m, 2 d_T]
            keys = keys / masked_std(keys, t_mask, scope)
            e_ty = torch.where(t_mask[..., None], e_ty, zero)
            v_in = h_t / masked_std(h_t, t_mask, scope) + e_ty / masked_std(e_ty, t_mask, scope)
        q = self.query(q_in)  # [B, n, 2 d_T]
        scores = q @ keys.transpose(1, 2) / math.sqrt(2 * self.d_teacher)  # [B, n, m]
        neg = torch.finfo(scores.dtype).min
        a_t2s = torch.softmax(scores.masked_fill(~t_mask[:, None, :], neg), dim=-1)  # over teacher j
        a_s2t = torch.softmax(scores.masked_fill(~s_mask[:, :, None], neg), dim=1)  # over student i
        t2s_h = a_t2s @ self.t2s(v_in)  # [B, n, d_S]
        s2t_h = a_s2t.transpose(1, 2) @ self.s2t(h_s)  # [B, m, d_T]

        row_ok = (s_mask.sum(1) > 0) & (t_mask.sum(1) > 0)  # [B]
        s_idx = (s_mask & row_ok[:, None]).reshape(-1).nonzero().squeeze(1)
        t_idx = (t_mask & row_ok[:, None]).reshape(-1).nonzero().squeeze(1)
        w_s, b_s = student_head_params(inputs)
        logits = inputs.student_logits
        flat_z = logits.reshape(-1, logits.shape[-1])  # [B*n, V_S]
        flat_t2s = t2s_h.reshape(-1, t2s_h.shape[-1])
        flat_y = s_view.targets.reshape(-1)
        flat_s2t = s2t_h.reshape(-1, s2t_h.shape[-1])
        flat_ht = h_t_raw.reshape(-1, h_t_raw.shape[-1])
        tau = self.cfg.temperature
        tau_t = tau * self.cfg.dskd.teacher_temperature
        kd = self.cfg.kd

        def t2s_chunk(a: int, b: int) -> Tensor:
            ii = s_idx[a:b]
            z = up(F.linear(flat_t2s[ii].to(w_s.dtype), w_s, b_s))  # [c, V_S]
            y = flat_y[ii]
            ce = F.cross_entropy(z, y, reduction="sum")
            acc = z.detach().argmax(-1).eq(y)
            ls = F.log_softmax(up(flat_z[ii]) / tau, dim=-1)  # [c, V_S]
            lt = F.log_softmax(z.detach() / tau_t, dim=-1)
            div = divergence(kd.divergence, ls, lt, kd.skew, kd.adaptive_mu)
            kd_sum = (div * acc).sum()
            return torch.stack([ce, kd_sum, acc.sum().to(ce.dtype)])

        def s2t_chunk(x: Tensor, a: int, b: int) -> Tensor:
            z = up(inputs.teacher_head(x.to(h_t_raw.dtype)))  # [c, V_T]; x = flat_s2t[t_idx[a:b]]
            with torch.no_grad():
                lt = F.log_softmax(up(inputs.teacher_head(flat_ht[t_idx[a:b]])) / tau, dim=-1)
            return kl_log(lt, F.log_softmax(z / tau, dim=-1)).sum()

        dev = logits.device
        chunk, ckpt = self.cfg.token_chunk, self.cfg.chunk_checkpoint
        t2s_sums = chunked_sum(t2s_chunk, s_idx.numel(), chunk, 3, dev, ckpt)
        s2t_sum = fused_chunk_sum(s2t_chunk, flat_s2t, t_idx, chunk)
        denom = token_denominator(inputs.num_tokens)
        t2s_ce, t2s_kd, s2t_kd = t2s_sums[0] / denom, t2s_sums[1] / denom, s2t_sum / denom
        total = t2s_ce + t2s_kd + s2t_kd
        acc = t2s_sums[2].detach() / max(s_idx.numel(), 1)
        return total, {
            "t2s_ce": t2s_ce.detach(),
            "t2s_kd": t2s_kd.detach(),
            "s2t_kd": s2t_kd.detach(),
            "t2s_acc": acc,
        }
