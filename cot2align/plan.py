"""Cluster planner: choose teacher TP x PP x replicas and student DP from a memory and throughput model.

Everything here is arithmetic on HF ``config.json`` numbers (no weights, no torch), so a
64-GPU layout can be planned on a laptop (``cot2align plan``). The model is deliberately
explicit; every number in a `Plan` can be re-derived by hand from the formulas below.

Notation
--------
B      bytes per element of the compute dtype (bf16/fp16: 2, fp32: 4)
b      micro-batch size (examples); r = b * formats rows per micro-batch (cot + std)
s_t    teacher sequence length; s_s student sequence length
T_t    = r * s_t teacher tokens per micro-batch; T_s = r * s_s student tokens
L, h, f, V, a        layers, hidden size, FFN size, vocabulary, attention heads
q_dim  = a * head_dim; kv_dim = query_groups * head_dim
P_layer  parameters of one transformer layer (see `ModelSpec`)
k      = ceil(dp / R): students served by the busiest teacher replica (student i -> replica i mod R)
n      = workload.served_layers; q = workload.prefetch

Teacher shard memory (the heaviest pipeline stage; forward only, under no_grad)
-----------------------------------------------------------------------------
weights  = B * [ (L/pp) * P_layer / tp + first: V*h/tp + P_pos + last: P_final_norm + P_out/tp ]
           (pp = 1: one stage holds both). P_out = V*h when the head is untied, or when it is
           tied and pp > 1 (Megatron keeps a copy of the tied embedding on the last stage).
           Learned position embeddings and the final norm are replicated over tp.
activations = B * [ T_t * (4h + q_dim + 2 kv_dim + n_f f) / tp          (one layer's working set)
                    + (no flash) 2 r (a/tp) s_t^2                      (scores + probabilities)
                    + (pp > 1) 2 T_t h ]                               (p2p recv + send buffers)
           n_f = 3 for gated (SwiGLU/GeGLU: gate, up, product), 2 for GELU (fc out, activation).
           Only one micro-batch is computed per stage at a time; the other in-flight ones sit
           in the p2p buffers.
served buffers = k * (q + 1) * n * T_t * h * B   (whole sequences: an upper bound on response-only)
reserved = cluster.reserved_gib (CUDA context, NCCL buffers, allocator fragmentation)

Student memory (one DP rank, mixed-precision AdamW, no activation recomputation)
-------------------------------------------------------------------------------
Psi = P_student + P_proj,  P_proj = projectors * (h_s * h_t + h_t)     (trainable)
      with LoRA adapters of rank r_a: Psi = P_lora + P_proj, P_lora = L_s * sum r_a (in + out) over the
      target linears of a layer; the frozen P_student then counts in the weights only
weights = B * (Psi + frozen) / (dp if stage 3)          gradients = B * Psi / (dp if stage >= 2)
optimizer = (4 master (not for fp32) + 8 Adam m, v) * Psi / (dp if stage >= 1)
           (bf16: 2 + 2 + 12 = 16 bytes/param, the ZeRO paper's accounting)
teacher head = B * V_t * h_t     (frozen copy for logit KD; if workload.student_holds_teacher_head)
activations = B * T_s * L_s * (4h + 2 q_dim + 2 kv_dim + m_f f) + (no flash) B * L_s * 2 r a s_s^2
           m_f = 4 gated (gate, up, act(gate), product), 2 GELU (fc out, activation)
logits = T_s * V_s * (B + 4 + 4)  (bf16 logits, fp32 log-probs, fp32 grad)
       + T_t * V_t * (B + 4)      (teacher logits from the frozen head, no grad; if held)
received states = (q + 1) * n * T_t * h_t * B
ot = ot_pairs * n * b * s_s * s_t * 4 * 3     (fp32 cost, kernel and plan per pair and layer)
zero buffers = (dp > 1) 2 * min(zero_bucket_elements, Psi) * B
reserved = cluster.reserved_gib

Throughput (F = peak_tflops * 1e12 * mfu FLOP/s per GPU; bandwidths in GB/s = 1e9 bytes/s)
-----------------------------------------------------------------------------------------
teacher stage time per micro-batch:
   t_compute = 2 * L_t * P_layer_t * T_t / (tp * pp * F)   (forward; no logits: the teacher serves states)
   t_tp = (L_t/pp) * 2 * (2 (tp-1)/tp) * T_t * h_t * B / bw_intra   (2 ring all-reduces per layer)
   t_pp = (pp > 1) * T_t * h_t * B / bw_pp      (bw_pp = inter-node if any stage hop crosses a node)
   t_stage = t_compute + t_tp + t_pp;  t_wire = n * T_t * h_t * B / bw_inter  (served states out)
   replica capacity (micro-batches/s) = min(1 / t_stage, 1 / t_wire)
   rate one replica gives each of its k students:
   rho_t = min(1 / (k t_stage), (q + 1) / (pp t_stage), 1 / (k t_wire))
   (the middle term: a pipeline needs pp micro-batches in flight; each student keeps q + 1)
student time per micro-batch:
   C_s = L_s * P_layer_s + V_s * h_s + P_proj      (matmul parameters incl. its LM head)
   t_compute = (6 * C_s * T_s + head_flops * V_t * h_t * T_t) / F
              (LoRA: (4 C_s + 2 Psi) * T_s: frozen weights need no weight gradient)
   t_dp = (dp > 1) * v * Psi * B * (dp-1)/dp / bw_dp / grad_accum   (v = 2, or 3 for ZeRO-3;
          bw_dp = intra-node if all students share one node, else inter-node; not overlapped)
   rho_s = 1 / (t_compute + t_dp)
DP steps are synchronous, so every student runs at rho = min(rho_s, rho_t) micro-batches/s:
   examples/s = dp * rho * b;  teacher tokens/s = dp * rho * T_t;  student tokens/s = dp * rho * T_s
   teacher idle = 1 - dp * rho / (R * replica capacity);  student idle = 1 - rho / rho_s
The search maximises examples/s over all layouts that fit (ties: smaller tp * pp, then smaller pp),
which balances the two roles as well as whole GPUs allow. `Plan.idle_fraction` is the idle fraction
of the faster role, i.e. the time it waits for the slower (bottleneck) one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cot2align.configbase import ConfigBase, ConfigError, load_yaml, require
from cot2align.modelspec import ModelSpec, load_model_spec

GIB = 1024**3
"""Bytes per GiB; every memory number of a plan is in GiB."""
SIZE_NAMES = ("tp", "pp", "replicas", "dp")
"""Sizes the planner chooses; any of them may be fixed explicitly."""
DEFAULT_KEY_NAMES: dict[str, str] = {
    "tp": "teacher.tp",
    "pp": "teacher.pp",
    "replicas": "teacher.replicas",
    "dp": "student.dp",
}
"""Config keys named in errors about fixed sizes."""
_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


# ----------------------------------------------------------------------------- configuration


@dataclass
class ClusterSpec(ConfigBase):
    """The machines (`cluster.*`): GPU count, memory, links and speed."""

    nodes: int = 1
    """Slurm nodes."""
    gpus_per_node: int = 8
    """GPUs per node; teacher tensor parallelism never crosses a node."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (an "80 GB" A100/H100 has 80 GiB)."""
    intra_node_bandwidth_gbs: float = 300.0
    """Per-GPU NVLink bandwidth in GB/s seen by ring collectives."""
    inter_node_bandwidth_gbs: float = 25.0
    """Per-GPU inter-node bandwidth in GB/s (a 200 Gb/s NIC per GPU is 25)."""
    peak_tflops: float = 312.0
    """Dense bf16 peak TFLOP/s per GPU (A100: 312, H100 SXM: 989)."""
    mfu: float = 0.4
    """Assumed model-FLOPs utilisation of the matmuls."""
    reserved_gib: float = 3.0
    """Fixed per-GPU overhead: CUDA context, NCCL buffers, allocator fragmentation."""
    memory_headroom: float = 0.10
    """Fraction of GPU memory every plan leaves free."""

    @property
    def world_size(self) -> int:
        """nodes * gpus_per_node."""
        return self.nodes * self.gpus_per_node

    @property
    def usable_gib(self) -> float:
        """gpu_memory_gib * (1 - memory_headroom)."""
        return self.gpu_memory_gib * (1.0 - self.memory_headroom)

    @property
    def flops_per_gpu(self) -> float:
        """Sustained FLOP/s per GPU: peak_tflops * 1e12 * mfu."""
        return self.peak_tflops * 1e12 * self.mfu

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        require(self.nodes >= 1, f"{p}nodes", f"must be >= 1, got {self.nodes}")
        require(self.gpus_per_node >= 1, f"{p}gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        require(self.gpu_memory_gib > 0, f"{p}gpu_memory_gib", f"must be > 0, got {self.gpu_memory_gib}")
        for k in ("intra_node_bandwidth_gbs", "inter_node_bandwidth_gbs", "peak_tflops"):
            require(getattr(self, k) > 0, f"{p}{k}", f"must be > 0, got {getattr(self, k)}")
        require(0 < self.mfu <= 1, f"{p}mfu", f"must be in (0, 1], got {self.mfu}")
        require(
            0 <= self.reserved_gib < self.gpu_memory_gib,
            f"{p}reserved_gib",
            f"must be in [0, gpu_memory_gib={self.gpu_memory_gib}), got {self.reserved_gib}",
        )
        require(
            0 <= self.memory_headroom < 1,
            f"{p}memory_headroom",
            f"must be in [0, 1), got {self.memory_headroom}",
        )


@dataclass
class WorkloadSpec(ConfigBase):
    """What one training step does, as far as memory and FLOPs are concerned."""

    teacher_seq_len: int = 512
    """Tokens per teacher sequence (prompt + response, teacher tokenizer)."""
    student_seq_len: int = 512
    """Tokens per student sequence (student tokenizer)."""
    micro_batch_size: int = 4
    """Examples per student micro-batch (the teacher serves the same examples)."""
    formats: int = 2
    """Sequences per example (2: the CoT and the standard format)."""
    grad_accum: int = 2
    """Micro-batches per optimizer step (amortises the DP gradient exchange)."""
    prefetch: int = 2
    """Micro-batches the teacher may run ahead of each student."""
    student_zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of the students."""
    dtype: Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = "bf16"
    """Compute dtype of weights and activations (students train in mixed precision)."""
    flash_attention: bool = True
    """False adds the O(s^2) attention score tensors to activations."""
    served_layers: int = 2
    """Teacher hidden-state layers sent per format (default: embedding and final-norm outputs)."""
    projectors: int = 2
    """Trainable h_s x h_t linear projectors on the student."""
    student_holds_teacher_head: bool = True
    """The student keeps a frozen copy of the teacher output layer for logit-based KD."""
    teacher_head_flops_per_param: float = 2.0
    """FLOPs per teacher token per head parameter on the student: 2 = teacher logits (forward);
    6 if the student's projected states also pass through it with input gradients (DSKD)."""
    ot_pairs: int = 3
    """OT problems per example and layer (Cross-CoT: 3 pairs; 1 without cross pairs)."""
    zero_bucket_elements: int = 500_000_000
    """DeepSpeed reduce/all-gather bucket size (elements); two buckets are resident."""
    examples: int = 0
    """Training examples (the cache's disk estimate; 0 = unknown: per example and per 100k only)."""
    cache_dtype: Literal["bfloat16", "float32", "int8"] = "bfloat16"
    """Storage dtype of the teacher-state cache (teacher.cache.dtype)."""
    student_lora_rank: int = 0
    """Rank of the student's LoRA adapters (student_lora.r when student_lora.enabled); 0 = every
    student weight trains. With adapters the base weights are frozen: weights memory only."""
    student_lora_targets: list[str] = field(default_factory=list)
    """Module names that get adapters (student_lora.target_modules); see `LORA_SHAPES`."""

    @property
    def dtype_bytes(self) -> int:
        """B: bytes per element of the compute dtype."""
        return _DTYPE_BYTES[self.dtype]

    @property
    def rows(self) -> int:
        """Sequences per micro-batch: micro_batch_size * formats."""
        return self.micro_batch_size * self.formats

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        for k in (
            "teacher_seq_len",
            "student_seq_len",
            "micro_batch_size",
            "formats",
            "grad_accum",
            "served_layers",
        ):
            require(getattr(self, k) >= 1, f"{p}{k}", f"must be >= 1, got {getattr(self, k)}")
        require(self.student_lora_rank >= 0, f"{p}student_lora_rank", f"must be >= 0, got {self.student_lora_rank}")
        unknown = sorted(set(self.student_lora_targets) - set(LORA_SHAPES))
        require(not self.student_lora_rank or not unknown, f"{p}student_lora_targets",
                f"the planner knows the shapes of {sorted(LORA_SHAPES)}, not {unknown} (student_lora.target_modules); "
                "plan without them or set launch.plan=false")
        for k in ("prefetch", "projectors", "ot_pairs", "zero_bucket_elements", "examples"):
            require(getattr(self, k) >= 0, f"{p}{k}", f"must be >= 0, got {getattr(self, k)}")
        require(
            self.teacher_head_flops_per_param >= 0,
            f"{p}teacher_head_flops_per_param",
            f"must be >= 0, got {self.teacher_head_flops_per_param}",
        )


@dataclass
class FixedSizes(ConfigBase):
    """Sizes given explicitly (`fixed.*` on the CLI); unset ones are chosen by the planner."""

    tp: int | None = None
    """Teacher tensor-parallel size."""
    pp: int | None = None
    """Teacher pipeline-parallel size."""
    replicas: int | None = None
    """Teacher replicas (0 = a run from the teacher-state cache: `cot2align plan` prints the cached layout)."""
    dp: int | None = None
    """Student data-parallel size."""


# ----------------------------------------------------------------------------- the model


@dataclass
class MemoryBreakdown:
    """Per-GPU memory of one role, by component, in GiB."""

    role: str
    components: dict[str, float]
    capacity_gib: float
    """Physical GPU memory."""
    usable_gib: float
    """capacity * (1 - memory_headroom)."""
    detail: str = ""
    """Which GPU this is (e.g. the heaviest pipeline stage)."""

    @property
    def total_gib(self) -> float:
        """Sum of the components."""
        return sum(self.components.values())

    @property
    def headroom(self) -> float:
        """Free fraction of the GPU: 1 - total / capacity."""
        return 1.0 - self.total_gib / self.capacity_gib

    @property
    def fits(self) -> bool:
        """total <= usable."""
        return self.total_gib <= self.usable_gib

    def describe(self) -> str:
        """One line: total and the components."""
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.components.items())
        return f"{self.total_gib:.2f} GiB ({parts})"


