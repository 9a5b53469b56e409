"""MultiLevelOT (Cui et al. AAAI 2025) as a full loss (`multilevel_ot`), docs/method.md section 4."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cot2align.losses.base import DistillLoss, LossContext, LossInputs, LossOutput, masked_token_ce
from cot2align.losses.config import LossConfig
from cot2align.losses.kd import final_hidden, main_views, token_denominator, up

#: added to the per-position logit std before dividing (the reference's 1e-4)
STD_EPS = 1e-4


def std_softmax(logits: Tensor) -> Tensor:
    """softmax(z / (std_V(z) + 1e-4)) over the last dim, std unbiased over the vocabulary: [c, V] -> [c, V].

    A 1-wide vocabulary (std undefined) is treated as std 0.
    """
    z = up(logits)
    std = z.std(dim=-1, keepdim=True) if z.shape[-1] > 1 else torch.zeros_like(z[..., :1])
    return F.softmax(z / (std + STD_EPS), dim=-1)


def pad_columns(x: Tensor, k: int) -> Tensor:
    """Zero-pad [c, w] on the right to [c, k] (w <= k)."""
    return x if x.shape[-1] >= k else F.pad(x, (0, k - x.shape[-1]))


def sinkhorn_cost(w: Tensor, epsilon: float, iterations: int) -> Tensor:
    """<P, W> for the entropic plan of cost W [n, m] with uniform marginals 1/n, 1/m -> [].

    P starts as K = exp(-W / epsilon); each of `iterations` rounds rescales the rows to sum
    1/n, then the columns to sum 1/m (log domain: no underflow). Autograd runs through the
    rounds.
    """
    n, m = w.shape
    log_p = -w / epsilon
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) - math.log(n)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) - math.log(m)
    return (log_p.exp() * w).sum()


class MultiLevelOT(DistillLoss):
    """MultiLevelOT: CE + token_weight * [token terms + sequence_weight * sequence term].

    Per position, on each side: p = softmax(z / (std_V(z) + 1e-4)) (student z =
    inputs.student_logits, teacher z = teacher_head(h_T)), cut to k = top_k columns:
    order "position": the k largest entries of p in descending order (the MultiLevelOT code:
    each position sorted, so the re-order of columns by total mass is the identity);
    order "mass": the k vocabulary columns with the largest total mass over the row's
    positions, in that order (identity kept across positions). Vectors are zero-padded to k
    if a vocabulary is smaller. s_i, t_j in R^k are the results.

    Token level, on the first K_b = min(n_s, n_t) positions of each row (starts aligned):
        L1 = sum_b sum_{i < K_b} sum_k |s_ik - t_ik|
        XE = sum_b sum_{i < K_b} -sum_k softmax(s_i)_k log_softmax(t_i)_k
        token = (L1 + token_ce_weight * XE) / num_tokens
    Sequence level, per row over ALL n_s x n_t position pairs: s'_i = softmax(s_i / T),
    t'_j = softmax(t_j / T) (T = multilevel_ot.temperature), W_ij = ||s'_i - t'_j||_1,
    OT_b = <P, W> with P from `sinkhorn_cost` (epsilon, iterations; uniform marginals so P
    sums to 1: the reference instead rescales rows and columns to sum 1), and, as the
    reference, the per-example values are SUMMED over the micro-batch of B rows:
        sequence = sequence_scale * sum_b OT_b * B / num_examples
    (B / num_examples = 1 / (accumulation steps x data-parallel ranks): the step's gradient is
    then the mean over micro-batches of 1e-3 * sum_b OT_b, which is what the reference's
    DeepSpeed loop averages; with one micro-batch it is exactly 1e-3 * sum_b OT_b).
    CE is the student's token CE on its main response (sum / num_tokens).

    Rows with an empty response on either side contribute 0 to both KD levels.

    Memory: the k-vectors are computed in chunks of loss.token_chunk positions per side
    (one [chunk, V] probability tensor at a time, none kept: only [chunk, k] leaves a
    chunk, and the student chunk is recomputed in backward under loss.chunk_checkpoint);
    order "mass" first sums column masses per row ([B, V] per side, no grad).
    """

    def __init__(self, cfg: LossConfig, ctx: LossContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def required_layers(self) -> tuple[list[int], list[int]]:
        """Final layers only."""
        return [-1], [-1]

    def _mass_columns(
        self, probs: Callable[[Tensor], Tensor], idx: Tensor, width: int, bsz: int, k: int
    ) -> Tensor:
        """[B, min(k, V)] vocabulary columns of largest total mass over each row's positions (no grad)."""
        sums: Tensor | None = None
        with torch.no_grad():
            for a in range(0, idx.numel(), self.cfg.token_chunk):
                ii = idx[a : a + self.cfg.token_chunk]
                p = probs(ii).detach()  # [c, V]
                if sums is None:
                    sums = p.new_zeros(bsz, p.shape[-1])
                sums.index_add_(0, ii // width, p)
        if sums is None:
            return torch.zeros(bsz, 0, dtype=torch.long, device=idx.device)
        return sums.topk(min(k, sums.shape[-1]), dim=-1).indices

    def _vectors(
        self,
        probs: Callable[[Tensor], Tensor],
        idx: Tensor,
        width: int,
        k: int,
        cols: Tensor | None,
        grad: bool,
    ) -> Tensor:
        """[T, k] k-vectors of the flat positions idx (row = idx // width), chunked; see the class doc."""
        chunk = self.cfg.token_chunk
        ckpt = grad and self.cfg.chunk_checkpoint and torch.is_grad_enabled()
        out: list[Tensor] = []
        for a in range(0, idx.numel(), chunk):
            ii = idx[a : a + chunk]

            def one(ii: Tensor = ii) -> Tensor:
                p = probs(ii)  # [c, V]
                if cols is None:
                    v = p.topk(min(k, p.shape[-1]), dim=-1).values
                else:
                    v = p.gather(1, cols[ii // width])
                return pad_columns(v, k)

            part = checkpoint(one, use_reentrant=False) if ckpt else one()
            assert isinstance(part, Tensor)
            out.append(part)
        if not out:
            return torch.zeros(0, k, device=idx.device)
        return torch.cat(out)

    def forward(self, inputs: LossInputs) -> LossOutput:
        """LossOutput(total, parts {"ce", "token_l1", "token_xe", "token", "sequence", "kd"})."""
        mcfg = self.cfg.multilevel_ot
        s_view, t_view = main_views(inputs, "multilevel_ot")
        logits = inputs.student_logits
        bsz = logits.shape[0]
        ce = masked_token_ce(logits, s_view.targets, s_view.mask, inputs.num_tokens)
        flat_z = logits.reshape(-1, logits.shape[-1])  # [B*n, V_S]
        h_t = final_hidden(t_view, inputs.teacher_final, "multilevel_ot teacher")
        flat_h = h_t.reshape(-1, h_t.shape[-1])  # [B*m, d_T]
        s_len, t_len = s_view.lengths, t_view.lengths
        row_ok = (s_len > 0) & (t_len > 0)
        s_idx = (s_view.mask & row_ok[:, None]).reshape(-1).nonzero().squeeze(1)
        t_idx = (t_view.mask & row_ok[:, None]).reshape(-1).nonzero().squeeze(1)
        n_s, n_t = s_view.mask.shape[1], t_view.mask.shape[1]
        k = mcfg.top_k

        def s_probs(ii: Tensor) -> Tensor:
            return std_softmax(flat_z[ii])

        def t_probs(jj: Tensor) -> Tensor:
            with torch.no_grad():
                return std_softmax(inputs.teacher_head(flat_h[jj]))

        s_cols = t_cols = None
        if mcfg.order == "mass":
            s_cols = self._mass_columns(s_probs, s_idx, n_s, bsz, k)
            t_cols = self._mass_columns(t_probs, t_idx, n_t, bsz, k)
        s_vec = self._vectors(s_probs, s_idx, n_s, k, s_cols, grad=True)  # [T_s, k]
        with torch.no_grad():
            t_vec = self._vectors(t_probs, t_idx, n_t, k, t_cols, grad=False)  # [T_t, k]

        l1 = logits.new_zeros((), dtype=torch.float32)
        xe = logits.new_zeros((), dtype=torch.float32)
        seq = logits.new_zeros((), dtype=torch.float32)
        s_counts = s_len.where(row_ok, 0).tolist()
        t_counts = t_len.where(row_ok, 0).tolist()
        s_off = t_off = 0
        for b in range(bsz):
            ns, nt = s_counts[b], t_counts[b]
            if ns == 0 or nt == 0:
                continue
            s_row = s_vec[s_off : s_off + ns]  # [n_s, k]
            t_row = t_vec[t_off : t_off + nt]  # [n_t, k]
            s_off += ns
            t_off += nt
            kept = min(ns, nt)
            l1 = l1 + (s_row[:kept] - t_row[:kept]).abs().sum()
            xe = xe - (F.softmax(s_row[:kept], -1) * F.log_softmax(t_row[:kept], -1)).sum()
            w = torch.cdist(F.softmax(s_row / mcfg.temperature, -1), F.softmax(t_row / mcfg.temperature, -1), p=1)
            seq = seq + sinkhorn_cost(w, mcfg.sinkhorn_epsilon, mcfg.sinkhorn_iterations)
        denom = token_denominator(inputs.num_tokens)
        token = (l1 + mcfg.token_ce_weight * xe) / denom
        sequence = mcfg.sequence_scale * seq * bsz / max(float(inputs.num_examples), 1.0)
        kd = token + mcfg.sequence_weight * sequence
        total = ce + mcfg.token_weight * kd
        parts = {
            "ce": ce.detach(),
            "token_l1": (l1 / denom).detach(),
            "token_xe": (xe / denom).detach(),
            "token": token.detach(),
            "sequence": sequence.detach(),
            "kd": kd.detach(),
        }
        return LossOutput(total, parts)
