"""The batched, masked Sinkhorn engine against POT, autograd and finite differences (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from loss_fixtures import pot_value
from torch import Tensor

from cot2align.losses import sinkhorn as sk
from cot2align.losses.config import SinkhornConfig
from cot2align.losses.sinkhorn import batched_ot, sinkhorn

F64 = torch.float64
SIZES = [(3, 5), (1, 4), (6, 2), (5, 5)]


def reference_plan(c: Tensor, eps: float, iters: int) -> Tensor:
    """Plain Sinkhorn in POT's order (v first, from uniform u), autograd-differentiable."""
    n, m = c.shape
    k = torch.exp(-c / eps)
    a = torch.full((n,), 1.0 / n, dtype=c.dtype)
    b = torch.full((m,), 1.0 / m, dtype=c.dtype)
    u = torch.ones(n, dtype=c.dtype)
    v = torch.ones(m, dtype=c.dtype)
    for _ in range(iters):
        v = b / (k.T @ u)
        u = a / (k @ v)
    return u[:, None] * k * v[None, :]


def padded(costs: list[Tensor], junk: float = 1e30) -> tuple[Tensor, Tensor, Tensor]:
    """Costs [n_i, m_i] -> padded [P, n, m] (junk on padding), row mask [P, n], col mask [P, m]."""
    n = max(c.shape[0] for c in costs) + 1
    m = max(c.shape[1] for c in costs) + 2
    out = torch.full((len(costs), n, m), junk, dtype=costs[0].dtype)
    rows = torch.zeros(len(costs), n, dtype=torch.bool)
    cols = torch.zeros(len(costs), m, dtype=torch.bool)
    for i, c in enumerate(costs):
        out[i, : c.shape[0], : c.shape[1]] = c
        rows[i, : c.shape[0]] = True
        cols[i, : c.shape[1]] = True
    return out, rows, cols


def random_costs(seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, m, generator=g, dtype=dtype) * scale for n, m in SIZES]


@pytest.mark.parametrize("log_domain", ["never", "always"])
@pytest.mark.parametrize("eps,iters", [(10.0, 1), (1.0, 7), (0.1, 60), (0.05, 25)])
def test_values_and_unrolled_gradients_match_pot(log_domain: str, eps: float, iters: int) -> None:
    costs = random_costs(0, scale=2.0)
    batch, rows, cols = padded(costs)
    batch.requires_grad_(True)
    res = sinkhorn(batch, rows, cols, epsilon=eps, max_iter=iters, log_domain=log_domain)  # type: ignore[arg-type]
    assert res.log_domain == (log_domain == "always")
    assert res.iterations == iters
    weights = torch.arange(1.0, len(costs) + 1, dtype=F64)
    (res.value * weights).sum().backward()
    assert batch.grad is not None
    for i, c in enumerate(costs):
        ref_c = c.clone().requires_grad_(True)
        ref = pot_value(ref_c, eps, iters)
        (ref * weights[i]).backward()
        n, m = c.shape
        torch.testing.assert_close(res.value[i], ref.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batch.grad[i, :n, :m], ref_c.grad, rtol=1e-8, atol=1e-11)
        assert torch.all(batch.grad[i, n:] == 0) and torch.all(batch.grad[i, :, m:] == 0)


@pytest.mark.parametrize("log_domain", ["never", "always"])
def test_plan_and_value_gradients_match_autograd_reference(log_domain: str) -> None:
    eps, iters = 0.3, 12
    costs = random_costs(1)
    batch, rows, cols = padded(costs)
    batch.requires_grad_(True)
    res = sinkhorn(batch, rows, cols, epsilon=eps, max_iter=iters, log_domain=log_domain)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(2)
    plan_w = torch.randn(batch.shape, generator=g, dtype=F64)
    val_w = torch.randn(len(costs), generator=g, dtype=F64)
    ((res.plan * plan_w).sum() + (res.value * val_w).sum()).backward()
    assert batch.grad is not None
    for i, c in enumerate(costs):
        n, m = c.shape
        ref_c = c.clone().requires_grad_(True)
        plan = reference_plan(ref_c, eps, iters)
        ((plan * plan_w[i, :n, :m]).sum() + (plan * ref_c).sum() * val_w[i]).backward()
        torch.testing.assert_close(res.plan[i, :n, :m], plan.detach(), rtol=1e-10, atol=1e-13)
        assert torch.all(res.plan[i, n:] == 0) and torch.all(res.plan[i, :, m:] == 0)
        torch.testing.assert_close(batch.grad[i, :n, :m], ref_c.grad, rtol=1e-8, atol=1e-11)


def directional_fd(fn: Callable[[Tensor], Tensor], c: Tensor, d: Tensor, h: float = 1e-6) -> float:
    """Central finite difference of fn at c along d."""
    return float((fn(c + h * d) - fn(c - h * d)) / (2 * h))


