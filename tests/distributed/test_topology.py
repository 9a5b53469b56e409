"""Topology: rank layout, validation messages, serving map, and real process groups (gloo)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed

from cot2align.configbase import ConfigError
from cot2align.distributed.spawn import WorldError
from cot2align.distributed.topology import (
    StudentParallelConfig,
    TeacherCoord,
    TeacherParallelConfig,
    Topology,
)


def topo(tp: int, pp: int, replicas: int, dp: int, world: int, rank: int = 0) -> Topology:
    return Topology(
        TeacherParallelConfig(tp=tp, pp=pp, replicas=replicas), StudentParallelConfig(dp=dp), world, rank
    )


def test_odd_layout_two_tp2_replicas_three_students() -> None:
    t = topo(tp=2, pp=1, replicas=2, dp=3, world=7)
    assert [t.role(r) for r in range(7)] == ["teacher"] * 4 + ["student"] * 3
    assert [t.teacher_coord(r) for r in range(4)] == [
        TeacherCoord(0, 0, 0),
        TeacherCoord(0, 0, 1),
        TeacherCoord(1, 0, 0),
        TeacherCoord(1, 0, 1),
    ]
    assert t.teacher_ranks(1) == [2, 3]
    assert t.student_ranks == [4, 5, 6]
    assert t.serving_map == {4: 0, 5: 1, 6: 0}
    assert t.students_of(0) == [4, 6] and t.students_of(1) == [5]
    # pp = 1: every layer is sent by tp-rank 0 of the replica.
    assert [t.sender_rank(r, layer, 4) for r in (0, 1) for layer in (0, 2, -1)] == [0, 0, 0, 2, 2, 2]
    assert "teacher replica 1: ranks 2-3" in t.describe()
    assert t.name_rank(3) == "teacher rank 3 (replica 1, pp 0, tp 1)"
    assert t.name_rank(6) == "student rank 6 (dp 2)"


def test_pipeline_layout_and_layer_owner() -> None:
    t = topo(tp=2, pp=2, replicas=2, dp=-1, world=9, rank=6)
    assert t.dp == 1 and t.student_ranks == [8]
    # tp fastest, then pp, then replica
    assert t.teacher_coord() == TeacherCoord(1, 1, 0)
    assert t.teacher_rank(1, 0, 1) == 5
    # 4 layers over 2 stages: embedding + layers 1-2 on stage 0, layers 3-4 + final norm on stage 1
    assert [t.stage_of_layer(x, 4) for x in (0, 1, 2, 3, 4, -1, -5)] == [0, 0, 0, 1, 1, 1, 0]
    assert t.sender_rank(0, 0, 4) == 0 and t.sender_rank(0, -1, 4) == 2
    assert t.sender_rank(1, 2, 4) == 4 and t.sender_rank(1, 3, 4) == 6
    groups = t.group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["mp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["embd"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pos_embd"] == [[0], [1], [4], [5]]
    assert groups["student"] == [[8]]
    assert groups["student_self"] == [[8]]
    with pytest.raises(ValueError, match="outside"):
        t.stage_of_layer(5, 4)


def test_colocated_world_has_only_students() -> None:
    t = topo(tp=1, pp=1, replicas=0, dp=-1, world=3, rank=1)
    assert t.colocated and t.num_teacher_ranks == 0 and t.dp == 3
    assert [t.role(r) for r in range(3)] == ["student"] * 3
    assert t.student_index() == 1
    assert t.serving_map == {}
    assert {k: v for k, v in t.group_ranks().items() if v} == {"student": [[0, 1, 2]],
                                                                 "student_self": [[0], [1], [2]]}
    with pytest.raises(ValueError, match="replicas is 0"):
        t.replica_of(0)


def test_a_world_of_teacher_ranks_only() -> None:
    """student.parallel.dp = 0: the sharded cache-teacher job (two tp-2 replicas, no student group)."""
    t = topo(tp=2, pp=1, replicas=2, dp=0, world=4, rank=3)
    assert t.student_ranks == [] and [t.role(r) for r in range(4)] == ["teacher"] * 4
    assert t.teacher_coord() == (1, 0, 1)
    groups = t.group_ranks()
    assert groups["student"] == [] and groups["student_self"] == []
    assert groups["tp"] == [[0, 1], [2, 3]] and groups["teacher"] == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            dict(tp=2, pp=2, replicas=1, dp=2, world=7),
            r"world size 7 != teacher\.parallel\.tp=2 x teacher\.parallel\.pp=2 x teacher\.parallel\.replicas=1 "
            r"= 4 teacher ranks \+ student\.parallel\.dp=2 student ranks = 6",
        ),
        (
            dict(tp=2, pp=1, replicas=2, dp=-1, world=4),
            r"world size 4 leaves no rank for students.*at least 5",
        ),
        (dict(tp=0, pp=1, replicas=1, dp=1, world=1), r"teacher\.parallel\.tp: must be >= 1, got 0"),
        (
            dict(tp=2, pp=1, replicas=0, dp=-1, world=4),
            r"teacher\.parallel\.replicas: is 0 .* got tp=2, pp=1",
        ),
        (dict(tp=1, pp=1, replicas=1, dp=-2, world=1), r"student\.parallel\.dp: must be >= 0 or -1 \(auto\), got -2"),
    ],
)
def test_size_errors_name_keys_and_numbers(kwargs: dict[str, int], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        topo(**kwargs)


def test_teacher_model_divisibility() -> None:
    t = topo(tp=2, pp=3, replicas=1, dp=1, world=7)
    t.check_teacher_model(num_layers=30, num_heads=8, num_query_groups=2)
    with pytest.raises(
        ConfigError, match=r"teacher\.parallel\.tp: tp=2 must divide the teacher's 9 attention heads"
    ):
        t.check_teacher_model(num_layers=30, num_heads=9, num_query_groups=3)
    with pytest.raises(
        ConfigError, match=r"teacher\.parallel\.tp: tp=2 must divide the teacher's 3 key/value"
    ):
        t.check_teacher_model(num_heads=8, num_query_groups=3)
    with pytest.raises(
        ConfigError, match=r"teacher\.parallel\.pp: pp=3 must divide the teacher's 4 transformer"
    ):
        t.check_teacher_model(num_layers=4)


def test_configs_from_dict_and_overrides() -> None:
    cfg = TeacherParallelConfig.from_dict({"tp": 4}, prefix="teacher.parallel").with_overrides(["replicas=2"])
    assert (cfg.tp, cfg.pp, cfg.replicas) == (4, 1, 2)
    with pytest.raises(ConfigError, match=r"unknown config key 'teacher\.parallel\.dp'"):
        TeacherParallelConfig.from_dict({"dp": 2}, prefix="teacher.parallel")


# --------------------------------------------------------------------------- real gloo world
def _groups_worker(rank: int, world: int) -> dict[str, Any]:
    """Two topologies over the same 7 ranks; groups checked by membership and by all_reduce."""
    out: dict[str, Any] = {}
    for name, (tp, pp, replicas) in {"tp2x2rep": (2, 1, 2), "pp2x2rep": (1, 2, 2)}.items():
        t = topo(tp=tp, pp=pp, replicas=replicas, dp=-1, world=world, rank=rank)
        t.create_groups()
        t.create_groups()  # idempotent: no second round of collectives
        mine: dict[str, Any] = {"role": t.role()}
        if t.role() == "teacher":
            g = t.teacher_groups()  # (megatron's ProcessGroupCollection is checked in test_megatron_teacher)
            mine.update(
                {k: None if v is None else dist.get_process_group_ranks(v) for k, v in g._asdict().items()}
            )
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=g.tp)
            mine["tp_sum"] = x.item()
            mine["teacher"] = dist.get_process_group_ranks(t.teacher_group())
            with pytest.raises(ValueError, match="teacher rank"):
                t.student_group()
            with pytest.raises(ValueError, match="teacher rank"):
                t.student_self_group()
        else:
            group = t.student_group()
            mine["student"] = dist.get_process_group_ranks(group)
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=group)
            mine["student_sum"] = x.item()
            mine["student_self"] = dist.get_process_group_ranks(t.student_self_group())
            with pytest.raises(ValueError, match="student"):
                t.teacher_groups()
        out[name] = mine
    return out


@pytest.mark.slow
def test_groups_in_a_real_world() -> None:
    results = run_distributed(_groups_worker, 7, timeout_s=180)
    tp2 = [r["tp2x2rep"] for r in results]
    assert [r["role"] for r in tp2] == ["teacher"] * 4 + ["student"] * 3
    assert [r["tp"] for r in tp2[:4]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["tp_sum"] for r in tp2[:4]] == [1.0, 1.0, 5.0, 5.0]
    assert [r["pp"] for r in tp2[:4]] == [[0], [1], [2], [3]]
    assert [r["mp"] for r in tp2[:4]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["single"] for r in tp2[:4]] == [[0], [1], [2], [3]]
    assert [r["embd"] for r in tp2[:4]] == [[0], [1], [2], [3]]
    assert all(r["teacher"] == [0, 1, 2, 3] for r in tp2[:4])
    assert all(r["student"] == [4, 5, 6] and r["student_sum"] == 15.0 for r in tp2[4:])
    assert [r["student_self"] for r in tp2[4:]] == [[4], [5], [6]]
    pp2 = [r["pp2x2rep"] for r in results]
    assert [r["pp"] for r in pp2[:4]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["tp"] for r in pp2[:4]] == [[0], [1], [2], [3]]
    assert [r["embd"] for r in pp2[:4]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pos_embd"] for r in pp2[:4]] == [[0], None, [2], None]


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 blocks here until it is killed


@pytest.mark.slow
def test_run_distributed_reports_failing_rank() -> None:
    with pytest.raises(WorldError, match=r"(?s)--- rank 1: ValueError: boom on purpose") as e:
        run_distributed(_failing_worker, 2, timeout_s=60, grace_s=1.0)
    assert set(e.value.failures) == {0, 1} and "killed" in e.value.failures[0]  # rank 0 blocked, then killed
