"""DSKD-CMA against a plain per-row, per-position float64 implementation of docs/method.md section 4."""

from __future__ import annotations

import math

import pytest
import torch
from loss_fixtures import Case, assert_close, config, grads, make_case

from cot2align.losses.dskd import DSKD
from cot2align.losses.registry import Distiller, build_loss


def _std(x: torch.Tensor) -> torch.Tensor:
    return ((x - x.mean()) ** 2).mean().sqrt()


def ref_dskd(case: Case, m: DSKD, tau: float, scope: str = "sequence") -> dict[str, torch.Tensor]:
    """The three DSKD sums / num_tokens, row by row and position by position."""
    s, t = case.inputs.student["main"], case.inputs.teacher["main"]
    rows = [b for b in range(len(case.s_len)) if case.s_len[b] > 0 and case.t_len[b] > 0]
    if scope == "batch":
        keys_all = torch.cat(
            [torch.cat([case.E_t[t.inputs[b, : case.t_len[b]]], case.E_t[t.targets[b, : case.t_len[b]]]], -1)
             for b in range(len(case.t_len))]
        )
        h_all = torch.cat([case.t_hidden[b, : case.t_len[b]] for b in range(len(case.t_len))])
        e_all = torch.cat([case.E_t[t.targets[b, : case.t_len[b]]] for b in range(len(case.t_len))])
        stds = (_std(keys_all), _std(h_all), _std(e_all))
    ce = kd = s2t = torch.zeros((), dtype=torch.float64)
    for b in rows:
        n, mm = case.s_len[b], case.t_len[b]
        xs, ys = s.inputs[b, :n], s.targets[b, :n]
        xt, yt = t.inputs[b, :mm], t.targets[b, :mm]
        keys = torch.cat([case.E_t[xt], case.E_t[yt]], -1)
        h_t, e_ty = case.t_hidden[b, :mm], case.E_t[yt]
        sk, sh, se = stds if scope == "batch" else (_std(keys), _std(h_t), _std(e_ty))
        keys = keys / sk
        values = m.t2s(h_t / sh + e_ty / se)  # [m, d_s]
        q = m.query(torch.cat([case.E_s[xs], case.E_s[ys]], -1))  # [n, 2 d_t]
        scores = q @ keys.T / math.sqrt(2 * case.ctx.d_teacher)
        v_s = m.s2t(case.s_hidden[b, :n])  # [n, d_t]
        for i in range(n):
            a = torch.softmax(scores[i], 0)
            t2s = sum(a[j] * values[j] for j in range(mm))
            z = t2s @ case.W_s.T
            y = int(ys[i])
            ce = ce - torch.log_softmax(z, 0)[y]
            if int(z.argmax()) == y:
                p = torch.softmax(z.detach() / tau, 0)
                lq = torch.log_softmax(case.s_logits[b, i] / tau, 0)
                kd = kd + (p * (torch.log(p) - lq)).sum()
        for j in range(mm):
            a = torch.softmax(scores[:, j], 0)
            s2t_h = sum(a[i] * v_s[i] for i in range(n))
            z = s2t_h @ case.W_t.T
            p = torch.softmax(case.t_hidden[b, j] @ case.W_t.T / tau, 0)
            s2t = s2t + (p * (torch.log(p) - torch.log_softmax(z / tau, 0))).sum()
    d = case.inputs.num_tokens
    return {"t2s_ce": ce / d, "t2s_kd": kd / d, "s2t_kd": s2t / d}


def _module(case: Case, **kw: object) -> DSKD:
    torch.manual_seed(0)
    return DSKD(config(name="dskd", **kw), case.ctx).double()


@pytest.mark.parametrize("tau", [0.1, 2.0, 10.0])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_matches_reference_values_and_gradients(tau: float, scope: str) -> None:
    # v_s small so that argmax t2s == y happens and the gated KL term is exercised
    case = make_case(s_len=[5, 3, 0, 4, 1], t_len=[3, 6, 2, 0, 1], v_s=4, v_t=29, seed=21)
    m = _module(case, temperature=tau, token_chunk=3, dskd={"std_scope": scope})
    total, parts = m(case.inputs)
    ref = ref_dskd(case, m, tau, scope)
    for k in ("t2s_ce", "t2s_kd", "s2t_kd"):
        assert_close(parts[k], ref[k], rtol=1e-9, what=k)
    assert float(ref["t2s_kd"]) > 0, "test setup: no t2s prediction was right"
    ref_total = ref["t2s_ce"] + ref["t2s_kd"] + ref["s2t_kd"]
    assert_close(total, ref_total, rtol=1e-9, what="total")
    leaves = [case.s_hidden, case.s_logits, *m.parameters()]
    for g, g_ref, name in zip(grads(total, leaves), grads(ref_total, leaves), ["h_S", "z_S", "Pq.w", "Pq.b", "Pt2s.w", "Pt2s.b", "Ps2t.w", "Ps2t.b"]):
        assert_close(g, g_ref, rtol=1e-7, atol=1e-11, what=f"grad {name}")
    g_h = grads(total, [case.s_hidden])[0]
    assert g_h[2].abs().sum() == 0 and g_h[3].abs().sum() == 0  # rows with an empty side
    assert all(p.grad is None for p in m.parameters())


