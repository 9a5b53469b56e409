"""Costs between student and projected teacher states, and the Cross-CoT, layer-wise OT term.

For every example, pair of formats and pair of layers, one entropic OT problem between
the student's response states X [n, d_s] and the projected teacher's Y = P(H_T) [m, d_s]
(method.md section 3):
  L_OT = normalizer / B * sum_{examples} sum_{pairs} sum_{layers} <P*, C(X, Y)>.
All problems of a micro-batch are handed to `batched_ot` at once, which buckets them by
size and solves each bucket as one padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cot2align.losses.base import LossContext, LossInputs
from cot2align.losses.config import OTConfig
from cot2align.losses.costs import COSTS, cost_scale
from cot2align.losses.sinkhorn import batched_ot, sinkhorn

#: (student format, teacher format) -> part name; main-main first, always present.
PAIRS: dict[tuple[str, str], str] = {
    ("main", "main"): "main_main",
    ("aux", "main"): "aux_main",
    ("main", "aux"): "main_aux",
}


class CrossCoTOT(nn.Module):
    """Cross-CoT, layer-wise sequence-level OT term of CoT2Align.

    Holds one projector Linear(d_teacher -> d_student) shared by all layers and pairs.
    Pairs: (S main, T main); with `cfg.cross_pairs` and "aux" views also (S aux, T main)
    and (S main, T aux). A problem whose student or teacher side is empty (e.g. the aux
    side of an unpaired example) is skipped and contributes 0.
    """

    def __init__(self, cfg: OTConfig, ctx: LossContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.projector = nn.Linear(ctx.d_teacher, ctx.d_student)
        self.record_plans = False
        """When True, each forward keeps the first sample's states (`recorded`) for `transport_plans`."""
        self.recorded: SampleStates | None = None
        self.tokenizers = (ctx.student_tokenizer, ctx.teacher_tokenizer)
        """(student, teacher) tokenizers, to label recorded plans with token strings (may be None)."""

    def pairs(self, inputs: LossInputs) -> list[tuple[str, str]]:
        """(student format, teacher format) pairs used for these inputs."""
        out = [("main", "main")]
        if self.cfg.cross_pairs and "aux" in inputs.student and "aux" in inputs.teacher:
            out += [("aux", "main"), ("main", "aux")]
        return out

    def layers(self, inputs: LossInputs) -> list[tuple[int, int]]:
        """(student layer, teacher layer) pairs with -1 resolved to the final layer."""
        return [
            (inputs.student_final if ls == -1 else ls, inputs.teacher_final if lt == -1 else lt)
            for ls, lt in zip(self.cfg.student_layers, self.cfg.teacher_layers)
        ]

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """L_OT (scalar, projector dtype) and its parts (detached scalars, normalised like L_OT).

        Reads, for each used format and layer, student hidden [B, N_s, d_s] and teacher
        hidden [B, N_t, d_t] (any float dtype) with their masks [B, N]. Parts: one per pair
        ("main_main", "aux_main", "main_aux") and one per layer pair ("layer{ls}_{lt}"), and the plan
        entropy / log(nm) of each ("entropy/main_main", "entropy/layer0_0": 1 = the product plan, OT
        aligns nothing; lower = sharper alignment), averaged over problems (summed over the micro-batches
        of a global batch, a mean over it).
        """
        if self.record_plans:
            self.recorded = self.sample_states(inputs, 0)
        dtype = self.projector.weight.dtype
        pairs = self.pairs(inputs)
        layers = self.layers(inputs)
        names = [PAIRS[p] for p in pairs] + [f"layer{ls}_{lt}" for ls, lt in layers]
        # student states and projected teacher states, split per example: (format, layer) -> [n_b, d_s] list
        xs: dict[tuple[str, int], list[Tensor]] = {}
        ys: dict[tuple[str, int], list[Tensor]] = {}
        for s_fmt, t_fmt in pairs:
            for ls, lt in layers:
                if (s_fmt, ls) not in xs:
                    view = inputs.student[s_fmt]
                    xs[(s_fmt, ls)] = _split(view.hidden[ls].to(dtype), view.mask)
                if (t_fmt, lt) not in ys:
                    view = inputs.teacher[t_fmt]
                    packed = view.hidden[lt][view.mask].to(dtype)  # [sum m_b, d_t]
                    ys[(t_fmt, lt)] = list(self.projector(packed).split(view.lengths.tolist()))
        problems: list[tuple[Tensor, Tensor]] = []
        keys: list[tuple[str, str]] = []
        for s_fmt, t_fmt in pairs:
            for ls, lt in layers:
                for x, y in zip(xs[(s_fmt, ls)], ys[(t_fmt, lt)]):
                    if x.shape[0] > 0 and y.shape[0] > 0:
                        problems.append((x, y))
                        keys.append((PAIRS[(s_fmt, t_fmt)], f"layer{ls}_{lt}"))
        scale = self.cfg.normalizer / max(float(inputs.num_examples), 1.0)
        if not problems:
            # keep the projector in the graph so data-parallel gradient reduction sees it
            zero = torch.stack([p.sum() for p in self.projector.parameters()]).sum() * 0.0
            return zero, {key: zero.detach() for name in names for key in (name, f"entropy/{name}")}
        res = batched_ot(problems, self.cfg.sinkhorn, COSTS[self.cfg.cost], self.cfg.cost_scale)
        values = res.values * scale  # [P]
        assert res.entropy_ratio is not None
        parts: dict[str, Tensor] = {}
        done = values.detach()
        # plan entropy / log(nm) per pair and per layer: the mean over this micro-batch's problems, weighted
        # by its share of the global batch, so that the trainer's sum over micro-batches and ranks is a mean
        share = inputs.student["main"].mask.shape[0] / max(float(inputs.num_examples), 1.0)
        for name in names:
            sel = [i for i, key in enumerate(keys) if name in key]
            parts[name] = done[sel].sum() if sel else done.new_zeros(())
            parts[f"entropy/{name}"] = res.entropy_ratio[sel].mean() * share if sel else done.new_zeros(())
        return values.sum(), parts


    @torch.no_grad()
    def sample_states(self, inputs: LossInputs, sample: int = 0) -> SampleStates:
        """One sample's OT problems (detached): per pair and layer, student states X [N_s, d_s] and
        projected teacher states Y [N_t, d_s], with the response token ids of each side."""
        dtype = self.projector.weight.dtype
        out = SampleStates()
        for s_fmt, t_fmt in self.pairs(inputs):
            s_view, t_view = inputs.student[s_fmt], inputs.teacher[t_fmt]
            s_mask, t_mask = s_view.mask[sample], t_view.mask[sample]  # [N_s], [N_t]
            if not (bool(s_mask.any()) and bool(t_mask.any())):
                continue
            for ls, lt in self.layers(inputs):
                name = f"{PAIRS[(s_fmt, t_fmt)]}/layer{ls}_{lt}"
                x = s_view.hidden[ls][sample][s_mask].to(dtype)
                y = self.projector(t_view.hidden[lt][sample][t_mask].to(dtype))
                out.problems[name] = (x.detach().clone(), y.detach().clone())
                out.token_ids[name] = (s_view.targets[sample][s_mask].tolist(),
                                       t_view.targets[sample][t_mask].tolist())
        return out


