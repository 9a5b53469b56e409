"""ULD against a plain per-position float64 implementation."""

from __future__ import annotations

import pytest
import torch
from loss_fixtures import Case, assert_close, config, grads, make_case

from cot2align.losses.registry import Distiller, build_loss
from cot2align.losses.uld import ULD


def ref_uld(case: Case, tau: float) -> torch.Tensor:
    """sum_b sum_{k < min(n_s, n_t)} sum_i |sorted p_S - sorted p_T| (zero-padded) / num_tokens."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(len(case.s_len)):
        for k in range(min(case.s_len[b], case.t_len[b])):
            p_s = torch.softmax(case.s_logits[b, k] / tau, 0)
            p_t = torch.softmax(case.t_hidden[b, k] @ case.W_t.T / tau, 0)
            order_s = sorted(range(len(p_s)), key=lambda v: -float(p_s[v].detach()))
            order_t = sorted(range(len(p_t)), key=lambda v: -float(p_t[v].detach()))
            for r in range(max(len(p_s), len(p_t))):
                zero = torch.zeros((), dtype=torch.float64)
                a = p_s[order_s[r]] if r < len(p_s) else zero
                c = p_t[order_t[r]] if r < len(p_t) else zero
                total = total + abs(a - c)
    return total / case.inputs.num_tokens


@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
@pytest.mark.parametrize(("v_s", "v_t"), [(23, 31), (40, 17)])
def test_matches_reference_values_and_gradients(tau: float, v_s: int, v_t: int) -> None:
    # rows: teacher longer, student longer, teacher empty, student empty, 1-token
    case = make_case(s_len=[4, 6, 3, 0, 1], t_len=[7, 2, 0, 5, 1], v_s=v_s, v_t=v_t, seed=11)
    uld, parts = ULD(config(name="uld", uld={"temperature": tau}, token_chunk=4), case.ctx)(case.inputs)
    ref = ref_uld(case, tau)
    assert torch.isfinite(uld) and float(uld.detach()) > 0
    assert_close(uld, ref, what="value")
    assert_close(parts["uld"], ref, what="parts")
    (g,) = grads(uld, [case.s_logits])
    (g_ref,) = grads(ref, [case.s_logits])
    assert_close(g, g_ref, rtol=1e-6, atol=1e-12, what="grad")
    assert g[1, 2:].abs().sum() == 0  # student positions past the shorter teacher response
    assert g[2].abs().sum() == 0 and g[3].abs().sum() == 0  # rows with an empty side


def test_permuted_vocabulary_gives_zero() -> None:
    """ULD only sees sorted probabilities: a teacher that is the student up to a relabelling costs 0."""
    case = make_case(s_len=[3, 2], t_len=[3, 2], v_s=12, v_t=12, d_t=12, seed=3)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        case.W_t.copy_(torch.eye(12)[perm])
        for b in range(2):
            case.t_hidden[b, :3] = case.s_logits[b, :3]
    uld, _ = ULD(config(name="uld"), case.ctx)(case.inputs)
    assert abs(float(uld)) < 1e-12


def test_very_different_vocabularies_1k_vs_50k() -> None:
    case = make_case(s_len=[3, 1], t_len=[2, 4], v_s=1000, v_t=50_000, d_t=8, seed=4)
    uld, _ = ULD(config(name="uld", token_chunk=2), case.ctx)(case.inputs)
    # vectorised reference (the loop one is slow at 50k): sorted L1 with zero padding
    total = torch.zeros((), dtype=torch.float64)
    for b, k in [(0, 0), (0, 1), (1, 0)]:
        p_s = torch.softmax(case.s_logits[b, k], 0).sort(descending=True).values
        p_t = torch.softmax(case.t_hidden[b, k] @ case.W_t.T, 0).sort(descending=True).values
        total = total + (torch.nn.functional.pad(p_s, (0, 49_000)) - p_t).abs().sum()
    assert_close(uld, total / case.inputs.num_tokens, what="1k vs 50k")
    (g,) = grads(uld, [case.s_logits])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_chunking_and_checkpointing_do_not_change_results() -> None:
    case = make_case(s_len=[5, 3, 6], t_len=[4, 6, 6], seed=5)
    out = []
    for chunk, ckpt in [(1, True), (2, False), (1024, True), (1024, False)]:
        uld, _ = ULD(config(name="uld", token_chunk=chunk, chunk_checkpoint=ckpt), case.ctx)(case.inputs)
        out.append((uld, grads(uld, [case.s_logits])[0]))
    for uld, g in out[1:]:
        assert_close(uld, out[0][0], rtol=1e-12, what="value")
        assert_close(g, out[0][1], rtol=1e-10, what="grad")


def test_all_padding_batch_is_zero() -> None:
    case = make_case(s_len=[0, 0], t_len=[0, 3], num_tokens=0.0)
    uld, _ = ULD(config(name="uld"), case.ctx)(case.inputs)
    assert float(uld) == 0.0


def test_no_temperature_by_default_and_kd_temperature_does_not_apply() -> None:
    """The ULD reference has no temperature: defaults give tau = 1 even at loss.temperature = 2 (the
    other KD terms' tau); loss.uld.temperature sets one explicitly."""
    case = make_case(s_len=[4, 3], t_len=[5, 2], seed=7)
    assert config(name="uld").temperature == 2.0
    uld, _ = ULD(config(name="uld"), case.ctx)(case.inputs)
    assert_close(uld, ref_uld(case, 1.0), what="default")
    hot, _ = ULD(config(name="uld", uld={"temperature": 2.0}), case.ctx)(case.inputs)
    assert_close(hot, ref_uld(case, 2.0), what="explicit")
    assert abs(float(hot.detach()) - float(uld.detach())) > 1e-6


def test_registry_distiller_combines_ce_and_uld() -> None:
    case = make_case(s_len=[4, 3], t_len=[2, 5], seed=6)
    cfg = config(name="uld", kd_rate=0.6)
    loss = build_loss(cfg, case.ctx)
    assert isinstance(loss, Distiller)
    out = loss(case.inputs)
    mask = case.inputs.student["main"].mask
    ce = torch.nn.functional.cross_entropy(
        case.s_logits[mask].float(), case.inputs.student["main"].targets[mask], reduction="sum"
    ) / case.inputs.num_tokens
    assert_close(out.total, 0.4 * ce + 0.6 * ref_uld(case, 1.0), rtol=1e-5, what="total")
    assert "kd/uld" in out.parts


def test_bf16_inputs_run_in_fp32() -> None:
    case = make_case(s_len=[4, 0, 2], t_len=[3, 2, 5], dtype=torch.bfloat16, seed=7)
    uld, _ = ULD(config(name="uld"), case.ctx)(case.inputs)
    uld.backward()
    assert uld.dtype == torch.float32 and torch.isfinite(uld)
    assert case.s_logits.grad is not None and torch.isfinite(case.s_logits.grad.float()).all()
