"""How teacher and student ranks run (`runtime.*`): mode, backend, deadlines, ZeRO stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cot2align.configbase import ConfigBase, require


@dataclass
class RuntimeConfig(ConfigBase):
    """How teacher and students run (`runtime.*`)."""

    mode: Literal["colocated", "served"] = "colocated"
    """colocated: the teacher runs in the student's process; served: teacher ranks
    (teacher.parallel) serve hidden states to student ranks (student.parallel)."""
    teacher_backend: Literal["hf", "megatron"] = "hf"
    """hf: the HF teacher on one rank per replica (tp = pp = 1); megatron: megatron-core
    shards over teacher.parallel.tp x teacher.parallel.pp ranks (Llama-family teachers)."""
    prefetch: int = 2
    """Micro-batches a teacher rank computes ahead of each student it serves (0 = in lockstep)."""
    timeout_s: float = 300.0
    """Deadline of every receive of teacher states on a student, after the first one."""
    startup_timeout_s: float = 1800.0
    """Deadline of start-up (process groups, the first request and the first states) and of a
    student accepting sent states (students may pause for evaluation and checkpoints)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl when CUDA is available, else gloo."""
    wire_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the states on the wire; auto = bfloat16 on GPU, float32 on CPU."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage of the students (0-3; 1 partitions the optimizer state, 2 also the
    gradients, 3 also the weights: evaluation, export and checkpoints then gather them, one
    module at a time, from every student into a whole copy kept on the first student; every
    student then calls the same modules in each micro-batch, as every micro-batch runs the
    step's formats: see cot2align.data.dataset.collate)."""
    zero3_persist_below: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every student (DeepSpeed's
    stage3_param_persistence_threshold; 0 = partition every parameter)."""
    world_size: int = 0
    """Processes of a local launch (0 = teacher ranks + student.parallel.dp, dp -1 counting as 1)."""

    def check(self, prefix: str) -> None:
        require(self.prefetch >= 0, f"{prefix}.prefetch", f"must be >= 0, got {self.prefetch}")
        require(self.timeout_s > 0, f"{prefix}.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.startup_timeout_s > 0, f"{prefix}.startup_timeout_s",
                f"must be > 0, got {self.startup_timeout_s}")
        require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage",
                f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.zero3_persist_below >= 0, f"{prefix}.zero3_persist_below",
                f"must be >= 0, got {self.zero3_persist_below}")
        require(self.world_size >= 0, f"{prefix}.world_size", f"must be >= 0, got {self.world_size}")