@dataclass
class SampleStates:
    """The OT problems of one sample: name ("main_main/layer0_0") -> (X [N_s, d], Y [N_t, d]) and
    name -> (student response token ids [N_s], teacher response token ids [N_t])."""

    problems: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    token_ids: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)


@torch.no_grad()
def transport_plans(module: CrossCoTOT, inputs: LossInputs | None = None, sample: int = 0) -> dict[str, Tensor]:
    """Entropic OT plans P [N_s, N_t] (float32, CPU) of one sample, by problem name.

    From `inputs` when given, else from the states the last forward recorded (`record_plans`).
    Solved like the loss (same cost and Sinkhorn settings), one problem at a time; row i sums
    to 1 / N_s and column j to 1 / N_t.
    """
    states = module.sample_states(inputs, sample) if inputs is not None else module.recorded
    if states is None:
        raise ValueError("transport_plans: no inputs given and nothing recorded (set record_plans first)")
    sk = module.cfg.sinkhorn
    out: dict[str, Tensor] = {}
    for name, (x, y) in states.problems.items():
        ones_x = torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device)
        ones_y = torch.ones(1, y.shape[0], dtype=torch.bool, device=y.device)
        cost = COSTS[module.cfg.cost](x[None], y[None], ones_x, ones_y)  # [1, N_s, N_t]
        s = cost_scale(cost, ones_x, ones_y, module.cfg.cost_scale)
        cost = cost if s is None else cost / s[:, None, None]
        res = sinkhorn(cost, ones_x, ones_y, epsilon=sk.epsilon, max_iter=sk.iterations, tol=sk.tolerance,
                       check_every=sk.check_every, gradient=sk.gradient, log_domain=sk.log_domain)
        out[name] = res.plan[0].float().cpu()
    return out


def _split(hidden: Tensor, mask: Tensor) -> list[Tensor]:
    """Rows of hidden [B, N, d] at mask [B, N] -> list of B tensors [n_b, d]."""
    return list(hidden[mask].split(mask.sum(1).tolist()))