def test_student_head_is_frozen_in_the_t2s_product() -> None:
    case = make_case(s_len=[3, 2], t_len=[4, 2], seed=22)
    W = case.W_s.clone().requires_grad_(True)
    case.inputs.extras["student_head_weight"] = W
    total, _ = _module(case)(case.inputs)
    total.backward()
    assert W.grad is None


def test_head_weight_from_linear_or_error() -> None:
    case = make_case(s_len=[3, 2], t_len=[4, 2], seed=23)
    a, _ = _module(case)(case.inputs)
    del case.inputs.extras["student_head_weight"]  # falls back to the nn.Linear student head
    b, _ = _module(case)(case.inputs)
    assert_close(a, b, rtol=1e-12, what="fallback")
    case.inputs.student_head = lambda h: h @ case.W_s.T
    with pytest.raises(ValueError, match="student_head_weight"):
        _module(case)(case.inputs)


def test_chunking_and_checkpointing_do_not_change_results() -> None:
    case = make_case(s_len=[5, 3, 6], t_len=[4, 6, 6], seed=24)
    out = []
    for chunk, ckpt in [(1, True), (2, False), (1024, True), (1024, False)]:
        m = _module(case, token_chunk=chunk, chunk_checkpoint=ckpt)
        total, _ = m(case.inputs)
        out.append((total, grads(total, [case.s_hidden, case.s_logits, m.query.weight])))
    for total, gs in out[1:]:
        assert_close(total, out[0][0], rtol=1e-12, what="value")
        for g, g0 in zip(gs, out[0][1]):
            assert_close(g, g0, rtol=1e-10, atol=1e-14, what="grad")


def test_edge_cases_are_finite() -> None:
    case = make_case(s_len=[0, 0], t_len=[0, 2], num_tokens=0.0)
    total, parts = _module(case)(case.inputs)
    assert float(total) == 0.0 and all(torch.isfinite(v) for v in parts.values())
    case = make_case(s_len=[1, 2], t_len=[1, 1], v_s=1000, v_t=50_000, d_t=8, seed=25)
    for tau in (0.1, 10.0):
        m = _module(case, temperature=tau, token_chunk=1)
        total, _ = m(case.inputs)
        g = grads(total, [case.s_hidden, m.t2s.weight])
        assert torch.isfinite(total) and all(torch.isfinite(x).all() for x in g)
        assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0


def test_registry_builds_distiller_with_trainable_projectors() -> None:
    case = make_case(s_len=[4, 3], t_len=[2, 5], seed=26)
    cfg = config(name="dskd", kd_rate=0.9)
    torch.manual_seed(0)
    loss = build_loss(cfg, case.ctx).double()
    assert isinstance(loss, Distiller) and isinstance(loss.kd, DSKD)
    shapes = sorted(tuple(p.shape) for p in loss.parameters())
    assert shapes == sorted([(20, 12), (20,), (6, 10), (6,), (10, 6), (10,)])
    assert loss.required_layers() == ([-1], [-1])
    out = loss(case.inputs)
    kd, _ = loss.kd(case.inputs)
    mask = case.inputs.student["main"].mask
    ce = torch.nn.functional.cross_entropy(
        case.s_logits[mask].float(), case.inputs.student["main"].targets[mask], reduction="sum"
    ) / case.inputs.num_tokens
    assert_close(out.total, 0.1 * ce + 0.9 * kd, rtol=1e-5, what="total")
    assert {"kd/t2s_ce", "kd/t2s_kd", "kd/s2t_kd", "kd/t2s_acc"} <= set(out.parts)


def test_bf16_inputs_run_in_fp32() -> None:
    case = make_case(s_len=[4, 0, 2], t_len=[3, 2, 5], dtype=torch.bfloat16, seed=27)
    total, _ = DSKD(config(name="dskd"), case.ctx)(case.inputs)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert case.s_hidden.grad is not None and torch.isfinite(case.s_hidden.grad.float()).all()
