"""Cost matrices between student states X [n, d] and projected teacher states Y [m, d].

Every cost takes padded batches X [..., n, d], Y [..., m, d] with masks [..., n], [..., m]
and returns C [..., n, m]. `COSTS` maps the `loss.ot.cost` names to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

#: (X [P, n, d], Y [P, m, d], x_mask [P, n], y_mask [P, m]) -> cost [P, n, m]
CostFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
#: `loss.ot.cost_scale`: what each problem's cost is divided by before Sinkhorn (see `cost_scale`)
CostScale = Literal["none", "mean", "spread"]


def attention_cost(
    x: Tensor, y: Tensor, x_mask: Tensor | None = None, y_mask: Tensor | None = None
) -> Tensor:
    """C_ij = 1 - softmax_j(<x_i, y_j> / sqrt(d)) over the valid j only.

    x [..., n, d], y [..., m, d], y_mask [..., m] bool (None = all valid; x_mask is
    unused: rows are independent). Returns C [..., n, m]; entries at invalid j are 1.
    """
    logits = torch.matmul(x, y.transpose(-1, -2)) / math.sqrt(x.shape[-1])  # [..., n, m]
    if y_mask is not None:
        # the dtype's min instead of -inf keeps an all-invalid row finite (uniform)
        logits = logits.masked_fill(~y_mask.unsqueeze(-2), torch.finfo(logits.dtype).min)
    return 1.0 - torch.softmax(logits, dim=-1)


def cosine_cost(x: Tensor, y: Tensor, x_mask: Tensor | None = None, y_mask: Tensor | None = None) -> Tensor:
    """C_ij = 1 - cos(x_i, y_j); x [..., n, d], y [..., m, d] -> C [..., n, m] (masks unused)."""
    eps = torch.finfo(x.dtype).eps
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1.0 - torch.matmul(xn, yn.transpose(-1, -2))


def euclidean_cost(
    x: Tensor, y: Tensor, x_mask: Tensor | None = None, y_mask: Tensor | None = None
) -> Tensor:
    """C_ij = ||x_i - y_j||_2; x [..., n, d], y [..., m, d] -> C [..., n, m] (masks unused).

    Computed as sqrt(|x|^2 + |y|^2 - 2 <x, y>); squared distances below the rounding
    error of that sum count as 0, with gradient 0 there (a subgradient) instead of NaN.
    """
    xx = x.pow(2).sum(-1, keepdim=True)  # [..., n, 1]
    yy = y.pow(2).sum(-1).unsqueeze(-2)  # [..., 1, m]
    sq = xx + yy - 2.0 * torch.matmul(x, y.transpose(-1, -2))  # [..., n, m]
    info = torch.finfo(sq.dtype)
    positive = sq > ((xx + yy) * (8 * info.eps)).detach() + info.tiny
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)


COSTS: dict[str, CostFn] = {
    "attention": attention_cost,
    "cosine": cosine_cost,
    "euclidean": euclidean_cost,
}


class _PackedAttentionCost(torch.autograd.Function):
    """The attention costs of a bucket of problems, padded into one [B, n, m] tensor, from the unpadded states.

    Each problem's product, softmax and their backward run on its own n_j x m_j block (no FLOPs on padding,
    no padded copies of the states); a state shared by several problems of the bucket is read in place and
    its gradient accumulated with one GEMM per problem (addmm into one buffer).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, n_max: int, m_max: int, index: list[tuple[int, int]], num_x: int, *states: Tensor
    ) -> Tensor:
        xs, ys = states[:num_x], states[num_x:]
        scale = 1.0 / math.sqrt(xs[0].shape[1])
        out = xs[0].new_empty(len(index), n_max, m_max)
        zero, one = xs[0].new_zeros(()), xs[0].new_ones(())
        soft: list[Tensor] = []
        for j, (ix, iy) in enumerate(index):
            x, y = xs[ix], ys[iy]
            n, m = x.shape[0], y.shape[0]
            s = torch.softmax(torch.addmm(zero, x, y.t(), beta=0.0, alpha=scale), dim=1)  # [n, m]
            torch.sub(one, s, out=out[j, :n, :m])
            out[j, n:].fill_(1.0)  # padding: finite, ignored by the solver
            out[j, :n, m:].fill_(1.0)
            soft.append(s)
        ctx.soft, ctx.index, ctx.num_x, ctx.scale = soft, index, num_x, scale
        ctx.save_for_backward(*states)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        states = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * len(states)
        need = ctx.needs_input_grad[4:]
        for j, (ix, iy) in enumerate(ctx.index):
            iy = ctx.num_x + iy
            s = ctx.soft[j]
            n, m = s.shape
            # C = 1 - softmax(L): dL = -softmax_backward(dC); the sign and 1/sqrt(d) go into the GEMMs' alpha.
            # At least fp32 (a no-op for fp32 / fp64 states): under bf16 autocast s and states may be bf16
            wide = torch.promote_types(torch.promote_types(grad.dtype, s.dtype), torch.float32)
            dl = torch._softmax_backward_data(grad[j, :n, :m].to(wide), s.to(wide), 1, wide)  # [n, m]
            for i, a, b in ((ix, dl, states[iy]), (iy, dl.t(), states[ix])):
                if need[i]:
                    acc = grads[i]
                    grads[i] = (
                        torch.addmm(a.new_zeros(()), a, b.to(wide), beta=0.0, alpha=-ctx.scale)
                        if acc is None
                        else acc.addmm_(a, b.to(wide), alpha=-ctx.scale)
                    )
        return (None, None, None, None, *(g if g is None else g.to(x.dtype) for g, x in zip(grads, states, strict=True)))


