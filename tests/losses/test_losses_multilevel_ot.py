"""MultiLevelOT against a plain per-row, per-position float64 implementation."""

from __future__ import annotations

import pytest
import torch
from loss_fixtures import Case, assert_close, config, grads, make_case

from cot2align.losses.multilevel_ot import MultiLevelOT
from cot2align.losses.registry import build_loss


def _kvec(z: torch.Tensor, k: int, cols: list[int] | None) -> torch.Tensor:
    p = torch.softmax(z / (z.std() + 1e-4), 0)
    if cols is None:
        order = sorted(range(len(p)), key=lambda v: -float(p[v].detach()))[:k]
    else:
        order = cols
    vals = [p[v] for v in order] + [torch.zeros((), dtype=p.dtype)] * (k - len(order))
    return torch.stack(vals)


def ref_mlot(case: Case, k: int, T: float, eps: float, iters: int, scale: float, order: str) -> dict[str, torch.Tensor]:
    l1 = xe = seq = torch.zeros((), dtype=torch.float64)
    for b in range(len(case.s_len)):
        n, m = case.s_len[b], case.t_len[b]
        if n == 0 or m == 0:
            continue
        zs = [case.s_logits[b, i] for i in range(n)]
        zt = [case.t_hidden[b, j] @ case.W_t.T for j in range(m)]
        cs = ct = None
        if order == "mass":
            def top_cols(zz: list[torch.Tensor]) -> list[int]:
                mass = torch.stack([torch.softmax(z / (z.std() + 1e-4), 0).detach() for z in zz]).sum(0)
                return sorted(range(len(mass)), key=lambda v: -float(mass[v]))[:k]
            cs, ct = top_cols(zs), top_cols(zt)
        s = [_kvec(z, k, cs) for z in zs]
        t = [_kvec(z, k, ct) for z in zt]
        for i in range(min(n, m)):
            l1 = l1 + (s[i] - t[i]).abs().sum()
            xe = xe - (torch.softmax(s[i], 0) * torch.log_softmax(t[i], 0)).sum()
        W = torch.stack(
            [torch.stack([(torch.softmax(s[i] / T, 0) - torch.softmax(t[j] / T, 0)).abs().sum() for j in range(m)])
             for i in range(n)]
        )
        P = torch.exp(-W / eps)
        for _ in range(iters):
            P = P / P.sum(1, keepdim=True) / n
            P = P / P.sum(0, keepdim=True) / m
        seq = seq + (P * W).sum()
    d = case.inputs.num_tokens
    micro = len(case.s_len)
    return {"token_l1": l1 / d, "token_xe": xe / d, "sequence": scale * seq * micro / case.inputs.num_examples}


def _ce(case: Case) -> torch.Tensor:
    s = case.inputs.student["main"]
    return torch.nn.functional.cross_entropy(case.s_logits[s.mask], s.targets[s.mask], reduction="sum") / case.inputs.num_tokens


@pytest.mark.parametrize("order", ["position", "mass"])
@pytest.mark.parametrize("k", [5, 50])
def test_matches_reference_values_and_gradients(order: str, k: int) -> None:
    case = make_case(s_len=[5, 3, 0, 4, 1], t_len=[3, 6, 2, 0, 1], v_s=23, v_t=31, seed=31)
    mcfg = {"top_k": k, "order": order, "sequence_scale": 1.0, "temperature": 2.0}
    loss = MultiLevelOT(config(name="multilevel_ot", token_chunk=3, multilevel_ot=mcfg), case.ctx)
    out = loss(case.inputs)
    ref = ref_mlot(case, k, 2.0, 0.1, 10, 1.0, order)
    for name in ("token_l1", "token_xe", "sequence"):
        assert_close(out.parts[name], ref[name], rtol=1e-9, what=name)
        assert float(ref[name].detach()) > 0
    ref_total = _ce(case) + 1.5 * (ref["token_l1"] + 0.1 * ref["token_xe"] + 0.1 * ref["sequence"])
    assert_close(out.total, ref_total, rtol=1e-6, what="total")  # CE is computed in fp32 by masked_token_ce
    (g,) = grads(out.total, [case.s_logits])
    (g_ref,) = grads(ref_total, [case.s_logits])
    assert_close(g, g_ref, rtol=1e-5, atol=1e-9, what="grad")


