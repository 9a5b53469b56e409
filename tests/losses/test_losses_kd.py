"""LogitKD (`kd`) against a plain per-position float64 implementation of each divergence."""

from __future__ import annotations

import math

import pytest
import torch
from loss_fixtures import Case, assert_close, config, grads, make_case

from cot2align.configbase import ConfigError
from cot2align.losses.kd import LogitKD
from cot2align.losses.registry import Distiller, build_loss

DIVERGENCES = ["forward_kl", "reverse_kl", "js", "skew_forward_kl", "skew_reverse_kl", "adaptive_kl"]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_divergence(name: str, zs: torch.Tensor, zt: torch.Tensor, tau: float, skew: float, mu: float) -> torch.Tensor:
    """One position, written from the formulas with explicit vocabulary loops where it matters."""
    q = torch.softmax(zs / tau, 0)  # student (differentiable)
    p = torch.softmax(zt / tau, 0).detach()  # teacher
    V = len(p)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum((a[v] * (torch.log(a[v]) - torch.log(b[v])) for v in range(V)), torch.zeros((), dtype=a.dtype))

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "js":
        m = 0.5 * (p + q)
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "skew_reverse_kl":
        return kl(q, skew * q + (1 - skew) * p)
    assert name == "adaptive_kl"
    order = sorted(range(V), key=lambda v: -float(p[v]))
    head, mass = set(), 0.0
    for v in order:
        if mass < mu:
            head.add(v)
        mass += float(p[v])
    g_head = sum(abs(float(p[v]) - float(q[v].detach())) for v in head)
    g_tail = sum(abs(float(p[v]) - float(q[v].detach())) for v in range(V) if v not in head)
    w_h, w_t = (g_head / (g_head + g_tail), g_tail / (g_head + g_tail)) if g_head + g_tail > 0 else (0.5, 0.5)
    return w_h * kl(p, q) + w_t * kl(q, p)


def ref_kd(case: Case, name: str, tau: float, skew: float = 0.1, mu: float = 0.5) -> torch.Tensor:
    """sum over rows and response positions / num_tokens."""
    total = torch.zeros((), dtype=torch.float64)
    for b, n in enumerate(case.s_len):
        for k in range(n):
            zt = case.t_hidden[b, k] @ case.W_t.T
            total = total + ref_divergence(name, case.s_logits[b, k], zt, tau, skew, mu)
    return total / case.inputs.num_tokens


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.1, 2.0, 10.0])
def test_matches_reference_values_and_gradients(name: str, tau: float) -> None:
    case = make_case(s_len=[5, 0, 3, 1], same=True, seed=1)
    cfg = config(name="kd", temperature=tau, token_chunk=3, kd={"divergence": name, "adaptive_mu": 0.5})
    kd, parts = LogitKD(cfg, case.ctx)(case.inputs)
    ref = ref_kd(case, name, tau)
    assert torch.isfinite(kd)
    assert_close(kd, ref, what=f"{name} tau={tau} value")
    assert_close(parts["kd"], ref, what="parts")
    (g,) = grads(kd, [case.s_logits])
    (g_ref,) = grads(ref, [case.s_logits])
    assert_close(g, g_ref, rtol=1e-6, atol=1e-10, what=f"{name} tau={tau} grad")
    assert g[1].abs().sum() == 0 and g[0, 5:].abs().sum() == 0  # empty row and padding get nothing


@pytest.mark.parametrize("name", ["forward_kl", "adaptive_kl"])
def test_chunking_and_checkpointing_do_not_change_results(name: str) -> None:
    case = make_case(s_len=[7, 2, 4], same=True, seed=2)
    out = []
    for chunk, ckpt in [(1, True), (3, False), (4096, True), (4096, False)]:
        cfg = config(name="kd", token_chunk=chunk, chunk_checkpoint=ckpt, kd={"divergence": name})
        kd, _ = LogitKD(cfg, case.ctx)(case.inputs)
        out.append((kd, grads(kd, [case.s_logits])[0]))
    for kd, g in out[1:]:
        assert_close(kd, out[0][0], rtol=1e-12, what="value")
        assert_close(g, out[0][1], rtol=1e-10, what="grad")


def test_identical_distributions_give_zero_and_skew_parameter_is_used() -> None:
    case = make_case(s_len=[3], same=True, seed=3, d_t=6)
    # teacher logits == student logits: every divergence is 0 (AKL weights fall back to 1/2)
    W = case.W_t
    h = case.t_hidden
    with torch.no_grad():
        case.s_logits.copy_(h @ W.T)
    case.inputs.student_logits = case.s_logits
    for name in DIVERGENCES:
        kd, _ = LogitKD(config(name="kd", kd={"divergence": name}), case.ctx)(case.inputs)
        assert abs(float(kd.detach())) < 1e-12, name
    case = make_case(s_len=[4], same=True, seed=4)
    a, _ = LogitKD(config(name="kd", kd={"divergence": "skew_forward_kl", "skew": 0.1}), case.ctx)(case.inputs)
    b, _ = LogitKD(config(name="kd", kd={"divergence": "skew_forward_kl", "skew": 0.5}), case.ctx)(case.inputs)
    assert float(a.detach()) > float(b.detach()) > 0


def test_mismatched_masks_are_an_error() -> None:
    case = make_case(s_len=[3, 2], same=True)
    case.inputs.teacher["main"].mask[1, 2] = True
    with pytest.raises(ValueError, match="masks differ"):
        LogitKD(config(name="kd"), case.ctx)(case.inputs)


def test_all_padding_batch_is_zero_not_nan() -> None:
    case = make_case(s_len=[0, 0], same=True, num_tokens=0.0)
    kd, _ = LogitKD(config(name="kd"), case.ctx)(case.inputs)
    assert float(kd) == 0.0


def test_bf16_hidden_states_run() -> None:
    case = make_case(s_len=[4, 2], same=True, dtype=torch.bfloat16)
    case.inputs.teacher_head = lambda h: (h @ case.W_t.T)
    kd, _ = LogitKD(config(name="kd"), case.ctx)(case.inputs)
    assert kd.dtype == torch.float32 and torch.isfinite(kd)


def test_registry_distiller_combines_ce_and_kd() -> None:
    case = make_case(s_len=[4, 3], same=True, seed=5)
    cfg = config(name="kd", kd_rate=0.3, kd={"divergence": "js"})
    loss = build_loss(cfg, case.ctx)
    assert isinstance(loss, Distiller)
    out = loss(case.inputs)
    ce = torch.nn.functional.cross_entropy(
        case.s_logits[case.inputs.student["main"].mask].float(),
        case.inputs.student["main"].targets[case.inputs.student["main"].mask],
        reduction="sum",
    ) / case.inputs.num_tokens
    kd = ref_kd(case, "js", cfg.temperature)
    assert_close(out.total, 0.7 * ce + 0.3 * kd, rtol=1e-5, what="total")
    assert set(out.parts) >= {"ce", "kd", "kd/kd"}
    assert loss.required_layers() == ([-1], [-1])


def test_registry_refuses_kd_across_tokenizers() -> None:
    case = make_case(s_len=[2])
    with pytest.raises(ConfigError, match="share one vocabulary"):
        build_loss(config(name="kd"), case.ctx)
