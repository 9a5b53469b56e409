"""Entropic optimal transport with uniform marginals over padded, masked batches.

Problem p has n_p valid rows and m_p valid columns inside a padded [n, m] cost; its
marginals are a = 1/n_p on valid rows and b = 1/m_p on valid columns. Sinkhorn runs,
from u = 1, the scaling updates v = b / (K^T u), u = a / (K v) (POT's order), and the
plan is P = diag(u) K diag(v), with K = exp(-C / eps) on valid entries and 0 on padding.

Two numerical paths give the same iterates:
* plain: K is formed once, each half-iteration is one batched row-vector x matrix
  product and one division (K and K^T are both kept so that no product needs a
  column vector, which batched CPU GEMM handles ~10x slower). Columns of C are shifted
  by their minimum first; that leaves every iterate unchanged and each column of K
  then holds a 1, so K^T u never underflows.
* log-domain: the same updates on log u, log v with logsumexp. Several times slower;
  used only when exp(-C / eps) could underflow (`log_domain="auto"`: float32 costs that
  are too wide for plain float32 first go to plain float64), or when forced.

Gradients with respect to C:
* "unroll": the exact derivative of the reported value <P, C> through all iterations
  that ran. On the plain path a hand-written reverse pass over the stored scaling
  vectors replaces autograd: two matrix-vector products per iteration and one batched
  GEMM for the accumulated K gradient, instead of one full-matrix rank-1 update per
  product. Once the iterates have converged the adjoints shrink geometrically; the
  reverse pass stops when they fall below machine precision (`truncate_backward`),
  which changes the result only at rounding level and skips most of the reverse pass
  at the reference eps = 10. On the log-domain path autograd does it.
* "envelope": the iterations run without a graph and dC = P* (Danskin's theorem). That
  is the exact gradient of the entropic objective <P, C> - eps H(P) at convergence, and
  only an approximation of the gradient of the reported <P*, C> (they differ by eps
  times the derivative of the plan entropy; small when eps is small relative to C).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from cot2align.losses.config import SinkhornConfig
from cot2align.losses.costs import COSTS, PACKED, CostFn, CostScale, cost_scale

GradientMode = Literal["unroll", "envelope"]
LogDomainMode = Literal["auto", "always", "never"]

#: Largest max_ij (C_ij - min_i C_ij) / eps for which auto mode keeps the plain path:
#: exp(-limit) and the scaling factors (up to ~exp(+-limit)) stay far from under/overflow.
#: Float32 costs beyond the float32 limit but within the float64 one run plain in float64.
PLAIN_LIMIT: dict[torch.dtype, float] = {torch.float32: 30.0, torch.float64: 230.0}
#: Stand-in for log(0) on padding in the log-domain path (finite, so no inf - inf).
_LOG_ZERO = -1e30


@dataclass
class SinkhornResult:
    """plan: [P, n, m] (0 on padding); value: [P] = <plan, C>; iterations actually run.

    backward_steps: filled by the plain unrolled backward, once it has run, with the
    number of reverse steps it took (fewer than `iterations` when truncated).
    """

    plan: Tensor
    value: Tensor
    iterations: int
    log_domain: bool
    backward_steps: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    """the dtype the iterations ran in (float64 for float32 costs too wide for plain float32)"""
    entropy: Tensor | None = None
    """[P] (detached): H(plan) = -sum P log P over the valid entries, from the scalings (no pass
    over log P); log(n_p m_p) for the product plan, 0 for an empty problem"""


@dataclass
class BatchedOTResult:
    """values: [P] in the order of the problems (0 for empty ones); one entry per bucket in the lists
    (backward_steps: each bucket's `SinkhornResult.backward_steps`, filled once backward has run)."""

    values: Tensor
    iterations: list[int] = field(default_factory=list)
    log_domain: list[bool] = field(default_factory=list)
    bucket_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    backward_steps: list[list[int]] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    entropy_ratio: Tensor | None = None
    """[P] (detached): H(plan) / log(n_p m_p), 1 for the product plan (and a 1 x 1 problem), lower the more
    the plan aligns; 0 for empty problems"""


def sinkhorn(
    cost: Tensor,
    row_mask: Tensor | None = None,
    col_mask: Tensor | None = None,
    *,
    epsilon: float = 10.0,
    max_iter: int = 100,
    tol: float = 0.0,
    check_every: int = 10,
    gradient: GradientMode = "unroll",
    log_domain: LogDomainMode = "auto",
    truncate_backward: bool = True,
) -> SinkhornResult:
    """Solve P entropic OT problems with uniform marginals on their valid entries.

    cost [P, n, m] (float32/float64; lower precisions are computed in float32),
    row_mask [P, n] bool, col_mask [P, m] bool (None = all valid); cost entries on
    padding are ignored but must be finite. A problem without valid rows or columns
    gets a zero plan and value. The iterations stop early when
    the L1 error of the column marginals, checked every `check_every` iterations, is
    below `tol` for every problem (tol = 0: exactly `max_iter` iterations).
    `truncate_backward` (plain path, unroll): end the reverse pass once the adjoints of
    every problem have decayed below machine precision; the skipped terms are below
    rounding error, so the gradient equals the full unroll up to rounding.
    Returns plan [P, n, m], value [P] = <plan, C>, the iterations run and the path used.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be [P, n, m], got shape {tuple(cost.shape)}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter} and {check_every}")
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    num, n, m = cost.shape
    if row_mask is None:
        row_mask = torch.ones(num, n, dtype=torch.bool, device=cost.device)
    if col_mask is None:
        col_mask = torch.ones(num, m, dtype=torch.bool, device=cost.device)
    row_mask, col_mask = row_mask.bool(), col_mask.bool()
    nonempty = row_mask.any(1) & col_mask.any(1)  # [P]
    row_mask = row_mask & nonempty[:, None]
    col_mask = col_mask & nonempty[:, None]
    padded = not (bool(row_mask.all()) and bool(col_mask.all()))
    lengths = _prefix_lengths(row_mask, col_mask) if padded else None
    with torch.no_grad():
        c = cost.detach()
        use_log = log_domain == "always"
        rows = row_mask.to(c.dtype).unsqueeze(2)  # [P, n, 1]
        cols = col_mask.to(c.dtype).unsqueeze(1)  # [P, 1, m]
        if padded and lengths is None:
            # masks are applied by multiplication (mask-fill is several times slower on CPU)
            inf_rows = torch.where(row_mask, 0.0, float("inf")).to(c.dtype).unsqueeze(2)
            colmin = (c + inf_rows).amin(dim=1, keepdim=True)  # [P, 1, m]
            colmin = torch.where(torch.isfinite(colmin), colmin, 0.0)
            log_k = (colmin - c).mul_(rows / epsilon).mul_(cols)  # [P, n, m], <= 0 valid, 0 padding
            reach_t = -log_k.amin() if log_k.numel() > 0 else None
        else:
            # valid entries form the leading n_p x m_p block of each problem: column ranges of the blocks,
            # then log K = (colmin - C) / eps in one pass; padding is zeroed in K (strips, not a mask pass)
            colmin, spread = _column_ranges(c, lengths)  # [P, 1, m], [P]
            log_k = torch.add(colmin / epsilon, c, alpha=-1.0 / epsilon)
            reach_t = spread.amax() / epsilon if spread.numel() > 0 else None
        promote = False
        if log_domain == "auto" and reach_t is not None:
            reach = reach_t.item()
            use_log = reach > PLAIN_LIMIT[c.dtype]
            # plain float64 is still several times faster than the log domain
            promote = use_log and c.dtype == torch.float32 and reach <= PLAIN_LIMIT[torch.float64]
    if promote:
        del log_k
        res = sinkhorn(
            cost.double(),
            row_mask,
            col_mask,
            epsilon=epsilon,
            max_iter=max_iter,
            tol=tol,
            check_every=check_every,
            gradient=gradient,
            log_domain="auto",
            truncate_backward=truncate_backward,
        )
        res.plan, res.value = res.plan.float(), res.value.float()
        res.entropy = None if res.entropy is None else res.entropy.float()
        return res
    if not use_log:
        k = log_k.exp_()
        if lengths is not None:
            _zero_padding(k, lengths)
        elif padded:
            k.mul_(rows).mul_(cols)
        steps: list[int] = []
        plan, value, iters, pot = _plain(
            cost,
            k,
            row_mask,
            col_mask,
            epsilon,
            max_iter,
            tol,
            check_every,
            gradient,
            truncate_backward,
            steps,
        )
        if log_domain == "never" or bool(torch.isfinite(value.detach()).all()):
            u, v = pot
            with torch.no_grad():
                col_sums = torch.bmm(u, k).mul_(v)  # [P, 1, m]: column sums of the plan
                log_u = torch.where(row_mask.unsqueeze(1), u, 1.0).log_()
                log_v = torch.where(col_mask.unsqueeze(1), v, 1.0).log_()
                a = _marginals(row_mask, col_mask, k.dtype)[0].unsqueeze(1)
                entropy = _entropy(a, log_u, col_sums, log_v, colmin, value.detach(), epsilon)
            return SinkhornResult(plan, value, iters, False, steps, k.dtype, entropy)
    plan, value, iters, (log_u, log_v) = _log(
        cost, colmin, row_mask, col_mask, epsilon, max_iter, tol, check_every, gradient
    )
    with torch.no_grad():
        p = plan.detach()
        entropy = _entropy(p.sum(2).unsqueeze(1), log_u, p.sum(1, keepdim=True), log_v, colmin, value.detach(), epsilon)
    return SinkhornResult(plan, value, iters, True, dtype=cost.dtype, entropy=entropy)


def _prefix_lengths(row_mask: Tensor, col_mask: Tensor) -> list[tuple[int, int]] | None:
    """[(n_p, m_p)] when every mask [P, n] / [P, m] is a prefix (valid entries first), else None."""
    n_len, m_len = row_mask.sum(1), col_mask.sum(1)
    if not (
        bool((row_mask == (torch.arange(row_mask.shape[1], device=row_mask.device) < n_len[:, None])).all())
        and bool((col_mask == (torch.arange(col_mask.shape[1], device=col_mask.device) < m_len[:, None])).all())
    ):
        return None
    return list(zip(n_len.tolist(), m_len.tolist()))


def _column_ranges(c: Tensor, lengths: list[tuple[int, int]] | None) -> tuple[Tensor, Tensor]:
    """Column minima over the valid rows, colmin [P, 1, m] (0 on padding), and each problem's largest column
    range max_j (max_i C_ij - min_i C_ij), spread [P], over the leading n_p x m_p blocks (all of C if None)."""
    if lengths is None:
        lo, hi = torch.aminmax(c, dim=1, keepdim=True)
        return lo, (hi - lo).amax((1, 2))
    colmin = c.new_zeros(c.shape[0], 1, c.shape[2])
    spread = c.new_zeros(c.shape[0])
    for p, (n, m) in enumerate(lengths):
        if n > 0 and m > 0:
            lo, hi = torch.aminmax(c[p, :n, :m], dim=0)
            colmin[p, 0, :m] = lo
            spread[p] = (hi - lo).max()
    return colmin, spread


def _zero_padding(k: Tensor, lengths: list[tuple[int, int]]) -> None:
    """Set K [P, n, m] to 0 outside each problem's leading n_p x m_p block, in place."""
    for p, (n, m) in enumerate(lengths):
        k[p, n:].zero_()
        k[p, :n, m:].zero_()


def _entropy(
    row_sums: Tensor, log_u: Tensor, col_sums: Tensor, log_v: Tensor, colmin: Tensor, value: Tensor, epsilon: float
) -> Tensor:
    """H(P) [P] of P = diag(u) K diag(v), K = exp((colmin - C) / eps), from its row sums and log u [P, 1, n],
    column sums and log v [P, 1, m], colmin [P, 1, m] and value <P, C> [P]:
    H = -sum_i r_i log u_i - sum_j c_j (log v_j + colmin_j / eps) + <P, C> / eps (0 on padding)."""
    rows = (row_sums * log_u).sum((1, 2))
    cols = (col_sums * (log_v + colmin / epsilon)).sum((1, 2))
    return value / epsilon - rows - cols


def _marginals(row_mask: Tensor, col_mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """a [P, n], b [P, m]: 1/n_p on valid rows, 1/m_p on valid columns, 0 elsewhere."""
    a = row_mask.to(dtype)
    b = col_mask.to(dtype)
    return a / a.sum(1, keepdim=True).clamp_min(1.0), b / b.sum(1, keepdim=True).clamp_min(1.0)


def _inner(x: Tensor, y: Tensor) -> Tensor:
    """<x_p, y_p> for x, y [P, n, m] -> [P].

    An explicit product and a (cascade) sum: a batched GEMM dot product over n*m entries
    loses ~1e-4 relative accuracy in float32.
    """
    return (x * y).sum((1, 2))


def _plain_loop(
    k: Tensor,
    kt: Tensor,
    a: Tensor,
    b: Tensor,
    pad_row: Tensor,
    pad_col: Tensor,
    max_iter: int,
    tol: float,
    check_every: int,
    store: bool,
) -> tuple[Tensor, Tensor, int, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
    """Scaling iterations on K [P, n, m], K^T [P, m, n]; a, pad_row [P, 1, n]; b, pad_col [P, 1, m].

    pad_row / pad_col are 1 on padding so that padded scalings come out as 0 / 1 = 0.
    Returns u [P, 1, n], v [P, 1, m], iterations run, and if `store` the histories
    U [T+1, P, 1, n] (u_0..u_T), V [T, P, 1, m], R = K v [T, P, 1, n], S = K^T u [T, P, 1, m].
    """
    num, n, m = k.shape
    size = max_iter if store else 1
    hu = k.new_empty(max_iter + 1 if store else 2, num, 1, n)
    hv = k.new_zeros(size, num, 1, m)
    hr = k.new_empty(size, num, 1, n)
    hs = k.new_empty(size, num, 1, m)
    # views made once: indexing the histories inside the loop costs a dispatch per use
    lu, lv, lr, ls = hu.unbind(0), hv.unbind(0), hr.unbind(0), hs.unbind(0)
    u = lu[0].copy_(a != 0)
    v = lv[0]
    done = max_iter
    for t in range(max_iter):
        s = torch.baddbmm(pad_col, u, k, out=ls[t if store else 0])
        if tol > 0 and t > 0 and t % check_every == 0:
            err = (v * s).sub_(b).abs_().sum(-1).amax()
            if err.item() < tol:
                done = t
                break
        v = torch.div(b, s, out=lv[t if store else 0])
        r = torch.baddbmm(pad_row, v, kt, out=lr[t if store else 0])
        u = torch.div(a, r, out=lu[t + 1 if store else (t + 1) % 2])
    history = (hu[: done + 1], hv[:done], hr[:done], hs[:done]) if store else None
    return u, v, done, history


#: the reverse pass checks for decayed adjoints every this many steps
_BACKWARD_CHECK = 2


class _PlainUnrolled(torch.autograd.Function):
    """value [P] and plan [P, n, m] of the plain iterations, with a hand-written unrolled backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        cost: Tensor,
        k: Tensor,
        row_mask: Tensor,
        col_mask: Tensor,
        epsilon: float,
        max_iter: int,
        tol: float,
        check_every: int,
        truncate: bool,
        info: list[int],
        backward_steps: list[int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kt, a, b, pad_row, pad_col = _scaling_inputs(k, row_mask, col_mask)
        u, v, done, hist = _plain_loop(k, kt, a, b, pad_row, pad_col, max_iter, tol, check_every, store=True)
        assert hist is not None
        plan = torch.mul(k, v).mul_(u.transpose(1, 2))  # [P, n, m]
        info.append(done)
        u, v = u.clone(), v.clone()
        ctx.mark_non_differentiable(u, v)
        ctx.epsilon = epsilon
        ctx.truncate = truncate
        ctx.backward_steps = backward_steps
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cost, k, kt, plan, *hist)
        return _inner(plan, cost), plan, u, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, g_value: Tensor | None, g_plan: Tensor | None, *_scalings: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        cost, k, kt, plan, hu, hv, hr, hs = ctx.saved_tensors
        eps: float = ctx.epsilon
        num = cost.shape[0]
        steps = hv.shape[0]
        none = (None,) * 10
        if g_value is None and g_plan is None:
            return (None, *none)
        gv = None if g_value is None else g_value.view(num, 1, 1)
        # dL/dC = gv P - (G * P + K * K_bar) / eps, where G = dL/dP includes the value's own
        # dependence on the plan (gv C) and K_bar is what reaches K through the scalings.
        if g_plan is None:
            assert gv is not None
            w = cost * k  # G * K / gv  [P, n, m]
            grad = torch.addcmul(plan, cost, plan, value=-1.0 / eps).mul_(gv)
        else:
            g = g_plan.clone() if gv is None else torch.addcmul(g_plan, cost, gv)
            w = g * k
            grad = g.mul_(plan).mul_(-1.0 / eps)
            if gv is not None:
                grad.addcmul_(plan, gv)
            del g
        # a matrix-vector product; the column vector keeps the row's strides (transpose, no copy), the layout
        # batched CPU GEMM handles at the row-vector speed
        u_bar = torch.bmm(w, hv[-1].transpose(1, 2)).transpose(1, 2)  # [P, 1, n]
        v_bar = torch.bmm(hu[-1], w)  # [P, 1, m]
        if g_plan is None and gv is not None:
            u_bar.mul_(gv)
            v_bar.mul_(gv)
        del w
        q_u = hu[1:].div(hr).neg_()  # d u_t / d r_t  [T, P, 1, n]
        q_v = hv.div(hs).neg_()  # d v_t / d s_t  [T, P, 1, m]
        r_bar = torch.empty_like(hr)
        s_bar = torch.empty_like(hs)
        cutoff = 4.0 * torch.finfo(k.dtype).eps if ctx.truncate else 0.0
        first = 0
        r_ref = s_ref = hv.new_zeros(num, 1)  # per problem: largest adjoint seen at a check
        for t in range(steps - 1, -1, -1):
            torch.mul(u_bar, q_u[t], out=r_bar[t])
            vb = torch.baddbmm(v_bar, r_bar[t], k) if t == steps - 1 else torch.bmm(r_bar[t], k)
            torch.mul(vb, q_v[t], out=s_bar[t])
            if t == 0:
                break
            if cutoff > 0 and t == steps - 1:
                r_ref = r_bar[t].abs().amax(-1)
                s_ref = s_bar[t].abs().amax(-1)
            u_bar = torch.bmm(s_bar[t], kt)  # adjoint of u_t
            if cutoff > 0 and (steps - t) % _BACKWARD_CHECK == 0:
                # The value is invariant to rescaling u_t, so u_bar is orthogonal to u_t in exact
                # arithmetic; rounding leaves a component along u_t that never decays (eigenvalue 1
                # of the iteration map). Removing it lets the adjoint decay to 0.
                ut = hu[t]
                coef = (u_bar * ut).sum(-1, keepdim=True) / (ut * ut).sum(-1, keepdim=True).clamp_min(1e-300)
                u_bar = u_bar.addcmul_(coef, ut, value=-1.0)
                r_now = r_bar[t].abs().amax(-1)  # [P, 1]
                s_now = s_bar[t].abs().amax(-1)
                r_ref = torch.maximum(r_ref, r_now)
                s_ref = torch.maximum(s_ref, s_now)
                if bool(((r_now <= cutoff * r_ref) & (s_now <= cutoff * s_ref)).all()):
                    first = t
                    break
        # K_bar = sum_t r_bar_t v_t^T + u_t s_bar_t^T over the steps run, as one batched GEMM
        left = torch.cat([r_bar[first:], hu[first:steps]]).squeeze(2).permute(1, 2, 0)  # [P, n, 2T']
        right = torch.cat([hv[first:], s_bar[first:]]).squeeze(2).transpose(0, 1)  # [P, 2T', m]
        grad.addcmul_(k, torch.bmm(left, right), value=-1.0 / eps)
        ctx.backward_steps.append(steps - first)
        return (grad, *none)


def _scaling_inputs(
    k: Tensor, row_mask: Tensor, col_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """K^T [P, m, n], a and pad_row [P, 1, n], b and pad_col [P, 1, m] for `_plain_loop`."""
    kt = k.transpose(1, 2).contiguous()
    a, b = _marginals(row_mask, col_mask, k.dtype)
    pad_row = (~row_mask).to(k.dtype).unsqueeze(1)
    pad_col = (~col_mask).to(k.dtype).unsqueeze(1)
    return kt, a.unsqueeze(1), b.unsqueeze(1), pad_row, pad_col


def _plain(
    cost: Tensor,
    k: Tensor,
    row_mask: Tensor,
    col_mask: Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    check_every: int,
    gradient: GradientMode,
    truncate: bool,
    backward_steps: list[int],
) -> tuple[Tensor, Tensor, int, tuple[Tensor, Tensor]]:
    """Plain-path plan [P, n, m], value [P], iterations and the final scalings u [P, 1, n], v [P, 1, m]
    (detached); K [P, n, m] = exp(-(C - column min) / eps)."""
    if gradient == "unroll" and cost.requires_grad and torch.is_grad_enabled():
        info: list[int] = []
        value, plan, u, v = _PlainUnrolled.apply(
            cost, k, row_mask, col_mask, epsilon, max_iter, tol, check_every, truncate, info, backward_steps
        )
        return plan, value, info[0], (u, v)
    with torch.no_grad():
        kt, a, b, pad_row, pad_col = _scaling_inputs(k, row_mask, col_mask)
        u, v, done, _ = _plain_loop(k, kt, a, b, pad_row, pad_col, max_iter, tol, check_every, store=False)
        plan = torch.mul(k, v).mul_(u.transpose(1, 2))
    return plan, _inner(plan, cost), done, (u, v)


def _log(
    cost: Tensor,
    colmin: Tensor,
    row_mask: Tensor,
    col_mask: Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    check_every: int,
    gradient: GradientMode,
) -> tuple[Tensor, Tensor, int, tuple[Tensor, Tensor]]:
    """Log-domain plan [P, n, m], value [P], iterations and log u [P, 1, n], log v [P, 1, m] (detached,
    0 on padding); autograd unrolls it when gradient="unroll".

    colmin [P, 1, m]: the (iterate-preserving) column shift, which keeps the potentials small.
    """
    track = gradient == "unroll" and cost.requires_grad and torch.is_grad_enabled()
    with torch.set_grad_enabled(track):
        valid = row_mask[:, :, None] & col_mask[:, None, :]
        log_k = torch.where(valid, (colmin - cost) / epsilon, _LOG_ZERO)  # [P, n, m]
        a, b = _marginals(row_mask, col_mask, cost.dtype)
        log_a = torch.where(row_mask, a.log(), _LOG_ZERO)  # [P, n]
        log_b = torch.where(col_mask, b.log(), _LOG_ZERO)  # [P, m]
        f = torch.zeros_like(log_a)
        g = torch.zeros_like(log_b)
        done = max_iter
        for t in range(max_iter):
            lse_rows = torch.logsumexp(log_k + f.unsqueeze(2), dim=1)  # [P, m]
            if tol > 0 and t > 0 and t % check_every == 0:
                with torch.no_grad():
                    err = (g + lse_rows).exp_().sub_(b).abs_().sum(-1).amax()
                if err.item() < tol:
                    done = t
                    break
            g = log_b - lse_rows
            f = log_a - torch.logsumexp(log_k + g.unsqueeze(1), dim=2)
        plan = torch.exp(log_k + f.unsqueeze(2) + g.unsqueeze(1))
    log_u = torch.where(row_mask, f.detach(), 0.0).unsqueeze(1)
    log_v = torch.where(col_mask, g.detach(), 0.0).unsqueeze(1)
    return plan, _inner(plan, cost), done, (log_u, log_v)


class _PadStack(torch.autograd.Function):
    """Matrices [n_i, m_i] -> zero-padded [B, n, m]; the backward hands out views of the gradient."""

    @staticmethod
    def forward(ctx: Any, n: int, m: int, *mats: Tensor) -> Tensor:  # type: ignore[override]
        out = mats[0].new_zeros(len(mats), n, m)
        for j, x in enumerate(mats):
            out[j, : x.shape[0], : x.shape[1]].copy_(x)
        ctx.shapes = [tuple(x.shape) for x in mats]
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        views = [
            grad[j, :n, :m] if ctx.needs_input_grad[j + 2] else None for j, (n, m) in enumerate(ctx.shapes)
        ]
        return (None, None, *views)


def batched_ot(
    problems: Sequence[Tensor] | Sequence[tuple[Tensor, Tensor]],
    cfg: SinkhornConfig,
    cost: str | CostFn | None = None,
    scale: CostScale = "none",
) -> BatchedOTResult:
    """OT values of many problems of different sizes, solved in size-sorted padded buckets.

    problems: either cost matrices C_i [n_i, m_i], or pairs (X_i [n_i, d], Y_i [m_i, d])
    together with `cost` (a name from `cot2align.losses.costs.COSTS` or a CostFn), in which
    case each bucket's cost is computed on the padded [B, n, d] / [B, m, d] states.
    Problems are sorted by n_i * m_i and cut into buckets of `cfg.bucket_size`, so the
    padding and the working set of each bucket stay small. Empty problems (n_i or m_i
    = 0) are not solved and get 0. Returns values [P] in the input order, with gradients
    flowing to C_i (or X_i, Y_i) per `cfg.gradient`, plus per-bucket statistics.
    scale: "none" solves C_i as given; "mean" / "spread" solve C_i / s_i at cfg.epsilon, s_i from
    `cot2align.losses.costs.cost_scale` (held constant in the gradient), and report
    s_i <P_i, C_i / s_i> = <P_i, C_i>: the value stays in the cost's units, only the plan changes.
    """
    mats: list[Tensor] = []
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for prob in problems:
        if isinstance(prob, tuple | list):
            xs.append(prob[0])
            ys.append(prob[1])
        else:
            mats.append(prob)
    if mats and xs:
        raise ValueError("batched_ot: problems must be all cost matrices or all (X, Y) pairs")
    cost_fn: CostFn | None = None
    if xs:
        if cost is None:
            raise ValueError("batched_ot: (X, Y) pairs need a cost")
        if isinstance(cost, str):
            cost_fn = COSTS[cost]
        else:
            cost_fn = cost
        sizes = [(x.shape[0], y.shape[0]) for x, y in zip(xs, ys)]
        ref = xs
    else:
        sizes = [(c.shape[0], c.shape[1]) for c in mats]
        ref = mats
    device = ref[0].device if ref else torch.device("cpu")
    dtype = ref[0].dtype if ref and ref[0].dtype in (torch.float32, torch.float64) else torch.float32
    solved = sorted(
        (i for i, (n, m) in enumerate(sizes) if n > 0 and m > 0), key=lambda i: (sizes[i][0] * sizes[i][1], i)
    )
    result = BatchedOTResult(values=torch.zeros(0, dtype=dtype, device=device))
    chunks: list[Tensor] = []
    ratios: list[Tensor] = []
    for start in range(0, len(solved), cfg.bucket_size):
        idx = solved[start : start + cfg.bucket_size]
        n_max = max(sizes[i][0] for i in idx)
        m_max = max(sizes[i][1] for i in idx)
        n_len = torch.tensor([sizes[i][0] for i in idx], device=device)
        m_len = torch.tensor([sizes[i][1] for i in idx], device=device)
        row_mask = torch.arange(n_max, device=device) < n_len[:, None]  # [B, n]
        col_mask = torch.arange(m_max, device=device) < m_len[:, None]  # [B, m]
        if cost_fn is not None and cost_fn in PACKED:
            c = PACKED[cost_fn]([(xs[i], ys[i]) for i in idx], n_max, m_max)
        elif cost_fn is not None:
            # _PadStack's backward hands out views (pad_sequence's copies the whole padded gradient per problem)
            x = _PadStack.apply(n_max, xs[idx[0]].shape[1], *(xs[i] for i in idx))  # [B, n, d]
            y = _PadStack.apply(m_max, ys[idx[0]].shape[1], *(ys[i] for i in idx))  # [B, m, d]
            c = cost_fn(x, y, row_mask, col_mask)
        else:
            c = _PadStack.apply(n_max, m_max, *(mats[i] for i in idx))
        s = cost_scale(c, row_mask, col_mask, scale)
        if s is not None:
            c = c / s[:, None, None]
        res = sinkhorn(
            c,
            row_mask,
            col_mask,
            epsilon=cfg.epsilon,
            max_iter=cfg.iterations,
            tol=cfg.tolerance,
            check_every=cfg.check_every,
            gradient=cfg.gradient,
            log_domain=cfg.log_domain,
            truncate_backward=cfg.truncate_backward,
        )
        chunks.append(res.value if s is None else res.value * s.to(res.value.dtype))
        assert res.entropy is not None
        log_nm = (n_len * m_len).to(res.entropy.dtype).log()
        ratios.append(torch.where(log_nm > 0, res.entropy / log_nm.clamp_min(1e-30), 1.0))
        result.iterations.append(res.iterations)
        result.log_domain.append(res.log_domain)
        result.bucket_shapes.append((len(idx), n_max, m_max))
        result.backward_steps.append(res.backward_steps)
        result.dtypes.append(res.dtype)
    skipped = [i for i, (n, m) in enumerate(sizes) if n == 0 or m == 0]
    if skipped:
        chunks.append(torch.zeros(len(skipped), dtype=chunks[0].dtype if chunks else dtype, device=device))
        ratios.append(torch.zeros(len(skipped), dtype=chunks[0].dtype, device=device))
    if chunks:
        placed = torch.tensor(solved + skipped, dtype=torch.long)
        inverse = torch.empty_like(placed)
        inverse[placed] = torch.arange(len(placed))
        result.values = torch.cat(chunks).index_select(0, inverse.to(device))
        result.entropy_ratio = torch.cat([r.to(chunks[0].dtype) for r in ratios]).index_select(0, inverse.to(device))
    return result