def packed_attention_cost(problems: Sequence[tuple[Tensor, Tensor]], n_max: int, m_max: int) -> Tensor:
    """`attention_cost` of problems (X_j [n_j, d], Y_j [m_j, d]) -> C [B, n_max, m_max], 1 on padding.

    Equal to padding the states and calling `attention_cost` with masks (on the valid blocks), but each
    problem's products run unpadded and states shared between problems (the same tensor object) are
    read once and receive one accumulated gradient.
    """
    slots: dict[int, int] = {}
    unique: list[list[Tensor]] = [[], []]
    index: list[tuple[int, int]] = []
    for x, y in problems:
        pos = []
        for side, t in enumerate((x, y)):
            key = id(t) * 2 + side
            if key not in slots:
                slots[key] = len(unique[side])
                unique[side].append(t)
            pos.append(slots[key])
        index.append((pos[0], pos[1]))
    return _PackedAttentionCost.apply(n_max, m_max, index, len(unique[0]), *unique[0], *unique[1])


#: costs with a packed form (unpadded states in, padded cost out), used by `batched_ot` for (X, Y) problems
PACKED: dict[CostFn, Callable[[Sequence[tuple[Tensor, Tensor]], int, int], Tensor]] = {
    attention_cost: packed_attention_cost,
}


def cost_scale(cost: Tensor, row_mask: Tensor, col_mask: Tensor, mode: CostScale) -> Tensor | None:
    """Per-problem scale s [P] (detached, > 0) of cost [P, n, m] over its valid entries; None for "none".

    mean: the mean cost; spread: the standard deviation of the cost. Solving C / s at epsilon is
    solving C at epsilon * s, so "spread" makes the plan invariant to any affine change of the cost
    (a flat cost, like the attention cost of small embedding states, is stretched to unit spread)
    and "mean" to a rescaling of it. A problem whose scale is 0 (a constant cost) gets s = 1.
    """
    if mode == "none":
        return None
    if mode not in ("mean", "spread"):
        raise ValueError(f"loss.ot.cost_scale: expected none, mean or spread, got {mode!r}")
    with torch.no_grad():
        c = cost.detach()
        valid = (row_mask.unsqueeze(2) & col_mask.unsqueeze(1)).to(c.dtype)  # [P, n, m]
        count = valid.sum((1, 2)).clamp_min(1.0)  # [P]
        mean = (c * valid).sum((1, 2)) / count
        if mode == "mean":
            scale = mean.abs()
        else:
            scale = ((c - mean[:, None, None]).mul_(valid).square_().sum((1, 2)) / count).sqrt_()
        return torch.where(scale > torch.finfo(c.dtype).tiny, scale, torch.ones_like(scale))