def teacher_stage_params(t: ModelSpec, tp: int, pp: int) -> tuple[float, str]:
    """Parameters held by one GPU of the heaviest pipeline stage, and which stage it is."""
    body = (t.num_layers // pp) * t.layer_params / tp
    out = t.vocab_size * t.hidden_size if (not t.tied_embeddings or pp > 1) else 0
    first = body + t.embedding_params / tp + t.position_params
    last = body + t.final_norm_params + out / tp
    if pp == 1:
        return first + last - body, "single stage"
    return (first, "first stage") if first >= last else (last, "last stage")


def teacher_memory(
    t: ModelSpec, cluster: ClusterSpec, wl: WorkloadSpec, tp: int, pp: int, students_per_replica: int
) -> MemoryBreakdown:
    """Memory of the heaviest teacher shard (see the module docstring for the formulas)."""
    B, r, s = wl.dtype_bytes, wl.rows, wl.teacher_seq_len
    T = r * s
    params, which = teacher_stage_params(t, tp, pp)
    n_f = 3 if t.gated_mlp else 2
    act = T * (4 * t.hidden_size + t.q_dim + 2 * t.kv_dim + n_f * t.ffn_size) / tp
    if not wl.flash_attention:
        act += 2 * r * (t.num_heads / tp) * s * s
    if pp > 1:
        act += 2 * T * t.hidden_size
    served = students_per_replica * (wl.prefetch + 1) * wl.served_layers * T * t.hidden_size * B
    comps = {
        "weights": params * B / GIB,
        "activations": act * B / GIB,
        "served buffers": served / GIB,
        "reserved": cluster.reserved_gib,
    }
    return MemoryBreakdown("teacher", comps, cluster.gpu_memory_gib, cluster.usable_gib, which)


def projector_params(s: ModelSpec, t: ModelSpec, wl: WorkloadSpec) -> int:
    """P_proj = projectors * (h_s * h_t + h_t)."""
    return wl.projectors * (s.hidden_size * t.hidden_size + t.hidden_size)


LORA_SHAPES: dict[str, Callable[[ModelSpec], list[tuple[int, int]]]] = {
    "q_proj": lambda m: [(m.hidden_size, m.q_dim)],
    "k_proj": lambda m: [(m.hidden_size, m.kv_dim)],
    "v_proj": lambda m: [(m.hidden_size, m.kv_dim)],
    "o_proj": lambda m: [(m.q_dim, m.hidden_size)],
    "gate_proj": lambda m: [(m.hidden_size, m.ffn_size)],
    "up_proj": lambda m: [(m.hidden_size, m.ffn_size)],
    "down_proj": lambda m: [(m.ffn_size, m.hidden_size)],
    "c_attn": lambda m: [(m.hidden_size, m.q_dim + 2 * m.kv_dim)],
    "c_proj": lambda m: [(m.q_dim, m.hidden_size), (m.ffn_size, m.hidden_size)],  # GPT-2: attention and MLP
    "c_fc": lambda m: [(m.hidden_size, m.ffn_size)],
}
"""Module name -> the (in, out) sizes of the linear layers of that name in one transformer layer
(Llama / Qwen / Mistral names, GPT-2 names)."""


def lora_params(s: ModelSpec, rank: int, targets: Sequence[str]) -> int:
    """P_lora = L_s * sum over target linears of r * (in + out): A is r x in, B is out x r."""
    return s.num_layers * sum(rank * (i + o) for name in set(targets) for i, o in LORA_SHAPES[name](s))


def student_trainable_params(s: ModelSpec, t: ModelSpec, wl: WorkloadSpec) -> int:
    """Psi: every student weight, or its LoRA adapters (workload.student_lora_rank), plus the projectors."""
    own = lora_params(s, wl.student_lora_rank, wl.student_lora_targets) if wl.student_lora_rank else s.total_params
    return own + projector_params(s, t, wl)


def student_memory(
    s: ModelSpec, t: ModelSpec, cluster: ClusterSpec, wl: WorkloadSpec, dp: int
) -> MemoryBreakdown:
    """Memory of one student DP rank under its ZeRO stage (see the module docstring)."""
    B, r, z = wl.dtype_bytes, wl.rows, wl.student_zero_stage
    T_s, T_t = r * wl.student_seq_len, r * wl.teacher_seq_len
    psi = student_trainable_params(s, t, wl)
    frozen = s.total_params if wl.student_lora_rank else 0
    master = 0 if B == 4 else 4
    m_f = 4 if s.gated_mlp else 2
    act = T_s * s.num_layers * (4 * s.hidden_size + 2 * s.q_dim + 2 * s.kv_dim + m_f * s.ffn_size)
    if not wl.flash_attention:
        act += s.num_layers * 2 * r * s.num_heads * wl.student_seq_len**2
    logits = T_s * s.vocab_size * (B + 4 + 4)
    head = 0
    if wl.student_holds_teacher_head:
        head = t.vocab_size * t.hidden_size * B
        logits += T_t * t.vocab_size * (B + 4)
    comps = {
        "weights": B * (psi + frozen) / (dp if z == 3 else 1) / GIB,
        "gradients": B * psi / (dp if z >= 2 else 1) / GIB,
        "optimizer": (master + 8) * psi / (dp if z >= 1 else 1) / GIB,
        "teacher head": head / GIB,
        "activations": act * B / GIB,
        "logits": logits / GIB,
        "received states": (wl.prefetch + 1) * wl.served_layers * T_t * t.hidden_size * B / GIB,
        "ot": wl.ot_pairs
        * wl.served_layers
        * wl.micro_batch_size
        * wl.student_seq_len
        * wl.teacher_seq_len
        * 12
        / GIB,
        "zero buffers": (2 * min(wl.zero_bucket_elements, psi) * B if dp > 1 else 0) / GIB,
        "reserved": cluster.reserved_gib,
    }
    return MemoryBreakdown("student", comps, cluster.gpu_memory_gib, cluster.usable_gib,
                           f"ZeRO-{z}, dp {dp}" + (f", LoRA r={wl.student_lora_rank}" if wl.student_lora_rank else ""))


def pipeline_crosses_nodes(tp: int, pp: int, replicas: int, gpus_per_node: int) -> bool:
    """Whether any stage-to-stage hop of any replica goes between nodes (replica j, stage k at j*tp*pp + k*tp)."""
    m = tp * pp
    period = gpus_per_node // math.gcd(m, gpus_per_node)
    return any(
        (j * m + k * tp) % gpus_per_node == 0 for j in range(min(replicas, period)) for k in range(1, pp)
    )


@dataclass
class Timing:
    """Seconds per micro-batch of each modelled phase (see the module docstring)."""

    teacher_compute: float
    teacher_tp_comm: float
    teacher_pp_comm: float
    teacher_wire: float
    student_compute: float
    student_dp_comm: float

    @property
    def teacher_stage(self) -> float:
        """t_stage = compute + tp all-reduces + pp send."""
        return self.teacher_compute + self.teacher_tp_comm + self.teacher_pp_comm

    @property
    def student_step(self) -> float:
        """Student seconds per micro-batch: compute + amortised DP exchange."""
        return self.student_compute + self.student_dp_comm


def timing(
    t: ModelSpec,
    s: ModelSpec,
    cluster: ClusterSpec,
    wl: WorkloadSpec,
    tp: int,
    pp: int,
    replicas: int,
    dp: int,
) -> Timing:
    """Per-micro-batch times of both roles for one layout."""
    B, F, r = wl.dtype_bytes, cluster.flops_per_gpu, wl.rows
    T_t, T_s = r * wl.teacher_seq_len, r * wl.student_seq_len
    intra, inter = cluster.intra_node_bandwidth_gbs * 1e9, cluster.inter_node_bandwidth_gbs * 1e9
    act_bytes = T_t * t.hidden_size * B
    t_comp = 2 * t.num_layers * t.layer_params * T_t / (tp * pp * F)
    t_tp = (t.num_layers / pp) * 2 * (2 * (tp - 1) / tp) * act_bytes / intra
    bw_pp = inter if pipeline_crosses_nodes(tp, pp, replicas, cluster.gpus_per_node) else intra
    t_pp = act_bytes / bw_pp if pp > 1 else 0.0
    t_wire = wl.served_layers * act_bytes / inter
    proj = projector_params(s, t, wl)
    c_s = s.num_layers * s.layer_params + s.vocab_size * s.hidden_size + proj
    psi = student_trainable_params(s, t, wl)
    # 2 forward + 2 input-gradient FLOPs per matmul parameter, + 2 weight-gradient for trainable ones
    flops_s: float = (4 * c_s + 2 * (psi if wl.student_lora_rank else c_s)) * T_s
    if wl.student_holds_teacher_head:
        flops_s += wl.teacher_head_flops_per_param * t.vocab_size * t.hidden_size * T_t
    g = cluster.gpus_per_node
    first_student = replicas * tp * pp
    bw_dp = intra if first_student // g == (cluster.world_size - 1) // g else inter
    v = 3 if wl.student_zero_stage == 3 else 2
    t_dp = v * psi * B * (dp - 1) / dp / bw_dp / wl.grad_accum if dp > 1 else 0.0
    return Timing(t_comp, t_tp, t_pp, t_wire, flops_s / F, t_dp)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A layout (teacher tp x pp x replicas, student dp), its memory and its expected throughput."""

    teacher: ModelSpec
    student: ModelSpec
    cluster: ClusterSpec
    workload: WorkloadSpec
    tp: int
    pp: int
    replicas: int
    dp: int
    world_size: int
    teacher_memory: MemoryBreakdown
    student_memory: MemoryBreakdown
    timing: Timing
    students_per_replica: int
    """k = ceil(dp / replicas): students served by the busiest replica."""
    examples_per_s: float
    teacher_tokens_per_s: float
    """Expected teacher tokens/s (all replicas, all formats)."""
    student_tokens_per_s: float
    """Expected student tokens/s (all DP ranks, all formats)."""
    teacher_capacity_tokens_per_s: float
    """Teacher tokens/s if the teacher never waited."""
    student_capacity_tokens_per_s: float
    """Student tokens/s if the students never waited."""
    teacher_idle: float
    student_idle: float
    bottleneck: Literal["teacher", "student"]
    idle_fraction: float
    """Idle fraction of the faster role (time spent waiting for the bottleneck)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def teacher_gpus(self) -> int:
        """replicas * tp * pp."""
        return self.replicas * self.tp * self.pp

    @property
    def student_gpus(self) -> int:
        """dp."""
        return self.dp

    @property
    def fits(self) -> bool:
        """Both roles fit under the headroom."""
        return self.teacher_memory.fits and self.student_memory.fits

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the plan (memory components in GiB)."""
        d = dataclasses.asdict(self)
        for role in ("teacher_memory", "student_memory"):
            d[role]["total_gib"] = getattr(self, role).total_gib
        return d

    def to_markdown(self) -> str:
        """Tables: ranks per role, memory per GPU (breakdown), tokens/s per role, idle fractions."""
        c, tm, sm = self.cluster, self.teacher_memory, self.student_memory
        t_last = self.teacher_gpus - 1
        lines = [
            f"## Plan: {self.teacher.name} -> {self.student.name} on {c.nodes} node(s) x {c.gpus_per_node} GPUs "
            f"({c.gpu_memory_gib:g} GiB, {c.peak_tflops:g} TFLOP/s x MFU {c.mfu:g})",
            "",
            "| role | ranks | layout | GPUs |",
            "|---|---|---|---|",
            f"| teacher | 0-{t_last} | {self.replicas} replica(s) x (tp {self.tp} x pp {self.pp}) | {self.teacher_gpus} |",
            f"| student | {self.teacher_gpus}-{self.world_size - 1} | dp {self.dp}, ZeRO-{self.workload.student_zero_stage}, "
            f"{self.students_per_replica} student(s) per replica max | {self.dp} |",
            f"| total | 0-{self.world_size - 1} | world size {self.world_size} | {self.world_size} |",
            "",
            f"Memory per GPU (GiB): teacher = {tm.detail}; student = {sm.detail}",
            "",
            "| component | teacher | student |",
            "|---|---:|---:|",
        ]
        names = list(dict.fromkeys([*tm.components, *sm.components]))
        for n in names:
            tv = f"{tm.components[n]:.2f}" if n in tm.components else ""
            sv = f"{sm.components[n]:.2f}" if n in sm.components else ""
            lines.append(f"| {n} | {tv} | {sv} |")
        lines += [
            f"| **total** | **{tm.total_gib:.2f}** | **{sm.total_gib:.2f}** |",
            f"| usable ({c.gpu_memory_gib:g} x {1 - c.memory_headroom:.2f}) | {tm.usable_gib:.2f} | {sm.usable_gib:.2f} |",
            f"| headroom | {tm.headroom:.1%} | {sm.headroom:.1%} |",
            "",
            "| role | capacity tokens/s | expected tokens/s | idle |",
            "|---|---:|---:|---:|",
            f"| teacher | {self.teacher_capacity_tokens_per_s:,.0f} | {self.teacher_tokens_per_s:,.0f} | {self.teacher_idle:.1%} |",
            f"| student | {self.student_capacity_tokens_per_s:,.0f} | {self.student_tokens_per_s:,.0f} | {self.student_idle:.1%} |",
            "",
            f"Expected {self.examples_per_s:.2f} examples/s; bottleneck: {self.bottleneck}; "
            f"idle fraction of the faster side: {self.idle_fraction:.1%}",
        ]
        if self.warnings:
            lines += ["", "Warnings:", *[f"- {w}" for w in self.warnings]]
        return "\n".join(lines) + "\n"


def evaluate(
    t: ModelSpec,
    s: ModelSpec,
    cluster: ClusterSpec,
    wl: WorkloadSpec,
    tp: int,
    pp: int,
    replicas: int,
    dp: int,
) -> Plan:
    """Memory and throughput of one layout (whether or not it fits); see the module docstring."""
    k = math.ceil(dp / replicas)
    tm = teacher_memory(t, cluster, wl, tp, pp, k)
    sm = student_memory(s, t, cluster, wl, dp)
    tim = timing(t, s, cluster, wl, tp, pp, replicas, dp)
    T_t, T_s = wl.rows * wl.teacher_seq_len, wl.rows * wl.student_seq_len
    replica_cap = min(1 / tim.teacher_stage, 1 / tim.teacher_wire)
    rho_t = min(
        1 / (k * tim.teacher_stage), (wl.prefetch + 1) / (pp * tim.teacher_stage), 1 / (k * tim.teacher_wire)
    )
    rho_s = 1 / tim.student_step
    rho = min(rho_s, rho_t)
    teacher_idle = 1 - dp * rho / (replicas * replica_cap)
    student_idle = 1 - rho / rho_s
    bottleneck: Literal["teacher", "student"] = "teacher" if rho_t < rho_s else "student"
    warnings = [*t.notes, *s.notes]
    if dp < replicas:
        warnings.append(f"dp {dp} < replicas {replicas}: {replicas - dp} teacher replica(s) serve nobody")
    elif dp % replicas:
        warnings.append(
            f"dp {dp} is not a multiple of replicas {replicas}: replicas serve unequal student counts"
        )
    if k * (wl.prefetch + 1) < pp:
        warnings.append(
            f"pipeline underfilled: {k} student(s) x (prefetch {wl.prefetch} + 1) < pp {pp}; raise workload.prefetch"
        )
    if tim.teacher_wire > tim.teacher_stage:
        warnings.append(
            f"serving is bandwidth-bound: {tim.teacher_wire:.3f} s on the wire > {tim.teacher_stage:.3f} s compute"
        )
    if pp > 1 and pipeline_crosses_nodes(tp, pp, replicas, cluster.gpus_per_node):
        warnings.append("some pipeline stage hops cross nodes (inter-node bandwidth assumed for them)")
    if wl.student_zero_stage == 3 and dp == 1:
        warnings.append("ZeRO-3 with dp 1 shards nothing")
    return Plan(
        teacher=t,
        student=s,
        cluster=cluster,
        workload=wl,
        tp=tp,
        pp=pp,
        replicas=replicas,
        dp=dp,
        world_size=cluster.world_size,
        teacher_memory=tm,
        student_memory=sm,
        timing=tim,
        students_per_replica=k,
        examples_per_s=dp * rho * wl.micro_batch_size,
        teacher_tokens_per_s=dp * rho * T_t,
        student_tokens_per_s=dp * rho * T_s,
        teacher_capacity_tokens_per_s=replicas * replica_cap * T_t,
        student_capacity_tokens_per_s=dp * rho_s * T_s,
        teacher_idle=teacher_idle,
        student_idle=student_idle,
        bottleneck=bottleneck,
        idle_fraction=student_idle if bottleneck == "teacher" else teacher_idle,
        warnings=warnings,
    )


CACHE_ITEM_BYTES = {"bfloat16": 2, "float32": 4, "int8": 1}
"""Bytes per stored element of each cache dtype (int8 adds a 4-byte fp32 scale per row and layer)."""


def cache_bytes_per_token_layer(hidden: int, dtype: str) -> int:
    """Disk bytes of one teacher token's state in one layer: h_t x item bytes (+ 4 for int8's scale)."""
    return hidden * CACHE_ITEM_BYTES[dtype] + (4 if dtype == "int8" else 0)


@dataclass
class CachedLayout:
    """A run from the teacher-state cache: teacher replicas 0, every GPU a student, and the disk the
    cache needs (states of the served layers at every teacher position: an upper bound, the cache
    holds response positions only).

    disk = bytes per token and layer (h_t x item, + 4 for int8) x tokens (examples x s_t)
           x served layers x formats
    """

    dp: int
    student_memory: MemoryBreakdown
    examples_per_s: float
    bytes_per_token: int
    """bf16 bytes per teacher token: served layers x h_t x 2."""
    bytes_per_token_int8: int
    """int8 bytes per teacher token: served layers x (h_t + 4 bytes of row scale)."""
    bytes_per_example: int
    """bytes_per_token x teacher tokens per example (formats x s_t)."""
    cache_dtype: str = "bfloat16"
    """workload.cache_dtype (teacher.cache.dtype)."""
    examples: int = 0
    """workload.examples (0 = unknown)."""
    disk_bytes: int = 0
    """The whole cache in cache_dtype: see the class docstring (0 when examples is unknown)."""
    served_layers: int = 1
    teacher_hidden: int = 0
    formats: int = 1
    teacher_seq_len: int = 0

    @property
    def world_size(self) -> int:
        """GPUs of the cached run: dp (no teacher ranks)."""
        return self.dp

    def disk_line(self) -> str:
        """The disk estimate as one line of markdown."""
        per_layer = cache_bytes_per_token_layer(self.teacher_hidden, self.cache_dtype)
        per_100k = self.bytes_per_example * 100_000 / GIB
        total = (f"; for {self.examples:,} examples: {per_layer:,} B x {self.examples * self.teacher_seq_len:,} "
                 f"tokens x {self.served_layers} layer(s) x {self.formats} format(s) = "
                 f"**{self.disk_bytes / GIB:,.2f} GiB** ({self.cache_dtype})" if self.examples else "")
        return (f"Disk: {self.bytes_per_token:,} B per teacher token (bf16, {self.served_layers} layer(s) x "
                f"h_t {self.teacher_hidden} x 2; int8: {self.bytes_per_token_int8:,} B) x "
                f"{self.formats * self.teacher_seq_len} tokens per example = "
                f"{self.bytes_per_example / 2**20:.1f} MiB per example, {per_100k:,.0f} GiB per 100k examples{total} "
                "(upper bound: the cache holds response positions only).")

    def to_markdown(self, served: Plan | None = None) -> str:
        """The cached layout's table (compared with `served` when given) and the disk line."""
        vs = f" {self.examples_per_s / served.examples_per_s:.2f}x |" if served is not None else " - |"
        write = ("Write it once with `cot2align cache-teacher` (or teacher.cache.mode=auto on the served "
                 "layout above)." if served is not None else
                 "Write it first: `python launcher/submit.py --cache-first ...` (or `cot2align cache-teacher`).")
        return "\n".join([
            "## Cached run (teacher.cache.mode=read): every GPU a student",
            "",
            "| layout | GPUs | examples/s | student memory GiB | vs served |",
            "|---|---:|---:|---:|---:|",
            f"| dp {self.dp}, no teacher ranks | {self.dp} | {self.examples_per_s:.2f} | "
            f"{self.student_memory.total_gib:.2f} |{vs}",
            "",
            f"Layout: teacher.parallel.replicas 0 (no teacher rank), student.parallel.dp {self.dp}.",
            "",
            f"{self.disk_line()} {write}",
        ]) + "\n"


