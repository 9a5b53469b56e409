"""Cost matrices between student states X [n, d] and projected teacher states Y [m, d].

Every cost takes padded batches X [..., n, d], Y [..., m, d] with masks [..., n], [..., m]
and returns C [..., n, m]. `COSTS` maps the `loss.ot.cost` names to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

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
