"""Configuration of the distillation losses (`loss.*` keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cot2align.configbase import ConfigBase, require

LOSS_NAMES = ("sft", "kd", "uld", "mined", "dskd", "multilevel_ot", "cot2align")
BASE_KD_NAMES = ("none", "kd", "uld", "mined", "dskd")


@dataclass
class SinkhornConfig(ConfigBase):
    """Entropic OT solver settings."""

    epsilon: float = 10.0
    """Entropic regularisation; the reference kernel exp(-0.1 C) is epsilon = 10."""
    iterations: int = 100
    """Maximum Sinkhorn iterations (the reference runs exactly 100)."""
    tolerance: float = 0.0
    """Stop when the marginal error (L1) falls below this; 0 runs all iterations."""
    check_every: int = 10
    """Check the tolerance every k iterations (avoids a host sync each iteration)."""
    gradient: Literal["unroll", "envelope"] = "unroll"
    """unroll: autograd through the iterations (the method); envelope: dC = P* (Danskin)."""
    truncate_backward: bool = True
    """unroll: end the reverse pass once the adjoints have decayed below machine precision
    (exact up to rounding; false runs it through every iteration)."""
    log_domain: Literal["auto", "always", "never"] = "auto"
    """auto switches to log-domain updates only when exp(-C/eps) could underflow."""
    bucket_size: int = 8
    """Problems are grouped by size into buckets of this many, padded within a bucket."""

    def check(self, prefix: str) -> None:
        require(self.epsilon > 0, f"{prefix}.epsilon", f"must be > 0, got {self.epsilon}")
        require(self.iterations >= 1, f"{prefix}.iterations", f"must be >= 1, got {self.iterations}")
        require(self.tolerance >= 0, f"{prefix}.tolerance", f"must be >= 0, got {self.tolerance}")
        require(self.check_every >= 1, f"{prefix}.check_every", f"must be >= 1, got {self.check_every}")
        require(self.bucket_size >= 1, f"{prefix}.bucket_size", f"must be >= 1, got {self.bucket_size}")


@dataclass
class OTConfig(ConfigBase):
    """Cross-CoT, layer-wise sequence-level OT of CoT2Align (docs/method.md section 3)."""

    cost: Literal["attention", "cosine", "euclidean"] = "attention"
    """Cost between student positions and projected teacher positions."""
    cost_scale: Literal["none", "mean", "spread"] = "none"
    """Divide each problem's cost by its mean or standard deviation before Sinkhorn (the plan then ignores
    the states' scale; a flat embedding-layer cost is stretched); none = the published raw cost."""
    student_layers: list[int] = field(default_factory=lambda: [0, -1])
    """Student layers for layer-wise OT (0 = embedding output, -1 = final-norm output)."""
    teacher_layers: list[int] = field(default_factory=lambda: [0, -1])
    """Teacher layers, paired element-wise with student_layers."""
    cross_pairs: bool = True
    """Use (S_cot,T_cot), (S_std,T_cot), (S_cot,T_std); false keeps only the same-format pair."""
    normalizer: float = 0.25
    """L_OT = normalizer / B * sum over examples, pairs, layers (the reference's 1/4B)."""
    weight: float = 1.0
    """Multiplier of L_OT inside lambda * (KD + weight * L_OT)."""
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)

    def check(self, prefix: str) -> None:
        require(len(self.student_layers) >= 1, f"{prefix}.student_layers", "needs at least one layer")
        require(
            len(self.student_layers) == len(self.teacher_layers),
            f"{prefix}.teacher_layers",
            f"must have as many entries as student_layers ({len(self.student_layers)}), got {len(self.teacher_layers)}",
        )
        require(self.normalizer > 0, f"{prefix}.normalizer", f"must be > 0, got {self.normalizer}")
        require(
            self.cost_scale in ("none", "mean", "spread"),
            f"{prefix}.cost_scale",
            f"must be none, mean or spread, got {self.cost_scale!r}",
        )


@dataclass
class KDConfig(ConfigBase):
    """Same-vocabulary logit KD (`kd`)."""

    divergence: Literal["forward_kl", "reverse_kl", "js", "skew_forward_kl", "skew_reverse_kl", "adaptive_kl"] = (
        "forward_kl"
    )
    skew: float = 0.1
    """Mixing weight of the skew KL variants."""
    adaptive_mu: float = 0.5
    """Head/tail split of adaptive KL (cumulative teacher probability)."""

    def check(self, prefix: str) -> None:
        require(0.0 < self.skew < 1.0, f"{prefix}.skew", f"must be in (0, 1), got {self.skew}")
        require(0.0 < self.adaptive_mu < 1.0, f"{prefix}.adaptive_mu", f"must be in (0, 1), got {self.adaptive_mu}")