def cached_plan(teacher: ModelSpec, student: ModelSpec, cluster: ClusterSpec, workload: WorkloadSpec
                ) -> CachedLayout:
    """The cached run on `cluster`: teacher replicas 0, dp = every GPU (see `CachedLayout`).

    Raises ConfigError naming cluster.gpu_memory_gib when a student rank does not fit.
    """
    cluster.validate("cluster")
    workload.validate("workload")
    t, s, c, wl = teacher, student, cluster, workload
    dp = c.world_size
    tim = timing(t, s, c, wl, 1, 1, 0, dp)
    sm = student_memory(s, t, c, wl, dp)
    if not sm.fits:
        raise ConfigError(f"cluster.gpu_memory_gib: a student rank of the cached run needs {sm.describe()} at "
                          f"dp={dp}, ZeRO-{wl.student_zero_stage} > {c.usable_gib:.2f} GiB usable")
    per_token = wl.served_layers * t.hidden_size * 2
    per_example = per_token * wl.formats * wl.teacher_seq_len
    disk = (cache_bytes_per_token_layer(t.hidden_size, wl.cache_dtype) * wl.examples * wl.teacher_seq_len
            * wl.served_layers * wl.formats)
    return CachedLayout(dp=dp, student_memory=sm, examples_per_s=dp * wl.micro_batch_size / tim.student_step,
                        bytes_per_token=per_token, bytes_per_token_int8=wl.served_layers * (t.hidden_size + 4),
                        bytes_per_example=per_example, cache_dtype=wl.cache_dtype, examples=wl.examples,
                        disk_bytes=disk, served_layers=wl.served_layers, teacher_hidden=t.hidden_size,
                        formats=wl.formats, teacher_seq_len=wl.teacher_seq_len)


