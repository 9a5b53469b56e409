"""`loss.name` -> loss module. Each KD term lives in its own module."""

from __future__ import annotations

from torch import Tensor, nn

from cot2align.configbase import ConfigError
from cot2align.losses.base import DistillLoss, KDTerm, LossContext, LossInputs, LossOutput, masked_token_ce
from cot2align.losses.config import LossConfig
from cot2align.losses.dskd import DSKD
from cot2align.losses.kd import LogitKD
from cot2align.losses.mined import MinED
from cot2align.losses.multilevel_ot import MultiLevelOT
from cot2align.losses.ot import CrossCoTOT
from cot2align.losses.uld import ULD

#: KD term name -> class; each class is built as Cls(cfg: LossConfig, ctx: LossContext)
#: and called as term(inputs: LossInputs) -> (scalar, {part: scalar}).
KD_TERMS: dict[str, type[KDTerm]] = {"kd": LogitKD, "uld": ULD, "mined": MinED, "dskd": DSKD}


def build_kd_term(name: str, cfg: LossConfig, ctx: LossContext) -> KDTerm:
    """Instantiate the KD term `name` (one of KD_TERMS)."""
    if name not in KD_TERMS:
        raise ConfigError(f"loss.base: unknown KD term {name!r}; expected one of {', '.join(KD_TERMS)}")
    return KD_TERMS[name](cfg, ctx)


class Distiller(DistillLoss):
    """L = (1 - lambda) CE + lambda (KD + w * L_OT); CE alone for `sft`.

    kd: the base KD term (None for sft / cot2align with base none).
    ot: the Cross-CoT OT term (None except for cot2align).
    """

    def __init__(self, cfg: LossConfig, kd: KDTerm | None, ot: nn.Module | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.kd = kd
        self.ot = ot

    def required_layers(self) -> tuple[list[int], list[int]]:
        s, t = [-1], [-1]
        if self.ot is not None:
            s += list(self.cfg.ot.student_layers)
            t += list(self.cfg.ot.teacher_layers)
        if self.kd is not None:
            ks, kt = self.kd.required_layers()
            s += ks
            t += kt
        return sorted(set(s)), sorted(set(t))

    def terms(self, inputs: LossInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The weighted terms of L, which sum to it: "ce" = (1 - lambda) CE, "kd" = lambda KD,
        "ot" = lambda w L_OT (sft: "ce" = CE), each a scalar with grad; and the logged parts."""
        main = inputs.student["main"]
        ce = masked_token_ce(inputs.student_logits, main.targets, main.mask, inputs.num_tokens)
        parts: dict[str, Tensor] = {"ce": ce.detach()}
        if self.kd is None and self.ot is None:
            return {"ce": ce}, parts
        lam = self.cfg.kd_rate
        terms = {"ce": (1.0 - lam) * ce}
        if self.kd is not None:
            kd, kd_parts = self.kd(inputs)
            terms["kd"] = lam * kd
            parts["kd"] = kd.detach()
            parts.update({f"kd/{k}": v.detach() for k, v in kd_parts.items()})
        if self.ot is not None:
            ot, ot_parts = _with_every_call_in_graph(self.ot, inputs)
            terms["ot"] = lam * self.cfg.ot.weight * ot
            parts["ot"] = ot.detach()
            parts.update({f"ot/{k}": v.detach() for k, v in ot_parts.items()})
        return terms, parts

    def forward(self, inputs: LossInputs) -> LossOutput:
        terms, parts = self.terms(inputs)
        total: Tensor = sum(terms.values())  # type: ignore[assignment]
        return LossOutput(total, parts)


def _with_every_call_in_graph(term: nn.Module, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """term(inputs), with 0 x the outputs of every call of its parametrised submodules added to the value.

    A projection whose output no problem uses (the teacher "aux" states of a micro-batch without
    CoT-paired records) then still gets its backward pass: ZeRO-3 gathers a module's weights in
    backward once per call in the graph, so every student must have the same calls there.
    """
    outs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o) if isinstance(o, Tensor) else None)
             for m in term.modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        value, parts = term(inputs)
    finally:
        for h in hooks:
            h.remove()
    return value + 0.0 * sum((o.sum() for o in outs), value.new_zeros(())), parts


def build_loss(cfg: LossConfig, ctx: LossContext) -> DistillLoss:
    """Build the loss module named by `cfg.name`; its parameters train with cfg.projector_lr."""
    if cfg.name in ("kd",) or cfg.base == "kd":
        if not ctx.same_tokenizer:
            raise ConfigError(
                "loss.name/loss.base: 'kd' needs teacher and student to share one vocabulary, but their "
                f"tokenizers differ (student vocab {ctx.vocab_student}, teacher vocab {ctx.vocab_teacher}); "
                "use uld, mined or dskd for different tokenizers"
            )
    if cfg.name == "sft":
        return Distiller(cfg, None, None)
    if cfg.name == "multilevel_ot":
        return MultiLevelOT(cfg, ctx)
    if cfg.name == "cot2align":
        kd = None if cfg.base == "none" else build_kd_term(cfg.base, cfg, ctx)
        return Distiller(cfg, kd, CrossCoTOT(cfg.ot, ctx))
    return Distiller(cfg, build_kd_term(cfg.name, cfg, ctx), None)


def loss_names() -> list[str]:
    """All names accepted by `loss.name`."""
    return ["sft", *KD_TERMS, "multilevel_ot", "cot2align"]


__all__ = ["Distiller", "LossInputs", "LossOutput", "build_loss", "loss_names"]