@pytest.mark.parametrize("log_domain", ["never", "always"])
def test_unrolled_gradient_is_derivative_of_reported_value(log_domain: str) -> None:
    eps, iters = 0.4, 6  # far from converged: the unrolled derivative is not P*
    g = torch.Generator().manual_seed(3)
    c = torch.rand(1, 4, 6, generator=g, dtype=F64)
    d = torch.randn(1, 4, 6, generator=g, dtype=F64)

    def value(x: Tensor) -> Tensor:
        return sinkhorn(x, epsilon=eps, max_iter=iters, log_domain=log_domain).value.sum()  # type: ignore[arg-type]

    x = c.clone().requires_grad_(True)
    value(x).backward()
    assert x.grad is not None
    analytic = float((x.grad * d).sum())
    assert analytic == pytest.approx(directional_fd(value, c, d), rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("log_domain", ["never", "always"])
def test_envelope_gradient_is_derivative_of_entropic_objective(log_domain: str) -> None:
    eps = 0.5
    kw = {"epsilon": eps, "max_iter": 5000, "tol": 1e-14, "check_every": 5, "log_domain": log_domain}
    g = torch.Generator().manual_seed(4)
    c = torch.rand(1, 5, 3, generator=g, dtype=F64)
    d = torch.randn(1, 5, 3, generator=g, dtype=F64)

    def entropic(x: Tensor) -> Tensor:
        res = sinkhorn(x, **kw)  # type: ignore[arg-type]
        p = res.plan
        return res.value.sum() + eps * (p * p.log()).sum()

    x = c.clone().requires_grad_(True)
    res = sinkhorn(x, gradient="envelope", **kw)  # type: ignore[arg-type]
    assert res.iterations < 5000
    res.value.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, res.plan.detach())
    envelope = float((x.grad * d).sum())
    assert envelope == pytest.approx(directional_fd(entropic, c, d), rel=1e-6, abs=1e-9)
    # ... and it is only an approximation of the derivative of the reported <P*, C>
    y = c.clone().requires_grad_(True)
    sinkhorn(y, **kw).value.sum().backward()  # type: ignore[arg-type]
    assert y.grad is not None
    assert abs(float((y.grad * d).sum()) - envelope) > 1e-3