def cached_layout(served: Plan) -> CachedLayout:
    """The cached run on the same cluster and workload as `served` (see `CachedLayout`)."""
    return cached_plan(served.teacher, served.student, served.cluster, served.workload)


def valid_tp(t: ModelSpec, gpus_per_node: int) -> list[int]:
    """TP sizes that divide gpus_per_node (so TP groups never cross a node), heads, query groups and FFN."""
    return [
        d
        for d in range(1, gpus_per_node + 1)
        if gpus_per_node % d == 0 and t.num_heads % d == 0 and t.num_kv_heads % d == 0 and t.ffn_size % d == 0
    ]


def _check_fixed(t: ModelSpec, cluster: ClusterSpec, fixed: FixedSizes, keys: Mapping[str, str]) -> None:
    """Raise ConfigError naming the key and numbers for explicit sizes that can never work."""
    n, g = cluster.world_size, cluster.gpus_per_node
    for name in SIZE_NAMES:
        v = getattr(fixed, name)
        require(v is None or v >= 1, keys[name], f"must be >= 1, got {v}" + (
            " (replicas 0 is a run from the teacher-state cache: see `cached_plan`, `cot2align plan "
            "fixed.replicas=0`)" if name == "replicas" and v == 0 else ""))
    if fixed.tp is not None:
        tp = fixed.tp
        problems = []
        if g % tp:
            problems.append(f"gpus_per_node={g} (tensor parallelism stays within a node)")
        if t.num_heads % tp or t.num_kv_heads % tp:
            problems.append(
                f"the teacher's attention heads ({t.num_heads}) and query groups ({t.num_kv_heads})"
            )
        if t.ffn_size % tp:
            problems.append(f"the teacher's FFN size ({t.ffn_size})")
        require(not problems, keys["tp"], f"tp={tp} must divide " + " and ".join(problems))
    if fixed.pp is not None:
        require(
            t.num_layers % fixed.pp == 0,
            keys["pp"],
            f"pp={fixed.pp} must divide the teacher's {t.num_layers} layers",
        )
    if None not in (fixed.tp, fixed.pp, fixed.replicas, fixed.dp):
        assert fixed.tp and fixed.pp and fixed.replicas and fixed.dp
        used = fixed.replicas * fixed.tp * fixed.pp + fixed.dp
        require(
            used == n,
            f"{keys['replicas']}, {keys['dp']}",
            f"{fixed.replicas} replicas x (tp {fixed.tp} x pp {fixed.pp}) + dp {fixed.dp} = {used} GPUs "
            f"!= {n} ({cluster.nodes} nodes x {g} GPUs/node)",
        )
    teacher_min = (fixed.tp or 1) * (fixed.pp or 1) * (fixed.replicas or 1)
    require(
        teacher_min + (fixed.dp or 1) <= n,
        ", ".join(keys[k] for k in SIZE_NAMES if getattr(fixed, k) is not None) or "cluster.nodes",
        f"needs at least {teacher_min} teacher + {fixed.dp or 1} student GPUs, the cluster has {n}",
    )


