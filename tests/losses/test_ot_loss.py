"""Costs and the Cross-CoT OT term against a plain per-example loop over POT (method.md section 3)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import ot
import pytest
import torch
from loss_fixtures import pot_value, uniform_marginals
from torch import Tensor

from cot2align.configbase import ConfigError
from cot2align.losses.base import LossContext, LossInputs, ResponseView
from cot2align.losses.config import LossConfig, OTConfig, SinkhornConfig
from cot2align.losses.costs import attention_cost, cosine_cost, euclidean_cost, packed_attention_cost
from cot2align.losses.ot import CrossCoTOT
from cot2align.losses.registry import build_loss
from cot2align.losses.sinkhorn import batched_ot

F64 = torch.float64
D_S, D_T = 6, 10
S_FINAL, T_FINAL = 2, 3


def _view(lengths: list[int], d: int, layers: list[int], g: torch.Generator, grad: bool) -> ResponseView:
    n = max(lengths) + 2
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    hidden = {
        layer: (torch.randn(len(lengths), n, d, generator=g, dtype=F64) * (1 + layer)).requires_grad_(grad)
        for layer in layers
    }
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    return ResponseView(hidden=hidden, mask=mask, inputs=ids, targets=ids)


def make_inputs(
    seed: int,
    main: list[tuple[int, int]],
    aux: list[tuple[int, int]] | None,
    num_examples: float = 5.0,
) -> LossInputs:
    """Views for rows with (student, teacher) response lengths; aux (0, 0) marks an unpaired row."""
    g = torch.Generator().manual_seed(seed)
    student = {"main": _view([s for s, _ in main], D_S, [0, S_FINAL], g, True)}
    teacher = {"main": _view([t for _, t in main], D_T, [0, T_FINAL], g, False)}
    if aux is not None:
        student["aux"] = _view([s for s, _ in aux], D_S, [0, S_FINAL], g, True)
        teacher["aux"] = _view([t for _, t in aux], D_T, [0, T_FINAL], g, False)
    n_main = student["main"].mask.shape[1]

    def ident(x: Tensor) -> Tensor:
        return x

    return LossInputs(
        student=student,
        teacher=teacher,
        student_logits=torch.zeros(len(main), n_main, 7, dtype=F64, requires_grad=True),
        student_final=S_FINAL,
        teacher_final=T_FINAL,
        student_head=ident,
        teacher_head=ident,
        student_embed=ident,
        teacher_embed=ident,
        num_tokens=float(sum(s for s, _ in main)),
        num_examples=num_examples,
    )


def reference_cost(name: str, x: Tensor, y: Tensor) -> Tensor:
    """The method.md formulas on unpadded X [n, d], Y [m, d]."""
    if name == "attention":
        return 1.0 - torch.softmax(x @ y.T / math.sqrt(x.shape[1]), dim=1)
    if name == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)
    return torch.cdist(x, y)


def pot_entropy_ratio(c: Tensor, eps: float, iters: int) -> float:
    """H(P) / log(nm) of POT's plan after exactly `iters` iterations."""
    a, b = uniform_marginals(c)
    p = ot.sinkhorn(a, b, c.detach(), reg=eps, numItermax=iters, stopThr=0.0, warn=False)
    return float(-torch.special.xlogy(p, p).sum() / math.log(c.numel()))


