"""The launcher and the teacher-state cache: `--cache-first` (a cache-teacher job, then a
students-only distillation: afterok on Slurm, in sequence here), the planner's layout for teacher
replicas 0 and the disk the cache needs, and the errors naming the key."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from jobs import tiny_job_config, tiny_teacher

from cot2align.config import Config, load_config
from cot2align.configbase import REPO_ROOT
from cot2align.launch import layout
from cot2align.launch import submit as launch
from cot2align.modelspec import load_model_spec
from cot2align.plan import ClusterSpec, WorkloadSpec, cached_plan, main
from cot2align.teacher.cache import MANIFEST

PAPER = REPO_ROOT / "configs" / "paper" / "qwen1.5-1.8b-to-gpt2.yaml"


def _directives(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines as a dict."""
    return {m.group(1): m.group(2) or "" for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M)}


def _fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake sbatch (records its arguments; job ids 101, 102, ... one per call), srun, failing sinfo."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" >> "{calls}"\nn=$(wc -l < "{calls}")\necho "Submitted batch job $((100 + n))"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    return calls


# ----------------------------------------------------------------------------- the planner


def test_cached_layout_with_no_teacher_replicas_and_its_disk_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    """Teacher replicas 0 on 1 node x 4 GPUs: dp 4, and the disk of the whole cache computed here by
    hand from the 70B config.json (hidden 8192): bytes per token and layer x tokens x layers x formats."""
    t, s = load_model_spec("llama-3-70b"), load_model_spec("llama-3.2-1b")
    wl = WorkloadSpec(teacher_seq_len=512, formats=2, served_layers=2, examples=1000)
    c = cached_plan(t, s, ClusterSpec(nodes=1, gpus_per_node=4), wl)
    assert c.dp == 4 and c.world_size == 4
    hidden = json.loads((REPO_ROOT / "configs" / "models" / "llama-3-70b" / "config.json").read_text())["hidden_size"]
    tokens = 1000 * 512
    assert c.disk_bytes == (hidden * 2) * tokens * 2 * 2 == 33_554_432_000
    int8 = cached_plan(t, s, ClusterSpec(nodes=1, gpus_per_node=4), wl.merged({"cache_dtype": "int8"}))
    assert int8.disk_bytes == (hidden + 4) * tokens * 2 * 2
    assert main(["--teacher", "llama-3-70b", "--student", "llama-3.2-1b", "cluster.nodes=1",
                 "cluster.gpus_per_node=4", "fixed.replicas=0", "workload.examples=1000"]) == 0
    out = capsys.readouterr().out
    assert "| dp 4, no teacher ranks | 4 |" in out and "teacher.parallel.replicas 0 (no teacher rank)" in out
    assert "16,384 B x 512,000 tokens x 2 layer(s) x 2 format(s) = **31.25 GiB** (bfloat16)" in out
    assert "## Plan" not in out  # no served layout: there are no teacher ranks


def test_a_read_run_is_laid_out_as_students_only(tmp_path: Path) -> None:
    """layout.prepare of a teacher.cache.mode=read config: replicas 0, every GPU a student, the
    cached plan in plan.md; the examples of the training file count in the disk estimate (checked
    by hand: Qwen1.5-1.8B hidden 2048, bf16, 512 tokens, OT layers [0, -1], CoT + standard formats)."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n' * 3 + "\n")
    cfg = load_config(PAPER).merged({"teacher": {"cache": {"mode": "read"}}, "data": {"train_file": str(train)},
                                     "cluster": {"nodes": 1, "gpus_per_node": 4}})
    prep = layout.prepare(cfg)
    par = prep.cfg.teacher.parallel
    assert (par.replicas, par.tp, par.pp, prep.cfg.student.parallel.dp) == (0, 1, 1, 4)
    assert prep.plan is None and prep.cached is not None and prep.cached.dp == 4
    assert prep.cached.examples == 3 and prep.cached.disk_bytes == 2048 * 2 * (3 * 512) * 2 * 2
    md = prep.plan_markdown()
    assert "| dp 4, no teacher ranks | 4 |" in md and "teacher.parallel.replicas 0 (no teacher rank)" in md


# ----------------------------------------------------------------------------- Slurm: two jobs


def test_cache_first_on_slurm_submits_the_distillation_after_the_cache_job(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The paper preset's 4-GPU path: job 101 writes the cache with 4 teacher replicas (no students),
    job 102 (4 students, no teacher rank, reading the cache) depends on it: --dependency=afterok:101."""
    calls = _fake_slurm(tmp_path, monkeypatch)
    args = ["--config", str(PAPER), "--nodes", "1", "--gpus-per-node", "4", "--cache-first", "--name", "p4",
            "teacher.cache.mode=read"]
    assert launch.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "submitted Slurm job 101 (cache-teacher)" in out and "submitted Slurm job 102 (distill, after job 101" in out
    assert len(calls.read_text().splitlines()) == 2
    run_dir = tmp_path / "runs" / "p4"
    cache_script, distill_script = (run_dir / "cache-teacher" / "submit.sh").read_text(), (run_dir / "submit.sh").read_text()
    c, d = _directives(cache_script), _directives(distill_script)
    assert "dependency" not in c and d["dependency"] == "afterok:101"
    assert (c["nodes"], c["ntasks-per-node"], c["gpus-per-node"]) == ("1", "4", "4")
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"]) == ("1", "4", "4")
    assert c["job-name"] == "p4-cache-teacher" and d["job-name"] == "p4"

    with (run_dir / "cache-teacher" / "logs" / "101_submitted.pkl").open("rb") as f:
        cache_task = pickle.load(f).function
    assert isinstance(cache_task, launch.CacheTask)
    written = Config().merged(cache_task.config)
    assert written.teacher.cache.mode == "write" and written.teacher.parallel.replicas == 4
    with (run_dir / "logs" / "102_submitted.pkl").open("rb") as f:
        rank_task = pickle.load(f).function
    assert isinstance(rank_task, launch.RankTask)
    cached = Config().merged(rank_task.config)
    assert cached.teacher.cache.mode == "read" and cached.teacher.parallel.replicas == 0
    assert cached.student.parallel.dp == 4
    assert load_config(run_dir / "config.yaml").teacher.parallel.replicas == 0
    assert "teacher.parallel.replicas 0 (no teacher rank), student.parallel.dp 4" in (run_dir / "plan.md").read_text()