def _better(a: Plan, b: Plan) -> bool:
    """a beats b: more examples/s (relative 1e-9), else smaller tp * pp, then smaller pp, then fewer replicas."""
    if a.examples_per_s > b.examples_per_s * (1 + 1e-9):
        return True
    if a.examples_per_s < b.examples_per_s * (1 - 1e-9):
        return False
    return (a.tp * a.pp, a.pp, a.replicas) < (b.tp * b.pp, b.pp, b.replicas)


def plan(
    teacher: ModelSpec,
    student: ModelSpec,
    cluster: ClusterSpec,
    workload: WorkloadSpec,
    fixed: Mapping[str, int | None] | FixedSizes | None = None,
    key_names: Mapping[str, str] | None = None,
) -> Plan:
    """Best layout that fits: maximal examples/s, respecting every explicitly fixed size, with at
    least one student per teacher replica (dp >= replicas: the runtime has no idle replicas).

    Raises ConfigError naming the fixed keys (or `cluster.gpu_memory_gib`) and the numbers when
    nothing fits, and naming the key when a fixed size is impossible (divisibility, node, sum).
    """
    cluster.validate("cluster")
    workload.validate("workload")
    keys = {**DEFAULT_KEY_NAMES, **(key_names or {})}
    if fixed is None:
        fx = FixedSizes()
    elif isinstance(fixed, FixedSizes):
        fx = fixed
    else:
        fx = FixedSizes.from_dict(dict(fixed), prefix="fixed")
    _check_fixed(teacher, cluster, fx, keys)
    n = cluster.world_size
    fixed_keys = ", ".join(f"{keys[k]}={getattr(fx, k)}" for k in SIZE_NAMES if getattr(fx, k) is not None)
    tps = [fx.tp] if fx.tp else valid_tp(teacher, cluster.gpus_per_node)
    pps = [fx.pp] if fx.pp else [d for d in range(1, teacher.num_layers + 1) if teacher.num_layers % d == 0]
    best: Plan | None = None
    smallest_teacher: MemoryBreakdown | None = None
    smallest_teacher_layout = ""
    smallest_student: MemoryBreakdown | None = None
    smallest_student_dp = 0
    for tp in tps:
        for pp in pps:
            m = tp * pp
            reps = [fx.replicas] if fx.replicas else range(1, (n - 1) // m + 1)
            for r in reps:
                dp = n - r * m
                if dp < r or (fx.dp is not None and dp != fx.dp):  # every replica serves a student
                    continue
                cand = evaluate(teacher, student, cluster, workload, tp, pp, r, dp)
                if smallest_teacher is None or cand.teacher_memory.total_gib < smallest_teacher.total_gib:
                    smallest_teacher, smallest_teacher_layout = (
                        cand.teacher_memory,
                        f"tp={tp}, pp={pp}, replicas={r}",
                    )
                if smallest_student is None or cand.student_memory.total_gib < smallest_student.total_gib:
                    smallest_student, smallest_student_dp = cand.student_memory, dp
                if not cand.fits:
                    continue
                if best is None or _better(cand, best):
                    best = cand
    if best is not None:
        return best
    where = fixed_keys or "cluster.gpu_memory_gib"
    usable = f"{cluster.usable_gib:.2f} GiB usable ({cluster.gpu_memory_gib:g} GiB x (1 - memory_headroom {cluster.memory_headroom:g}))"
    if smallest_teacher is None or smallest_student is None:
        raise ConfigError(f"{where}: no layout of {n} GPUs matches the fixed sizes")
    if not smallest_teacher.fits:
        raise ConfigError(
            f"{where}: the teacher shard needs at least {smallest_teacher.describe()} "
            f"at {smallest_teacher_layout} > {usable}"
        )
    if not smallest_student.fits:
        raise ConfigError(
            f"{where}: a student rank needs at least {smallest_student.describe()} at dp={smallest_student_dp}, "
            f"ZeRO-{workload.student_zero_stage} > {usable}"
        )
    raise ConfigError(f"{where}: no layout fits teacher and student memory together on {n} GPUs ({usable})")


def plan_from_files(
    teacher_config_json: str | Path,
    student_config_json: str | Path,
    cluster: ClusterSpec,
    workload: WorkloadSpec,
    fixed: Mapping[str, int | None] | None = None,
    key_names: Mapping[str, str] | None = None,
) -> Plan:
    """`plan` for two HF config.json files (or folders / preset names from configs/models/)."""
    return plan(
        load_model_spec(teacher_config_json),
        load_model_spec(student_config_json),
        cluster,
        workload,
        fixed,
        key_names,
    )


# ----------------------------------------------------------------------------- CLI


@dataclass
class PlanConfig(ConfigBase):
    """What `cot2align plan` reads: models, cluster, workload and fixed sizes."""

    teacher: str = "llama-3-70b"
    """Teacher config.json, its folder, or a preset name from configs/models/."""
    student: str = "llama-3.2-1b"
    """Student config.json, its folder, or a preset name."""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    fixed: FixedSizes = field(default_factory=FixedSizes)


def main(argv: Sequence[str] | None = None) -> int:
    """`cot2align plan [--config plan.yaml] [--json] [key=value ...]`: print the best layout."""
    ap = argparse.ArgumentParser(
        prog="cot2align plan",
        description="Choose teacher tp/pp/replicas and student dp for a cluster; print memory and throughput.",
    )
    ap.add_argument("--config", help="YAML with teacher, student, cluster, workload, fixed sections")
    ap.add_argument("--teacher", help="teacher config.json / folder / preset (same as teacher=...)")
    ap.add_argument("--student", help="student config.json / folder / preset (same as student=...)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cluster.nodes=8 fixed.tp=8")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        cfg = PlanConfig()
        if args.config:
            cfg = cfg.merged(load_yaml(args.config))
        cfg = cfg.with_overrides(list(args.overrides))
        if args.teacher:
            cfg.teacher = args.teacher
        if args.student:
            cfg.student = args.student
        cfg.validate()
        if cfg.fixed.replicas == 0:  # a run from the teacher-state cache: students only
            only = cached_plan(load_model_spec(cfg.teacher), load_model_spec(cfg.student), cfg.cluster, cfg.workload)
            print(json.dumps(dataclasses.asdict(only), indent=2) if args.json else only.to_markdown(), end="\n"
                  if args.json else "")
            return 0
        result = plan_from_files(
            cfg.teacher,
            cfg.student,
            cfg.cluster,
            cfg.workload,
            cfg.fixed.to_dict(),
            key_names={k: f"fixed.{k}" for k in SIZE_NAMES},
        )
        cached = cached_layout(result)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.to_dict(), "cached": dataclasses.asdict(cached)}, indent=2))
    else:
        print(result.to_markdown() + "\n" + cached.to_markdown(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