def test_sequence_term_gradient_alone() -> None:
    case = make_case(s_len=[4, 2], t_len=[3, 5], seed=32)
    cfg = config(
        name="multilevel_ot",
        multilevel_ot={"top_k": 6, "sequence_scale": 1.0, "token_weight": 1.0, "sequence_weight": 1.0},
    )
    loss = MultiLevelOT(cfg, case.ctx)
    out = loss(case.inputs)
    ref = ref_mlot(case, 6, 2.0, 0.1, 10, 1.0, "position")
    ref_total = _ce(case) + ref["token_l1"] + 0.1 * ref["token_xe"] + ref["sequence"]
    (g,) = grads(out.total, [case.s_logits])
    (g_ref,) = grads(ref_total, [case.s_logits])
    (g_seq_ref,) = grads(ref["sequence"], [case.s_logits])
    assert g_seq_ref.abs().sum() > 0
    assert_close(g, g_ref, rtol=1e-5, atol=1e-9, what="grad")


def _reference_plan_cost(s: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
    """One example's sequence OT value, written out as the reference computes it (T = 2, eps 0.1, 10 rounds)."""
    W = torch.stack([torch.stack([(torch.softmax(a / 2, 0) - torch.softmax(b / 2, 0)).abs().sum() for b in t])
                     for a in s])
    P = torch.exp(-W / 0.1)
    for _ in range(10):
        P = P / P.sum(1, keepdim=True) / len(s)
        P = P / P.sum(0, keepdim=True) / len(t)
    return (P * W).sum()


@pytest.mark.parametrize("accum", [1, 2])
def test_sequence_term_is_the_reference_sum_over_the_batch(accum: int) -> None:
    """Defaults: total = CE + 1.5 * [token terms + 0.1 * sum_b 1e-3 * OT_b] on one micro-batch of the
    reference's; with `accum` micro-batches per step each contributes 1/accum of that (DeepSpeed's mean)."""
    s_len, t_len = [5, 3, 4], [3, 6, 4]
    case = make_case(s_len=s_len, t_len=t_len, v_s=23, v_t=31, seed=35, num_examples=float(3 * accum))
    out = MultiLevelOT(config(name="multilevel_ot"), case.ctx)(case.inputs)
    ot_sum = torch.zeros((), dtype=torch.float64)
    for b in range(3):
        s = [_kvec(case.s_logits[b, i], 50, None) for i in range(s_len[b])]
        t = [_kvec(case.t_hidden[b, j] @ case.W_t.T, 50, None) for j in range(t_len[b])]
        ot_sum = ot_sum + 1e-3 * _reference_plan_cost(s, t)
    ref = ref_mlot(case, 50, 2.0, 0.1, 10, 1.0, "position")
    ref_total = _ce(case) + 1.5 * (ref["token_l1"] + 0.1 * ref["token_xe"] + 0.1 * ot_sum / accum)
    assert_close(out.parts["sequence"], ot_sum / accum, rtol=1e-9, what="sequence")
    assert_close(out.total, ref_total, rtol=1e-6, what="total")
    assert float(ot_sum.detach()) > 0


def test_chunking_and_checkpointing_do_not_change_results() -> None:
    case = make_case(s_len=[5, 3, 6], t_len=[4, 6, 6], seed=33)
    out = []
    for chunk, ckpt in [(1, True), (2, False), (1024, True)]:
        cfg = config(name="multilevel_ot", token_chunk=chunk, chunk_checkpoint=ckpt, multilevel_ot={"top_k": 7})
        o = MultiLevelOT(cfg, case.ctx)(case.inputs)
        out.append((o.total, grads(o.total, [case.s_logits])[0]))
    for total, g in out[1:]:
        assert_close(total, out[0][0], rtol=1e-12, what="value")
        assert_close(g, out[0][1], rtol=1e-10, atol=1e-14, what="grad")


def test_edge_cases_are_finite() -> None:
    case = make_case(s_len=[0, 0], t_len=[0, 2], num_tokens=0.0)
    out = MultiLevelOT(config(name="multilevel_ot"), case.ctx)(case.inputs)
    assert float(out.total) == 0.0
    case = make_case(s_len=[1, 2], t_len=[1, 1], v_s=1000, v_t=50_000, d_t=8, seed=34, logit_scale=30.0)
    out = MultiLevelOT(config(name="multilevel_ot", token_chunk=1), case.ctx)(case.inputs)
    (g,) = grads(out.total, [case.s_logits])
    assert torch.isfinite(out.total) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_registry_builds_it() -> None:
    case = make_case(s_len=[3], t_len=[2])
    loss = build_loss(config(name="multilevel_ot"), case.ctx)
    assert isinstance(loss, MultiLevelOT)
    out = loss(case.inputs)
    assert {"ce", "token", "sequence", "kd"} <= set(out.parts)