def reference_loss(module: CrossCoTOT, inputs: LossInputs, cfg: OTConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Loop over examples, pairs and layers, one POT problem each; parts as CrossCoTOT names them, with the
    plan entropy parts "entropy/<name>" = mean H(P) / log(nm) over the problems x rows / num_examples."""
    pairs = {("main", "main"): "main_main"}
    if cfg.cross_pairs and "aux" in inputs.student:
        pairs.update({("aux", "main"): "aux_main", ("main", "aux"): "main_aux"})
    total = torch.zeros((), dtype=F64)
    parts: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=F64))
    ratios: dict[str, list[float]] = defaultdict(list)
    rows = inputs.student["main"].mask.shape[0]
    for b in range(rows):
        for (sf, tf), name in pairs.items():
            for ls, lt in zip(cfg.student_layers, cfg.teacher_layers):
                ls = S_FINAL if ls == -1 else ls
                lt = T_FINAL if lt == -1 else lt
                sv, tv = inputs.student[sf], inputs.teacher[tf]
                x = sv.hidden[ls][b][sv.mask[b]]
                y = module.projector(tv.hidden[lt][b][tv.mask[b]].to(F64))
                if x.shape[0] == 0 or y.shape[0] == 0:
                    continue
                c = reference_cost(cfg.cost, x, y)
                val = pot_value(c, cfg.sinkhorn.epsilon, cfg.sinkhorn.iterations)
                val = val * cfg.normalizer / inputs.num_examples
                total = total + val
                parts[name] = parts[name] + val.detach()
                parts[f"layer{ls}_{lt}"] = parts[f"layer{ls}_{lt}"] + val.detach()
                ratio = pot_entropy_ratio(c, cfg.sinkhorn.epsilon, cfg.sinkhorn.iterations)
                ratios[name].append(ratio)
                ratios[f"layer{ls}_{lt}"].append(ratio)
    for name, rs in ratios.items():
        parts[f"entropy/{name}"] = torch.tensor(sum(rs) / len(rs) * rows / inputs.num_examples, dtype=F64)
    return total, dict(parts)


def _grads(inputs: LossInputs, module: CrossCoTOT) -> list[Tensor]:
    out = [p.grad for p in module.projector.parameters()]
    for view in inputs.student.values():
        out += [h.grad for h in view.hidden.values()]
    assert all(g is not None for g in out)
    return [g for g in out if g is not None]


def _zero_grads(inputs: LossInputs, module: CrossCoTOT) -> None:
    module.zero_grad()
    for view in inputs.student.values():
        for h in view.hidden.values():
            h.grad = None


CTX = LossContext(d_student=D_S, d_teacher=D_T, vocab_student=7, vocab_teacher=9, same_tokenizer=False)
MAIN = [(5, 7), (3, 2), (1, 4), (6, 6)]
AUX = [(4, 3), (0, 0), (2, 5), (0, 0)]  # rows 1 and 3 are unpaired


@pytest.mark.parametrize("cost", ["attention", "cosine", "euclidean"])
@pytest.mark.parametrize("gradient", ["unroll", "envelope"])
def test_cross_cot_ot_matches_reference_loop(cost: Any, gradient: Any) -> None:
    eps = 0.5 if cost != "euclidean" else 2.0
    sk_cfg = SinkhornConfig(epsilon=eps, iterations=30, bucket_size=3, gradient=gradient)
    cfg = OTConfig(cost=cost, student_layers=[0, -1], teacher_layers=[-1, 0], sinkhorn=sk_cfg)
    torch.manual_seed(0)
    module = CrossCoTOT(cfg, CTX).double()
    inputs = make_inputs(1, MAIN, AUX)
    value, parts = module(inputs)
    ref, ref_parts = reference_loss(module, inputs, cfg)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-9, atol=1e-12)
    names = {"main_main", "aux_main", "main_aux", f"layer0_{T_FINAL}", f"layer{S_FINAL}_0"}
    assert set(parts) == names | {f"entropy/{name}" for name in names}
    assert set(ref_parts) == set(parts)
    for name, val in ref_parts.items():
        torch.testing.assert_close(parts[name], val, rtol=1e-9, atol=1e-12)
    assert all(float(v) > 0 for v in parts.values())
    value.backward()
    ours = [g.clone() for g in _grads(inputs, module)]
    _zero_grads(inputs, module)
    if gradient == "unroll":
        ref.backward()
        for a, b in zip(ours, _grads(inputs, module)):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in ours)


def test_unpaired_rows_give_only_the_main_main_pair() -> None:
    cfg = OTConfig(sinkhorn=SinkhornConfig(epsilon=0.5, iterations=20))
    module = CrossCoTOT(cfg, CTX).double()
    # a batch of unpaired rows: aux views exist but are empty
    inputs = make_inputs(2, [(4, 5), (2, 3)], [(0, 0), (0, 0)])
    value, parts = module(inputs)
    assert float(parts["aux_main"]) == 0.0 and float(parts["main_aux"]) == 0.0
    assert float(parts["main_main"]) > 0
    torch.testing.assert_close(value.detach(), parts["main_main"])
    # one paired row: all three pairs are non-zero
    _, parts = module(make_inputs(3, [(4, 5)], [(3, 6)]))
    assert all(float(parts[name]) > 1e-3 for name in ("main_main", "aux_main", "main_aux"))
    # a paired row whose aux side is empty on the teacher only: the pairs using it are skipped
    value, parts = module(make_inputs(4, [(4, 5)], [(3, 0)]))
    assert float(parts["aux_main"]) > 0 and float(parts["main_aux"]) == 0.0


def test_cross_pairs_off_and_no_aux_views_use_main_main_only() -> None:
    cfg = OTConfig(cross_pairs=False, sinkhorn=SinkhornConfig(epsilon=0.5, iterations=20))
    module = CrossCoTOT(cfg, CTX).double()
    inputs = make_inputs(5, MAIN, AUX)
    value, parts = module(inputs)
    ref, _ = reference_loss(module, inputs, cfg)
    assert "aux_main" not in parts and "main_aux" not in parts
    torch.testing.assert_close(value, ref.detach(), rtol=1e-9, atol=1e-12)
    no_aux = make_inputs(5, MAIN, None)
    cfg_cross = OTConfig(sinkhorn=cfg.sinkhorn)
    module_cross = CrossCoTOT(cfg_cross, CTX).double()
    module_cross.load_state_dict(module.state_dict())
    value2, parts2 = module_cross(no_aux)
    assert {k for k in parts2 if not k.startswith("entropy/")} == {"main_main", "layer0_0", f"layer{S_FINAL}_{T_FINAL}"}
    torch.testing.assert_close(value2, value, rtol=1e-12, atol=1e-14)


def test_bf16_teacher_states_are_cast_to_the_projector_dtype() -> None:
    cfg = OTConfig(sinkhorn=SinkhornConfig(epsilon=0.5, iterations=20))
    module = CrossCoTOT(cfg, CTX)  # float32 projector
    inputs = make_inputs(6, MAIN, AUX)
    for view in inputs.student.values():
        view.hidden = {k: h.detach().float().requires_grad_(True) for k, h in view.hidden.items()}
    for view in inputs.teacher.values():
        view.hidden = {k: h.to(torch.bfloat16) for k, h in view.hidden.items()}
    value, _ = module(inputs)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert module.projector.weight.grad is not None and torch.isfinite(module.projector.weight.grad).all()
    for view in inputs.teacher.values():
        view.hidden = {k: h.float() for k, h in view.hidden.items()}
    value32, _ = module(inputs)
    torch.testing.assert_close(value, value32, rtol=1e-6, atol=1e-7)


def test_no_solvable_problem_gives_zero_with_the_projector_in_the_graph() -> None:
    module = CrossCoTOT(OTConfig(), CTX).double()
    inputs = make_inputs(7, [(3, 0), (0, 4)], None)
    value, parts = module(inputs)
    assert float(value.detach()) == 0.0
    names = {"main_main", "layer0_0", f"layer{S_FINAL}_{T_FINAL}"}
    assert set(parts) == names | {f"entropy/{name}" for name in names}
    assert all(float(v) == 0.0 for v in parts.values())
    value.backward()
    assert module.projector.weight.grad is not None and float(module.projector.weight.grad.abs().sum()) == 0.0


def test_registry_builds_cot2align_with_the_ot_term() -> None:
    cfg = LossConfig(name="cot2align", base="none", kd_rate=0.5)
    cfg.ot.sinkhorn = SinkhornConfig(epsilon=0.5, iterations=10)
    loss = build_loss(cfg, CTX).double()
    inputs = make_inputs(8, MAIN, AUX)
    out = loss(inputs)
    assert {"ce", "ot", "ot/main_main", "ot/aux_main", "ot/main_aux"} <= set(out.parts)
    out.total.backward()
    assert inputs.student["aux"].hidden[0].grad is not None


def test_distiller_terms_are_the_weighted_parts_of_the_total() -> None:
    cfg = LossConfig(name="cot2align", base="none", kd_rate=0.25)
    cfg.ot.sinkhorn = SinkhornConfig(epsilon=0.5, iterations=10)
    cfg.ot.weight = 2.0
    loss = build_loss(cfg, CTX).double()
    inputs = make_inputs(8, MAIN, AUX)
    terms, parts = loss.terms(inputs)
    assert set(terms) == {"ce", "ot"}
    ot, _ = loss.ot(inputs)
    torch.testing.assert_close(terms["ce"], 0.75 * parts["ce"])
    torch.testing.assert_close(terms["ot"].detach(), 0.25 * 2.0 * ot.detach())
    torch.testing.assert_close(loss(inputs).total, terms["ce"] + terms["ot"])
    (g,) = torch.autograd.grad(terms["ot"], [inputs.student["aux"].hidden[0]])
    assert g.abs().sum() > 0  # each term keeps its graph


def test_attention_cost_softmax_is_over_valid_columns_only() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 5, generator=g, dtype=F64)
    y = torch.randn(2, 6, 5, generator=g, dtype=F64)
    y_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    c = attention_cost(x, y, None, y_mask)
    torch.testing.assert_close(c[0], reference_cost("attention", x[0], y[0]))
    torch.testing.assert_close(c[1, :, :3], reference_cost("attention", x[1], y[1, :3]))
    torch.testing.assert_close(c[1, :, 3:], torch.ones(4, 3, dtype=F64))
    # padding junk does not leak into valid entries
    y2 = y.clone()
    y2[1, 3:] = 1e3
    torch.testing.assert_close(attention_cost(x, y2, None, y_mask)[1, :, :3], c[1, :, :3])


def test_cosine_and_euclidean_costs() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    y = torch.randn(5, 4, generator=g, dtype=F64)
    torch.testing.assert_close(cosine_cost(x, y), reference_cost("cosine", x, y))
    torch.testing.assert_close(euclidean_cost(x, y), torch.cdist(x, y))
    # zero distance: finite zero gradient instead of NaN
    xs = x.clone().requires_grad_(True)
    ys = torch.cat([x[:1], y]).clone().requires_grad_(True)
    c = euclidean_cost(xs, ys)
    assert float(c[0, 0].detach()) == 0.0
    c.sum().backward()
    assert xs.grad is not None and ys.grad is not None
    assert torch.isfinite(xs.grad).all() and torch.isfinite(ys.grad).all()
    xr = x.clone().requires_grad_(True)
    yr = y.clone().requires_grad_(True)
    torch.cdist(xr, yr).sum().backward()
    xs.grad = None
    euclidean_cost(xs, ys[1:].detach().requires_grad_(True)).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)


def test_batched_ot_accepts_a_cost_name() -> None:
    g = torch.Generator().manual_seed(11)
    pairs = [
        (torch.randn(n, 4, generator=g, dtype=F64), torch.randn(m, 4, generator=g, dtype=F64))
        for n, m in MAIN
    ]
    cfg = SinkhornConfig(epsilon=0.5, iterations=15, bucket_size=2)
    by_name = batched_ot(pairs, cfg, "cosine").values
    by_fn = batched_ot(pairs, cfg, cosine_cost).values
    torch.testing.assert_close(by_name, by_fn, rtol=0.0, atol=0.0)
    ref = [pot_value(reference_cost("cosine", x, y), 0.5, 15) for x, y in pairs]
    torch.testing.assert_close(by_name, torch.stack(ref), rtol=1e-10, atol=1e-13)


def _stack(problems: list[tuple[Tensor, Tensor]], factor: float) -> list[tuple[Tensor, Tensor]]:
    return [(x * factor, y * factor) for x, y in problems]


def _state_problems(seed: int, scale: float = 1.0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 5, generator=g, dtype=F64) * scale, torch.randn(m, 5, generator=g, dtype=F64) * scale)
        for n, m in [(4, 6), (7, 3), (5, 5), (2, 8)]
    ]


@pytest.mark.parametrize("mode", ["mean", "spread"])
def test_scaled_euclidean_cost_gives_a_plan_invariant_to_the_states_scale(mode: Any) -> None:
    cfg = SinkhornConfig(epsilon=0.2, iterations=200, bucket_size=2)
    problems = _state_problems(11)
    base = batched_ot(problems, cfg, "euclidean", mode)
    for factor in (1e-3, 7.0):
        res = batched_ot(_stack(problems, factor), cfg, "euclidean", mode)
        # euclidean cost and its scale both grow by `factor`: same plan, value in the cost's units
        torch.testing.assert_close(res.values, base.values * factor, rtol=1e-9, atol=0)
        assert res.entropy_ratio is not None and base.entropy_ratio is not None
        torch.testing.assert_close(res.entropy_ratio, base.entropy_ratio, rtol=1e-9, atol=0)
        raw = batched_ot(_stack(problems, factor), cfg, "euclidean")  # none: the plan depends on the scale
        assert raw.entropy_ratio is not None
        assert (raw.entropy_ratio - base.entropy_ratio).abs().max() > 1e-2


def test_spread_scale_makes_the_flat_attention_cost_of_small_states_informative() -> None:
    cfg = SinkhornConfig(epsilon=0.1, iterations=300, bucket_size=4)
    problems = _state_problems(12, scale=1e-2)  # embedding-like: <x, y> / sqrt(d) ~ 1e-4, C ~ 1 - 1/m flat
    raw = batched_ot(problems, cfg, "attention")
    spread = batched_ot(problems, cfg, "attention", "spread")
    smaller = batched_ot(_stack(problems, 0.1), cfg, "attention", "spread")
    assert raw.entropy_ratio is not None and spread.entropy_ratio is not None and smaller.entropy_ratio is not None
    assert float(raw.entropy_ratio.min()) > 1 - 1e-6  # the published raw cost: the product plan
    assert float(spread.entropy_ratio.max()) < 0.97  # spread-scaled: the plan aligns positions
    # in this (linear-softmax) regime the scaled cost no longer depends on the states' norm
    torch.testing.assert_close(smaller.entropy_ratio, spread.entropy_ratio, rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", ["mean", "spread"])
def test_scaled_cost_values_and_gradients_equal_pot_at_the_scaled_epsilon(mode: Any) -> None:
    """<P, C> with P solved at epsilon * s (s = mean or population std of C, a constant): POT's value and
    its autograd gradient through the states."""
    eps, iters = 0.3, 40
    cfg = SinkhornConfig(epsilon=eps, iterations=iters, bucket_size=3)
    problems = [(x.requires_grad_(True), y.requires_grad_(True)) for x, y in _state_problems(13)]
    values = batched_ot(problems, cfg, "attention", mode).values
    ours = torch.autograd.grad(values.sum(), [t for p in problems for t in p])
    ref = []
    for x, y in problems:
        c = reference_cost("attention", x, y)
        s = float(c.detach().mean() if mode == "mean" else c.detach().std(unbiased=False))
        ref.append(pot_value(c, eps * s, iters))
    torch.testing.assert_close(values, torch.stack(ref), rtol=1e-9, atol=0)
    expected = torch.autograd.grad(torch.stack(ref).sum(), [t for p in problems for t in p])
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_entropy_ratio_is_one_for_the_product_plan_and_lower_for_an_informative_epsilon() -> None:
    problems = _state_problems(14)
    wide = batched_ot(problems, SinkhornConfig(epsilon=1e6, iterations=5), "cosine")
    sharp = batched_ot(problems, SinkhornConfig(epsilon=0.02, iterations=500), "cosine")
    assert wide.entropy_ratio is not None and sharp.entropy_ratio is not None
    torch.testing.assert_close(wide.entropy_ratio, torch.ones(4, dtype=F64), rtol=1e-6, atol=0)
    assert float(sharp.entropy_ratio.max()) < 0.8
    # against the plan itself, H = -sum P log P
    for (x, y), ratio in zip(problems, sharp.entropy_ratio):
        c = reference_cost("cosine", x, y)
        assert abs(pot_entropy_ratio(c, 0.02, 500) - float(ratio)) < 1e-9


def test_cost_scale_is_checked_by_key() -> None:
    cfg = OTConfig(cost_scale="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cost_scale"):
        cfg.check("loss.ot")


def test_packed_attention_cost_equals_the_padded_cost_with_shared_states() -> None:
    """The packed form (per-problem products on unpadded states, shared states read once) against
    `attention_cost` on padded states: the valid blocks and the gradients of every state."""
    g = torch.Generator().manual_seed(15)
    xs = [torch.randn(n, 5, generator=g, dtype=F64).requires_grad_(True) for n in (4, 6)]
    ys = [torch.randn(m, 5, generator=g, dtype=F64).requires_grad_(True) for m in (3, 7)]
    problems = [(xs[0], ys[0]), (xs[1], ys[0]), (xs[0], ys[1])]  # x0 and y0 shared, like Cross-CoT pairs
    packed = packed_attention_cost(problems, 6, 7)
    weights = torch.randn(3, 6, 7, generator=g, dtype=F64)
    got = torch.autograd.grad((packed * weights).sum(), xs + ys)
    total = torch.zeros((), dtype=F64)
    for j, (x, y) in enumerate(problems):
        c = reference_cost("attention", x, y)
        torch.testing.assert_close(packed[j, : x.shape[0], : y.shape[0]], c, rtol=1e-13, atol=1e-14)
        total = total + (c * weights[j, : x.shape[0], : y.shape[0]]).sum()
    for a, b in zip(got, torch.autograd.grad(total, xs + ys)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for j, rows, cols in ((0, 4, 3), (1, 6, 3), (2, 4, 7)):  # padding is 1
        assert bool((packed[j, rows:] == 1).all()) and bool((packed[j, :, cols:] == 1).all())