@dataclass
class ULDConfig(ConfigBase):
    """ULD (`uld`) settings."""

    temperature: float = 1.0
    """Temperature of both softmaxes; 1 = none, as the ULD reference (loss.temperature does not apply)."""

    def check(self, prefix: str) -> None:
        require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class MinEDConfig(ConfigBase):
    """MinED: edit-distance token alignment across tokenizers."""

    id_map_cache: str = ""
    """JSON file caching the teacher->student id map ('' = <ctx.cache_dir>/mined_id_map_<hash>.json;
    no cache when both are unset). The file records a hash of both vocabularies and is rebuilt on mismatch."""
    dtw_window: int = 32
    """DTW band half-width in characters around the character-offset diagonal (0 = full n x m DP)."""
    require_overlap: bool = True
    """Use the teacher distribution only for one-to-one DTW pairs whose character spans overlap."""

    def check(self, prefix: str) -> None:
        require(self.dtw_window >= 0, f"{prefix}.dtw_window", f"must be >= 0, got {self.dtw_window}")


@dataclass
class DSKDConfig(ConfigBase):
    """DSKD with cross-model attention (docs/method.md section 4)."""

    std_scope: Literal["sequence", "batch"] = "sequence"
    """Scope of the std that normalises teacher embeddings / hidden states: each sequence's response
    positions, or all response positions of the micro-batch (the DSKD code's whole-tensor std)."""
    teacher_temperature: float = 1.0
    """Extra temperature on the t2s (teacher) side of KL(p_t2s || p_S): p_t2s = softmax(z / (tau * this))."""

    def check(self, prefix: str) -> None:
        require(
            self.teacher_temperature > 0,
            f"{prefix}.teacher_temperature",
            f"must be > 0, got {self.teacher_temperature}",
        )


@dataclass
class MultiLevelOTConfig(ConfigBase):
    """MultiLevelOT settings (docs/method.md section 4)."""

    top_k: int = 50
    """Probability columns kept on each side after re-ordering."""
    token_weight: float = 1.5
    """Weight of [token terms + sequence_weight * sequence term] added to CE."""
    sequence_weight: float = 0.1
    """Weight of the sequence-level Sinkhorn term inside the bracket (the reference's 0.1)."""
    sinkhorn_iterations: int = 10
    """Row/column normalisation rounds of the sequence-level Sinkhorn."""
    sinkhorn_epsilon: float = 0.1
    """Kernel K = exp(-W / epsilon)."""
    sequence_scale: float = 1e-3
    """Scale of each example's sequence OT value before the sum over the micro-batch (the reference's
    1e-3; sequence_weight's 0.1 is applied on top, once)."""
    temperature: float = 2.0
    """Temperature T of the re-softmax of the top-k vectors before the sequence-level cost."""
    token_ce_weight: float = 0.1
    """Weight of the token-level cross-entropy term -sum softmax(s) log_softmax(t)."""
    order: Literal["position", "mass"] = "position"
    """position: each position's distribution sorted descending (the MultiLevelOT code; the column
    re-order by total mass is then the identity); mass: vocabulary columns kept in vocabulary
    identity and re-ordered by their total mass over the sequence."""

    def check(self, prefix: str) -> None:
        require(self.top_k >= 1, f"{prefix}.top_k", f"must be >= 1, got {self.top_k}")
        require(
            self.sinkhorn_iterations >= 1,
            f"{prefix}.sinkhorn_iterations",
            f"must be >= 1, got {self.sinkhorn_iterations}",
        )
        require(self.sinkhorn_epsilon > 0, f"{prefix}.sinkhorn_epsilon", f"must be > 0, got {self.sinkhorn_epsilon}")
        require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class LossConfig(ConfigBase):
    """Which loss to train with and its settings (`loss.*`)."""

    name: Literal["sft", "kd", "uld", "mined", "dskd", "multilevel_ot", "cot2align"] = "cot2align"
    base: Literal["none", "kd", "uld", "mined", "dskd"] = "dskd"
    """KD term inside cot2align: dskd (DSKD-CMA, the paper's base), uld, mined, kd, or none (OT only)."""
    kd_rate: float = 0.5
    """lambda in L = (1 - lambda) CE + lambda (KD + L_OT)."""
    temperature: float = 2.0
    """KD temperature tau of kd, dskd and mined (ULD has its own: loss.uld.temperature)."""
    projector_lr: float = 1e-3
    """Learning rate of the loss's own parameters (OT / DSKD projectors)."""
    token_chunk: int = 1024
    """Tokens per chunk for losses that materialise [tokens, vocab] tensors."""
    chunk_checkpoint: bool = True
    """Recompute each token chunk in backward (activation checkpointing), so autograd keeps no
    [chunk, vocab] activations between chunks; off trades memory for ~1 extra loss forward."""
    ot: OTConfig = field(default_factory=OTConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    uld: ULDConfig = field(default_factory=ULDConfig)
    mined: MinEDConfig = field(default_factory=MinEDConfig)
    dskd: DSKDConfig = field(default_factory=DSKDConfig)
    multilevel_ot: MultiLevelOTConfig = field(default_factory=MultiLevelOTConfig)

    def check(self, prefix: str) -> None:
        require(0.0 <= self.kd_rate <= 1.0, f"{prefix}.kd_rate", f"must be in [0, 1], got {self.kd_rate}")
        require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        require(self.projector_lr > 0, f"{prefix}.projector_lr", f"must be > 0, got {self.projector_lr}")
        require(self.token_chunk >= 1, f"{prefix}.token_chunk", f"must be >= 1, got {self.token_chunk}")