@pytest.mark.parametrize("gradient", ["unroll", "envelope"])
@pytest.mark.parametrize("log_domain", ["never", "always"])
def test_padding_changes_nothing(gradient: str, log_domain: str) -> None:
    costs = random_costs(5)
    kw = {"epsilon": 0.2, "max_iter": 30, "gradient": gradient, "log_domain": log_domain}
    batch, rows, cols = padded(costs, junk=-1e30)
    batch.requires_grad_(True)
    res = sinkhorn(batch, rows, cols, **kw)  # type: ignore[arg-type]
    res.value.sum().backward()
    assert batch.grad is not None
    assert torch.isfinite(batch.grad).all()
    for i, c in enumerate(costs):
        n, m = c.shape
        alone = c.clone()[None].requires_grad_(True)
        one = sinkhorn(alone, **kw)  # type: ignore[arg-type]
        one.value.sum().backward()
        assert alone.grad is not None
        torch.testing.assert_close(res.value[i], one.value[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res.plan[i, :n, :m], one.plan[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(batch.grad[i, :n, :m], alone.grad[0], rtol=1e-10, atol=1e-13)


def test_plain_and_log_domain_agree_where_both_are_safe() -> None:
    costs = random_costs(6, scale=2.0)
    batch, rows, cols = padded(costs, junk=0.0)
    grads = []
    for mode in ("never", "always"):
        x = batch.clone().requires_grad_(True)
        res = sinkhorn(x, rows, cols, epsilon=0.01, max_iter=40, log_domain=mode)  # C / eps up to 200
        res.value.sum().backward()
        grads.append((res.value.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-7, atol=1e-10)


def test_auto_mode_picks_log_domain_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    c32 = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(7)) * 2.0
    res = sinkhorn(c32, epsilon=10.0, max_iter=5)
    assert not res.log_domain and res.dtype == torch.float32
    # C / eps up to 200: too wide for plain float32, fine for plain float64
    x = c32.clone().requires_grad_(True)
    res = sinkhorn(x, epsilon=0.01, max_iter=30)
    assert not res.log_domain and res.dtype == F64 and res.value.dtype == torch.float32
    res.value.sum().backward()
    x64 = c32.double().requires_grad_(True)
    res64 = sinkhorn(x64, epsilon=0.01, max_iter=30)
    res64.value.sum().backward()
    torch.testing.assert_close(res.value.double(), res64.value, rtol=1e-6, atol=0.0)
    assert x.grad is not None and x64.grad is not None
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert sinkhorn(c32 * 10, epsilon=0.01, max_iter=5).log_domain  # C / eps up to 2000
    # a column shift is free: large but constant-per-column costs stay on the plain path
    shifted = c32 * 0.01 + torch.arange(7.0) * 100.0
    assert not sinkhorn(shifted, epsilon=0.1, max_iter=5).log_domain
    # if the limit were wrong, the non-finite plain result falls back to the log domain
    monkeypatch.setitem(sk.PLAIN_LIMIT, torch.float32, 1e9)
    wide = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(8)) * 20.0
    res = sinkhorn(wide, epsilon=0.01, max_iter=50)
    assert res.log_domain and torch.isfinite(res.value).all()
    ref = pot_value(wide[0].double(), 0.01, 50, method="sinkhorn_log")
    assert float(res.value[0]) == pytest.approx(float(ref), rel=1e-4)


def test_float32_plain_path_near_its_limit_is_accurate() -> None:
    costs = random_costs(9, scale=2.0, dtype=torch.float32)
    batch, rows, cols = padded(costs, junk=0.0)
    eps = 2.0 / 30.0  # max C / eps just under the float32 limit
    res32 = sinkhorn(batch, rows, cols, epsilon=eps, max_iter=100)
    assert not res32.log_domain
    res64 = sinkhorn(batch.double(), rows, cols, epsilon=eps, max_iter=100)
    torch.testing.assert_close(res32.value.double(), res64.value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("eps", [10.0, 0.5])
def test_truncated_reverse_pass_equals_the_full_one(dtype: torch.dtype, rtol: float, eps: float) -> None:
    batch, rows, cols = padded(random_costs(15), junk=0.0)
    batch = batch.to(dtype)
    weights = torch.tensor([1.0, 1e-8, 3.0, 1e3], dtype=dtype)  # the truncation test is per problem
    grads, steps = [], []
    for truncate in (True, False):
        x = batch.clone().requires_grad_(True)
        res = sinkhorn(x, rows, cols, epsilon=eps, max_iter=100, truncate_backward=truncate)
        (res.value * weights).sum().backward()
        assert x.grad is not None
        grads.append(x.grad)
        steps.append(res.backward_steps)
    assert steps[1] == [100] and steps[0][0] < 30
    for i in range(len(weights)):
        scale = grads[1][i].abs().max()
        assert float((grads[0][i] - grads[1][i]).abs().max()) <= rtol * float(scale)


def test_float32_values_of_large_problems_are_accurate() -> None:
    g = torch.Generator().manual_seed(14)
    c64 = 1.0 - torch.softmax(torch.randn(6, 180, 230, generator=g, dtype=F64) * 3, dim=2)
    rows = torch.ones(6, 180, dtype=torch.bool)
    rows[::2, 150:] = False
    kw = {"epsilon": 10.0, "max_iter": 50}
    ref = sinkhorn(c64, rows, **kw).value  # type: ignore[arg-type]
    res = sinkhorn(c64.float().requires_grad_(True), rows, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(res.value.detach().double(), ref, rtol=2e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("gradient", ["unroll", "envelope"])
@pytest.mark.parametrize("kind", ["unit", "euclidean"])
def test_edge_cases_are_finite_and_correct(dtype: torch.dtype, gradient: str, kind: str) -> None:
    g = torch.Generator().manual_seed(10)
    for n, m in [(1, 1), (1, 7), (7, 1), (6, 9)]:
        for eps in (0.01, 1.0, 10.0):
            if kind == "unit":
                c = torch.rand(n, m, generator=g, dtype=F64) * 2.0
            else:
                x, y = (
                    torch.randn(n, 16, generator=g, dtype=F64),
                    torch.randn(m, 16, generator=g, dtype=F64) * 2,
                )
                c = torch.cdist(x, y)  # ~ 6 .. 15
            x = c.to(dtype)[None].requires_grad_(True)
            res = sinkhorn(x, epsilon=eps, max_iter=200, gradient=gradient)  # type: ignore[arg-type]
            res.value.sum().backward()
            assert x.grad is not None
            assert torch.isfinite(res.value).all() and torch.isfinite(res.plan).all()
            assert torch.isfinite(x.grad).all()
            if n == 1 or m == 1:  # the only coupling: the plan is the product of the marginals
                assert float(res.value[0].detach()) == pytest.approx(float(c.mean()), rel=1e-5)
            ref = pot_value(c, eps, 200, method="sinkhorn_log")
            assert float(res.value[0].detach()) == pytest.approx(
                float(ref), rel=1e-4 if dtype == torch.float32 else 1e-9
            )


def test_empty_problems_give_zero() -> None:
    c = torch.rand(3, 4, 5, dtype=F64, requires_grad=True)
    rows = torch.ones(3, 4, dtype=torch.bool)
    cols = torch.ones(3, 5, dtype=torch.bool)
    rows[1] = False
    cols[2] = False
    res = sinkhorn(c, rows, cols, epsilon=0.5, max_iter=10)
    res.value.sum().backward()
    assert c.grad is not None
    vals = res.value.detach()
    assert float(vals[1]) == 0.0 and float(vals[2]) == 0.0 and float(vals[0]) > 0
    assert torch.all(c.grad[1:] == 0) and torch.all(res.plan[1:] == 0)


def test_early_stopping_meets_tolerance() -> None:
    costs = random_costs(11)
    batch, rows, cols = padded(costs, junk=0.0)
    a, b = rows.double(), cols.double()
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    res = sinkhorn(batch, rows, cols, epsilon=0.1, max_iter=1000, tol=1e-9, check_every=5)
    assert res.iterations < 1000 and res.iterations % 5 == 0
    col_err = (res.plan.sum(1) - b).abs().sum(1)
    assert float(col_err.max()) < 1e-9
    row_err = (res.plan.sum(2) - a).abs().sum(1)
    assert float(row_err.max()) < 1e-12  # the last update is the row scaling
    # without the tolerance the same run goes on to max_iter and agrees
    full = sinkhorn(batch, rows, cols, epsilon=0.1, max_iter=1000)
    assert full.iterations == 1000
    torch.testing.assert_close(res.value, full.value, rtol=1e-8, atol=1e-10)
    # one check interval fewer would not have met it
    short = sinkhorn(batch, rows, cols, epsilon=0.1, max_iter=res.iterations - 5)
    short_err = (short.plan.sum(1) - b).abs().sum(1)
    assert float(short_err.max()) >= 1e-9


def _mixed_problems(seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (1, 1), (0, 4), (8, 3), (5, 6), (2, 9), (7, 7), (3, 0), (1, 5)]
    return [torch.rand(n, m, generator=g, dtype=F64) for n, m in shapes]


@pytest.mark.parametrize("bucket", [1, 3, 100])
@pytest.mark.parametrize("gradient", ["unroll", "envelope"])
def test_batched_ot_equals_a_plain_per_problem_loop(bucket: int, gradient: str) -> None:
    cfg = SinkhornConfig(epsilon=0.3, iterations=40, bucket_size=bucket, gradient=gradient)  # type: ignore[arg-type]
    mats = [c.clone().requires_grad_(True) for c in _mixed_problems(12)]
    res = batched_ot(mats, cfg)
    assert len(res.iterations) == -(-7 // bucket)
    res.values.backward(torch.arange(1.0, len(mats) + 1, dtype=F64))
    for i, c in enumerate(_mixed_problems(12)):
        if c.numel() == 0:
            assert float(res.values[i].detach()) == 0.0
            continue
        ref_c = c.clone().requires_grad_(True)
        ref = pot_value(ref_c, 0.3, 40)
        torch.testing.assert_close(res.values[i], ref.detach(), rtol=1e-9, atol=1e-12)
        if gradient == "unroll":
            (ref * (i + 1)).backward()
            torch.testing.assert_close(mats[i].grad, ref_c.grad, rtol=1e-8, atol=1e-11)
        else:
            plan = reference_plan(c, 0.3, 40)
            torch.testing.assert_close(mats[i].grad, plan * (i + 1), rtol=1e-9, atol=1e-12)


def test_batched_ot_on_states_equals_loop_on_costs() -> None:
    g = torch.Generator().manual_seed(13)
    shapes = [(4, 6), (7, 3), (1, 2), (5, 5), (0, 3), (6, 8)]
    xs = [torch.randn(n, 3, generator=g, dtype=F64, requires_grad=True) for n, _ in shapes]
    ys = [torch.randn(m, 3, generator=g, dtype=F64, requires_grad=True) for _, m in shapes]
    cfg = SinkhornConfig(epsilon=0.5, iterations=25, bucket_size=2)
    res = batched_ot(list(zip(xs, ys)), cfg, cost=lambda x, y, xm, ym: torch.cdist(x, y) ** 2)
    res.values.sum().backward()
    for x, y, v in zip(xs, ys, res.values):
        if x.shape[0] == 0:
            assert float(v.detach()) == 0.0
            continue
        x2 = x.detach().clone().requires_grad_(True)
        y2 = y.detach().clone().requires_grad_(True)
        ref = pot_value(torch.cdist(x2, y2) ** 2, 0.5, 25)
        ref.backward()
        torch.testing.assert_close(v, ref.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(y.grad, y2.grad, rtol=1e-8, atol=1e-11)
