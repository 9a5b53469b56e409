"""Ranks -> roles and process groups by purpose, for the one torch.distributed world.

Layout of the world (R teacher replicas of TP x PP ranks each, then DP students)::

    [ replica 0 | replica 1 | ... | replica R-1 | student 0 ... student DP-1 ]
    replica r = ranks [r*TP*PP, (r+1)*TP*PP), tensor-parallel rank fastest, then stage:
    rank(r, pp_rank, tp_rank) = r*TP*PP + pp_rank*TP + tp_rank

Student i (rank R*TP*PP + i) is served by teacher replica i mod R. Hidden states of
a layer are sent by tp-rank 0 of the pipeline stage that owns the layer.

``replicas = 0`` describes a world of students only (teacher co-located with the
students, or teacher outputs read from a cache): no teacher groups, no serving map.

Group creation is collective over the WHOLE world: every rank must call
`Topology.create_groups` once, in the same program order, even ranks that are in
none of the groups. Only the groups that contain this rank are kept.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch.distributed as dist

from cot2align.configbase import ConfigBase, ConfigError, require

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

Role = Literal["teacher", "student"]
TEACHER_KEY = "teacher.parallel"
STUDENT_KEY = "student.parallel"


@dataclasses.dataclass
class TeacherParallelConfig(ConfigBase):
    """How the teacher is split over ranks (`teacher.parallel.*` keys)."""

    tp: int = 1
    """Tensor-parallel ranks per pipeline stage; must divide attention heads and KV groups."""
    pp: int = 1
    """Pipeline stages; must divide the number of transformer layers."""
    replicas: int = 1
    """Independent teacher copies (tp x pp ranks each); 0 = no dedicated teacher ranks."""

    def check(self, prefix: str) -> None:
        require(self.tp >= 1, f"{prefix}.tp", f"must be >= 1, got {self.tp}")
        require(self.pp >= 1, f"{prefix}.pp", f"must be >= 1, got {self.pp}")
        require(self.replicas >= 0, f"{prefix}.replicas", f"must be >= 0, got {self.replicas}")
        if self.replicas == 0:
            require(
                self.tp == 1 and self.pp == 1,
                f"{prefix}.replicas",
                f"is 0 (no teacher ranks), so {prefix}.tp and {prefix}.pp must be 1; "
                f"got tp={self.tp}, pp={self.pp}",
            )


@dataclasses.dataclass
class StudentParallelConfig(ConfigBase):
    """How many student replicas train data-parallel (`student.parallel.*` keys)."""

    dp: int = -1
    """Student data-parallel ranks; -1 = every rank the teachers do not use; 0 = none (a world of
    teacher ranks only: the sharded cache-teacher job)."""

    def check(self, prefix: str) -> None:
        require(self.dp >= -1, f"{prefix}.dp", f"must be >= 0 or -1 (auto), got {self.dp}")


class TeacherCoord(NamedTuple):
    """Position of a teacher rank: replica, pipeline stage, tensor-parallel rank."""

    replica: int
    pp_rank: int
    tp_rank: int


class TeacherGroups(NamedTuple):
    """Process groups of one teacher rank (its replica's groups that contain it)."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    mp: dist.ProcessGroup
    embd: dist.ProcessGroup | None
    """First + last pipeline stage of this rank's pipeline; None on middle stages."""
    pos_embd: dist.ProcessGroup | None
    """First pipeline stage; None on later stages."""
    single: dist.ProcessGroup
    """This rank alone (megatron's cp / dp / dp_cp: replicas never synchronise)."""


class Topology:
    """The validated rank layout of the world; hands out process groups by purpose.

    Pure layout queries (roles, coordinates, serving map) work without
    torch.distributed; the group getters need `create_groups` first.
    """

    def __init__(
        self,
        teacher: TeacherParallelConfig,
        student: StudentParallelConfig,
        world_size: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Validate sizes against the world.

        world_size / rank default to torch.distributed's (rank 0 if not initialised).
        Raises ConfigError naming `teacher.parallel.*` / `student.parallel.*` keys.
        """
        teacher.validate(TEACHER_KEY)
        student.validate(STUDENT_KEY)
        if world_size is None:
            if not dist.is_initialized():
                raise ValueError("world_size is required when torch.distributed is not initialised")
            world_size = dist.get_world_size()
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        self.tp, self.pp, self.replicas = teacher.tp, teacher.pp, teacher.replicas
        self.world_size, self.rank = world_size, rank
        self.num_teacher_ranks = self.tp * self.pp * self.replicas
        sizes = (
            f"{TEACHER_KEY}.tp={self.tp} x {TEACHER_KEY}.pp={self.pp} x "
            f"{TEACHER_KEY}.replicas={self.replicas} = {self.num_teacher_ranks} teacher ranks"
        )
        if student.dp == -1:
            self.dp = world_size - self.num_teacher_ranks
            if self.dp < 1:
                raise ConfigError(
                    f"world size {world_size} leaves no rank for students ({STUDENT_KEY}.dp=-1 takes the "
                    f"rest): {sizes}; need a world size of at least {self.num_teacher_ranks + 1}"
                )
        else:
            self.dp = student.dp
            if self.num_teacher_ranks + self.dp != world_size:
                raise ConfigError(
                    f"world size {world_size} != {sizes} + {STUDENT_KEY}.dp={self.dp} student ranks "
                    f"= {self.num_teacher_ranks + self.dp}"
                )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of size {world_size}")
        self._groups: dict[str, dist.ProcessGroup | None] | None = None

    # ------------------------------------------------------------------ layout
    @property
    def colocated(self) -> bool:
        """True when the world has no dedicated teacher ranks (replicas = 0)."""
        return self.replicas == 0

    @property
    def student_ranks(self) -> list[int]:
        """Global ranks of the students, in student (DP) order."""
        return list(range(self.num_teacher_ranks, self.world_size))

    def role(self, rank: int | None = None) -> Role:
        """ "teacher" or "student" for `rank` (default: this rank)."""
        r = self.rank if rank is None else rank
        self._check_rank(r)
        return "teacher" if r < self.num_teacher_ranks else "student"

    def name_rank(self, rank: int) -> str:
        """"teacher rank 1 (replica 0, pp 0, tp 1)" / "student rank 3 (dp 1)": a rank as logs and errors name it."""
        if self.role(rank) == "teacher":
            c = self.teacher_coord(rank)
            return f"teacher rank {rank} (replica {c.replica}, pp {c.pp_rank}, tp {c.tp_rank})"
        return f"student rank {rank} (dp {self.student_index(rank)})"

    def teacher_rank(self, replica: int, pp_rank: int, tp_rank: int) -> int:
        """Global rank of the teacher at (replica, pipeline stage, tensor-parallel rank)."""
        if not (0 <= replica < self.replicas and 0 <= pp_rank < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(
                f"no teacher rank at replica={replica}, pp_rank={pp_rank}, tp_rank={tp_rank} "
                f"(replicas={self.replicas}, pp={self.pp}, tp={self.tp})"
            )
        return (replica * self.pp + pp_rank) * self.tp + tp_rank

    def teacher_coord(self, rank: int | None = None) -> TeacherCoord:
        """(replica, pp_rank, tp_rank) of a teacher rank (default: this rank)."""
        r = self.rank if rank is None else rank
        if self.role(r) != "teacher":
            raise ValueError(f"rank {r} is a student, not a teacher rank")
        replica, rest = divmod(r, self.tp * self.pp)
        pp_rank, tp_rank = divmod(rest, self.tp)
        return TeacherCoord(replica, pp_rank, tp_rank)

    def teacher_ranks(self, replica: int | None = None) -> list[int]:
        """Ranks of one replica (or of all teachers), in rank order."""
        if replica is None:
            return list(range(self.num_teacher_ranks))
        size = self.tp * self.pp
        self.teacher_rank(replica, 0, 0)  # validates `replica`
        return list(range(replica * size, (replica + 1) * size))

    def student_index(self, rank: int | None = None) -> int:
        """Data-parallel index of a student rank (default: this rank)."""
        r = self.rank if rank is None else rank
        if self.role(r) != "student":
            raise ValueError(f"rank {r} is a teacher, not a student rank")
        return r - self.num_teacher_ranks

    def replica_of(self, student_rank: int | None = None) -> int:
        """Teacher replica serving a student rank: (student index) mod replicas."""
        if self.colocated:
            raise ValueError("no teacher replicas: teacher.parallel.replicas is 0")
        return self.student_index(student_rank) % self.replicas

    @property
    def serving_map(self) -> dict[int, int]:
        """Student rank -> teacher replica serving it (empty when there are no teacher ranks)."""
        if self.colocated:
            return {}
        return {s: self.replica_of(s) for s in self.student_ranks}

    def students_of(self, replica: int) -> list[int]:
        """Student ranks served by `replica`, in rank order."""
        self.teacher_rank(replica, 0, 0)
        return [s for s, r in self.serving_map.items() if r == replica]

    def stage_of_layer(self, layer: int, num_layers: int) -> int:
        """Pipeline stage owning served layer `layer` of a teacher with `num_layers` layers.

        Layer 0 is the embedding output (stage 0); layer j in 1..num_layers-1 the output of
        transformer layer j (1-based); num_layers (or -1) the final-norm output (last stage).
        Negative layers count from num_layers + 1 (as in HF's hidden_states tuple).
        """
        self.check_teacher_model(num_layers=num_layers)
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"layer {layer} is outside [-{num_layers + 1}, {num_layers}]")
        layer = layer % (num_layers + 1)
        return 0 if layer == 0 else (layer - 1) // (num_layers // self.pp)

    def sender_rank(self, replica: int, layer: int, num_layers: int) -> int:
        """Rank that sends `layer`'s hidden states of `replica`: tp-rank 0 of the owning stage."""
        return self.teacher_rank(replica, self.stage_of_layer(layer, num_layers), 0)

    def check_teacher_model(
        self, num_layers: int | None = None, num_heads: int | None = None, num_query_groups: int | None = None
    ) -> None:
        """Raise ConfigError unless tp divides heads and query groups and pp divides layers."""
        for what, n, size, key in (
            ("attention heads", num_heads, self.tp, "tp"),
            ("key/value heads (query groups)", num_query_groups, self.tp, "tp"),
            ("transformer layers", num_layers, self.pp, "pp"),
        ):
            if n is not None:
                require(
                    n % size == 0,
                    f"{TEACHER_KEY}.{key}",
                    f"{key}={size} must divide the teacher's {n} {what}",
                )

    def describe(self) -> str:
        """Multi-line human-readable layout (for dry runs and logs)."""
        lines = [f"world {self.world_size}: {self.num_teacher_ranks} teacher ranks, {self.dp} student ranks"]
        for r in range(self.replicas):
            ranks = self.teacher_ranks(r)
            lines.append(
                f"  teacher replica {r}: ranks {ranks[0]}-{ranks[-1]} (tp={self.tp}, pp={self.pp}), "
                f"serves students {self.students_of(r)}"
            )
        lines.append(f"  students (dp={self.dp}): ranks {self.student_ranks}")
        return "\n".join(lines)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of size {self.world_size}")

    # ------------------------------------------------------------------ groups
    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Membership of every group by purpose (pure; the same on every rank).

        tp: one per (replica, stage); pp: one per (replica, tp rank); mp: one per replica;
        embd: first + last stage of each pipeline (as megatron's embedding group);
        pos_embd: first stage of each pipeline; single: each teacher rank alone (used as
        megatron's cp, dp and dp_cp groups: replicas never synchronise with each other);
        teacher: all teacher ranks; student: all student ranks; student_self: each student rank
        alone (DeepSpeed's "model-parallel" group of a student: it all-reduces norms over it).
        """
        rk = self.teacher_rank
        reps, stages, tps = range(self.replicas), range(self.pp), range(self.tp)
        return {
            "tp": [[rk(r, p, t) for t in tps] for r in reps for p in stages],
            "pp": [[rk(r, p, t) for p in stages] for r in reps for t in tps],
            "mp": [self.teacher_ranks(r) for r in reps],
            "embd": [sorted({rk(r, 0, t), rk(r, self.pp - 1, t)}) for r in reps for t in tps],
            "pos_embd": [[rk(r, 0, t)] for r in reps for t in tps],
            "single": [[x] for x in self.teacher_ranks()],
            "teacher": [self.teacher_ranks()] if self.replicas else [],
            "student": [self.student_ranks] if self.student_ranks else [],
            "student_self": [[s] for s in self.student_ranks],
        }

    def create_groups(self, backend: str | None = None, timeout: timedelta | None = None) -> None:
        """Create every process group (collective over the whole world; idempotent).

        Groups with identical membership are created once and shared between purposes.
        """
        if self._groups is not None:
            return
        if not dist.is_initialized():
            raise RuntimeError("Topology.create_groups needs an initialised torch.distributed world")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"Topology was built for rank {self.rank} of {self.world_size}, but this process is "
                f"rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        created: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        mine: dict[str, dist.ProcessGroup | None] = {}
        for purpose, memberships in self.group_ranks().items():
            mine[purpose] = None
            for ranks in memberships:
                key = tuple(ranks)
                if key not in created:  # every rank walks the same list: same creation order
                    created[key] = dist.new_group(list(key), backend=backend, timeout=timeout)
                if self.rank in key:
                    mine[purpose] = created[key]
        self._groups = mine

    def _group(self, purpose: str) -> dist.ProcessGroup | None:
        if self._groups is None:
            raise RuntimeError(
                "process groups are not created yet: call Topology.create_groups() on every rank"
            )
        return self._groups[purpose]

    def student_group(self) -> dist.ProcessGroup:
        """Data-parallel group of all students (call on a student rank)."""
        group = self._group("student")
        if group is None:
            raise ValueError(f"rank {self.rank} is a teacher rank and is not in the student group")
        return group

    def student_self_group(self) -> dist.ProcessGroup:
        """This student rank alone (call on a student rank)."""
        group = self._group("student_self")
        if group is None:
            raise ValueError(f"rank {self.rank} is a teacher rank and has no student group of its own")
        return group

    def teacher_group(self) -> dist.ProcessGroup:
        """Group of all teacher ranks of all replicas (call on a teacher rank)."""
        group = self._group("teacher")
        if group is None:
            raise ValueError(f"rank {self.rank} is not a teacher rank")
        return group

    def teacher_groups(self) -> TeacherGroups:
        """This teacher rank's groups by purpose (see `group_ranks`; call on a teacher rank)."""
        if self.role() != "teacher":
            raise ValueError(f"rank {self.rank} is a student; only teacher ranks have teacher groups")
        tp, pp, mp, single = (self._group(k) for k in ("tp", "pp", "mp", "single"))
        assert tp is not None and pp is not None and mp is not None and single is not None
        return TeacherGroups(tp, pp, mp, self._group("embd"), self._group("pos_embd"), single)

    def teacher_pg_collection(self) -> ProcessGroupCollection:
        """megatron-core ProcessGroupCollection of this rank's teacher replica.

        tp, pp, mp (= tp x pp of the replica), embd / pos_embd (None on stages outside
        them, as in megatron's parallel_state), and cp = dp = dp_cp = this rank alone,
        tp_cp = tp (no context parallelism; replicas are independent).
        """
        from megatron.core.process_groups_config import ProcessGroupCollection

        g = self.teacher_groups()
        return ProcessGroupCollection(
            tp=g.tp,
            pp=g.pp,
            mp=g.mp,
            embd=g.embd,
            pos_embd=g.pos_embd,
            cp=g.single,
            tp_cp=g.tp,
            dp=g.single,
            dp_cp=g.single,
        )