def test_cache_first_with_a_sharded_teacher_writes_with_megatron_replicas(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A teacher sharded tp 2 on 4 GPUs: the cache job is 2 megatron-core replicas of tp 2 and no
    student rank (each replica forwards every 2nd batch); the distillation is still 4 students."""
    calls = _fake_slurm(tmp_path, monkeypatch)
    args = ["--config", str(PAPER), "--nodes", "1", "--gpus-per-node", "4", "--cache-first", "--name", "tp2",
            "teacher.cache.mode=auto", "teacher.parallel.tp=2", "runtime.teacher_backend=megatron"]
    assert launch.main(args) == 0, capsys.readouterr().err
    assert len(calls.read_text().splitlines()) == 2
    run_dir = tmp_path / "runs" / "tp2"
    with (run_dir / "cache-teacher" / "logs" / "101_submitted.pkl").open("rb") as f:
        written = Config().merged(pickle.load(f).function.config)
    t = written.teacher.parallel
    assert (t.tp, t.pp, t.replicas, written.student.parallel.dp) == (2, 1, 2, 0)
    assert written.runtime.teacher_backend == "megatron" and written.teacher.cache.mode == "write"
    assert "2 megatron-core teacher replica(s) of tp 2 x pp 1, each forwarding every 2-th batch" in (
        run_dir / "cache-teacher" / "plan.md").read_text()
    assert load_config(run_dir / "config.yaml").student.parallel.dp == 4


@pytest.mark.parametrize("overrides, key", [
    (["teacher.cache.mode=off"], "teacher.cache.mode"),
    (["teacher.cache.mode=auto", "teacher.parallel.tp=2", "runtime.teacher_backend=hf"], "runtime.teacher_backend"),
    (["teacher.cache.mode=auto", "teacher.parallel.tp=3", "runtime.teacher_backend=megatron"], "teacher.parallel.tp"),
    (["teacher.cache.mode=auto", "teacher.parallel.tp=8", "runtime.teacher_backend=megatron"], "teacher.parallel.tp"),
    (["teacher.cache.mode=auto", "cluster.gpu_memory_gib=4"], "cluster.gpu_memory_gib"),
])
def test_cache_first_refuses_what_cannot_work_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], overrides: list[str],
                                                             key: str) -> None:
    calls = _fake_slurm(tmp_path, monkeypatch)
    rc = launch.main(["--config", str(PAPER), "--nodes", "1", "--gpus-per-node", "4", "--cache-first", *overrides])
    assert rc == 2
    assert key in capsys.readouterr().err
    assert not calls.exists()  # nothing submitted


# ----------------------------------------------------------------------------- here: two steps in sequence


def _losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_cache_first_here_runs_cache_teacher_then_students_only(tiny_task: dict[str, Path], tmp_path: Path,
                                                                no_slurm: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--world-size 2 --cache-first`: 2 cache writers (LocalExecutor tasks), then 2 students and no
    teacher rank; the distillation never ran the teacher (no teacher rank, no states received, every
    state read from the cache) and its per-step losses equal a served students-only world reading
    the same cache (`launch_local`)."""
    from cot2align.recipes.served import launch_local

    teacher = tiny_teacher(tiny_task, tmp_path / "teacher")
    raw = tiny_job_config(tiny_task, teacher, tmp_path / "runs", "first",
                          train={"max_steps": 4, "micro_batch_size": 2}, logging={"log_every": 1})
    raw["teacher"]["cache"] = {"mode": "auto", "dir": str(tmp_path / "cache"), "shard_mb": 1, "dtype": "float32"}
    f = tmp_path / "first.yaml"
    f.write_text(yaml.safe_dump(raw))
    rc = launch.main(["--world-size", "2", "--cache-first", "--config", str(f)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "cache-teacher: 2 writer(s)" in out and "done: 4 steps" in out
    assert (tmp_path / "cache" / MANIFEST).is_file()
    run_dir = tmp_path / "runs" / "first"
    writers = {p.name.split("_")[1] for p in (run_dir / "cache-teacher" / "logs").glob("*_log.out")}
    assert writers == {"0", "1"}
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.teacher.parallel.replicas == 0 and resolved.student.parallel.dp == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("distill/cache_read_bytes", 0) > 0 for r in rows)
    assert not any("distill/received_bytes" in r for r in rows)  # nothing came from a teacher rank

    ref_cfg = Config().merged(raw).merged({"run": {"name": "ref"}, "runtime": {"mode": "served"},
                                           "teacher": {"cache": {"mode": "read"}}, "student": {"parallel": {"dp": 2}}})
    ref_cfg.validate()
    ranks: dict[int, Any] = launch_local(ref_cfg, timeout_s=300, return_all=True)
    assert len(ranks) == 2  # students only
    ref = [h["loss"] for h in ranks[0].history]
    assert len(ref) == 4
    assert torch.equal(torch.tensor(_losses(run_dir / "metrics.jsonl")), torch.tensor(ref))
