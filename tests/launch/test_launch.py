"""The launcher: Slurm submission through submitit (fake sbatch / srun on PATH), dry runs, the
run directory, presets, the local fallbacks, and the per-rank task."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobs import tiny_job_config, tiny_teacher

from cot2align.config import Config, load_config
from cot2align.configbase import REPO_ROOT, ConfigError
from cot2align.launch import layout, slurm
from cot2align.launch import submit as launch

PRESET_70B = REPO_ROOT / "configs" / "llama70b-to-1b-8nodes.yaml"
PRESETS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if "models" not in p.parts)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake `sbatch` (records its arguments, prints "Submitted batch job 4242") and `srun` on PATH.

    Returns the file the fake sbatch appends one line per call to.
    """
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\nexit 1\n")  # no partition to check against
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    return calls


def _sections(out: str) -> dict[str, str]:
    """Split dry-run output into its '# Title (...)' sections."""
    parts = re.split(r"^# (Resolved config|Plan|sbatch script) \(.*\)$", out, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _directives(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines as a dict (flags without a value map to '')."""
    out = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M):
        out[m.group(1)] = m.group(2) or ""
    return out


SUBMIT_ARGS = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account", "acc", "--qos", "high",
               "--time", "02:00:00", "--mem", "200G", "--constraint", "a100", "--name", "t1",
               "train.save_every=10", "student.parallel.dp=-1"]  # the embedded default fixes dp=2 (a 4-rank world)


def _recorder(calls: list[Any], result: Any) -> Any:
    """A stand-in function that records its one argument and returns `result`."""

    def fn(arg: Any) -> Any:
        calls.append(arg)
        return result

    return fn


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("value, minutes", [
    ("24:00:00", 1440), ("90", 90), ("1:30", 2), ("0:30:30", 31), ("2-00:00:00", 2880), ("1-12", 2160),
    ("1-00:30", 1470),
])
def test_slurm_minutes(value: str, minutes: int) -> None:
    assert slurm.slurm_minutes(value) == minutes


@pytest.mark.parametrize("value", ["abc", "1:2:3:4", "", "12h"])
def test_slurm_minutes_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="Slurm time"):
        slurm.slurm_minutes(value)


def test_unquoted_yaml_time_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("launch:\n  slurm:\n    time: 24:00:00\n")  # YAML 1.1 reads this as 86400
    with pytest.raises(ConfigError, match=r"launch\.slurm\.time.*86400.*'24:00:00'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"launch\.slurm\.time"):
        load_config(None, ["launch.slurm.time=tomorrow"])


def test_the_time_limit_leaves_the_job_a_minute_before_its_signal() -> None:
    with pytest.raises(ConfigError, match=r"launch\.slurm\.signal_delay_s: 120 s before the time limit '0:02:00' \(120 s\)"
                                          r".*longer launch\.slurm\.time"):
        load_config(None, ["launch.slurm.time='0:02:00'"])
    assert load_config(None, ["launch.slurm.time='0:03:00'"]).launch.slurm.minutes == 3  # 60 s before the signal
    two = load_config(None, ["launch.slurm.time='0:02:00'", "launch.slurm.signal_delay_s=60"])
    assert two.launch.slurm.signal_delay_s == 60


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_preset_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.launch.slurm.minutes >= 1


PAPER = {  # docs/method.md section 5: lr, epochs, kd_rate
    "qwen1.5-1.8b-to-gpt2.yaml": (5e-4, 20, 0.5, "qwen1.5-1.8b", "gpt2-120m"),
    "mistral-7b-to-tinyllama.yaml": (1e-3, 10, 0.9, "mistral-7b", "tinyllama-1.1b"),
    "qwen2.5-7b-to-gpt2-1.5b.yaml": (1e-3, 10, 0.9, "qwen2.5-7b-instruct", "gpt2-1.5b"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_follow_the_recipe(name: str) -> None:
    cfg = load_config(REPO_ROOT / "configs" / "paper" / name)
    lr, epochs, kd_rate, teacher, student = PAPER[name]
    t = cfg.train
    assert (t.lr, t.epochs, cfg.loss.kd_rate) == (lr, epochs, kd_rate)
    assert (t.micro_batch_size, t.grad_accum, cfg.student.parallel.dp) == (4, 2, 4)  # bs 4 x GA 2 x 4 GPUs
    assert (t.weight_decay, t.min_lr, t.warmup_steps, t.clip_grad, t.dtype) == (0.01, 1e-7, 0, 1.0, "bfloat16")
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.run.seed) == (512, 256, 10)
    assert (cfg.loss.temperature, cfg.loss.projector_lr, cfg.eval.answer_mode) == (2.0, 1e-3, "none")
    assert (cfg.launch.teacher_config, cfg.launch.student_config) == (teacher, student)
    prep = layout.prepare(cfg)  # plans: the 4 + 4 layout fits one 8-GPU node
    assert prep.plan is not None and (prep.plan.replicas, prep.plan.dp) == (4, 4)


# ----------------------------------------------------------------------------- Slurm submission


def test_submit_renders_directives_and_writes_the_run_dir(fake_slurm: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(SUBMIT_ARGS) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "t1"
    assert "submitted Slurm job 4242" in out and str(run_dir) in out
    assert f"{run_dir}/logs/4242_<task>_log.out" in out and "task 0..7" in out
    assert "W&B run:  't1' in project cot2align (mode offline" in out

    calls = fake_slurm.read_text().splitlines()
    assert len(calls) == 1 and calls[0].endswith(".sh")  # ONE job

    script = (run_dir / "submit.sh").read_text()
    d = _directives(script)
    assert d["nodes"] == "2" and d["ntasks-per-node"] == "4" and d["gpus-per-node"] == "4"
    assert (d["partition"], d["account"], d["qos"], d["mem"], d["constraint"]) == ("gpu", "acc", "high", "200G", "a100")
    assert d["time"] == "120" and d["job-name"] == "t1" and d["signal"] == "USR2@120"
    assert d["output"] == f"{run_dir}/logs/%j_0_log.out" and d["error"] == f"{run_dir}/logs/%j_0_log.err"
    assert d["chdir"] == str(tmp_path)
    assert f"srun --unbuffered --output {run_dir}/logs/%j_%t_log.out --error {run_dir}/logs/%j_%t_log.err" in script
    assert f"source {REPO_ROOT}/slurm/env.sh" in script

    resolved = load_config(run_dir / "config.yaml")
    assert resolved.runtime.mode == "served" and resolved.cluster.nodes == 2 and resolved.run.name == "t1"
    # the embedded tiny models are planned for the 8 ranks of the job
    assert (run_dir / "plan.md").read_text().startswith("## Plan: embedded teacher -> embedded student on 2 node(s)")
    assert (run_dir / "logs").is_dir() and (run_dir / "job_ids.txt").read_text() == "4242\n"

    # what submitit pickled: a checkpointable RankTask carrying the resolved config
    with (run_dir / "logs" / "4242_submitted.pkl").open("rb") as f:
        delayed = pickle.load(f)
    task = delayed.function
    assert isinstance(task, launch.RankTask) and task.config == resolved.to_dict()
    again = task.checkpoint()
    assert again.function is task and task.requeues == 1 and task.config["run"]["resume"] is True

    # the dry run prints exactly the script that was submitted, and submits nothing
    assert launch.main([*SUBMIT_ARGS, "--dry-run"]) == 0
    printed = _sections(capsys.readouterr().out)["sbatch script"].split("\ndry run:")[0]
    assert printed.strip() == script.strip()
    assert len(fake_slurm.read_text().splitlines()) == 1


def test_resubmitting_the_run_dir_reuses_it(fake_slurm: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(SUBMIT_ARGS) == 0
    run_dir = tmp_path / "runs" / "t1"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_20")
    capsys.readouterr()
    assert launch.main(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run dir:  {run_dir} (resumes from {run_dir}/checkpoints/latest: step_20)" in out
    assert (run_dir / "job_ids.txt").read_text() == "4242\n4242\n"
    assert len(fake_slurm.read_text().splitlines()) == 2


def test_run_names_stay_inside_the_output_dir(fake_slurm: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A name with a path separator or `..` is refused naming run.name; one with spaces and `;` is
    kept, quoted wherever the sbatch script uses it."""
    args = [a for a in SUBMIT_ARGS if a != "t1"]
    for bad in ("../escape", "a/b", ".."):
        assert launch.main([*args[:args.index("--name") + 1], bad, *args[args.index("--name") + 1:]]) == 2
        assert "run.name: " in capsys.readouterr().err
    assert not fake_slurm.exists() and not (tmp_path / "escape").exists()
    odd = "my run; rm -rf x"
    assert launch.main([*args[:args.index("--name") + 1], odd, *args[args.index("--name") + 1:]]) == 0
    run_dir = tmp_path / "runs" / odd
    script = (run_dir / "submit.sh").read_text()
    assert f"#SBATCH --job-name='{odd}'" in script
    assert f"--output '{run_dir}/logs/%j_%t_log.out'" in script
    assert load_config(run_dir / "config.yaml").run.name == odd


def test_layout_that_cannot_work_is_refused_before_submitting(fake_slurm: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # 6 teacher ranks + 4 students on 8 GPUs
    rc = launch.main(["--nodes", "1", "--gpus-per-node", "8", "teacher.parallel.replicas=6", "student.parallel.dp=4",
                      'launch.fixed=["replicas", "dp"]'])
    assert rc == 2
    err = capsys.readouterr().err
    assert "teacher.parallel.replicas, student.parallel.dp" in err and "6 teacher + 4 student GPUs" in err
    assert not fake_slurm.exists()


def test_70b_on_one_small_node_does_not_fit(fake_slurm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--config", str(PRESET_70B), "--nodes", "1", "--gpus-per-node", "2"]) == 2
    assert "cluster.gpu_memory_gib: the teacher shard needs" in capsys.readouterr().err
    assert not fake_slurm.exists()


# ----------------------------------------------------------------------------- dry run


def test_dry_run_70b_prints_plan_and_script_and_submits_nothing(fake_slurm: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = launch.main(["--dry-run", "--nodes", "8", "--gpus-per-node", "8", "--config", str(PRESET_70B)])
    assert rc == 0
    out = capsys.readouterr().out
    assert not fake_slurm.exists()  # sbatch never called
    assert not (tmp_path / "runs").exists()  # nothing written
    sec = _sections(out)
    cfg = yaml.safe_load(sec["Resolved config"])
    t, s = cfg["teacher"]["parallel"], cfg["student"]["parallel"]
    assert t["tp"] * t["pp"] * t["replicas"] + s["dp"] == 64
    assert s["dp"] >= t["replicas"]  # every teacher replica serves a student
    assert cfg["launch"]["fixed"] == ["tp", "pp", "replicas", "dp"]
    assert cfg["runtime"]["teacher_backend"] == "megatron" and cfg["runtime"]["backend"] == "nccl"
    plan = sec["Plan"]
    assert "## Plan: llama-3-70b -> llama-3.2-1b on 8 node(s) x 8 GPUs" in plan
    assert f"| teacher | 0-{t['tp'] * t['pp'] * t['replicas'] - 1} | {t['replicas']} replica(s) x (tp {t['tp']} x pp {t['pp']})" in plan
    d = _directives(sec["sbatch script"])
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"], d["time"]) == ("8", "8", "8", "1440")
    assert d["mem"] == "0" and "exclusive" in d and d["cpus-per-task"] == "12"
    assert "nothing submitted" in out


def test_dry_run_works_without_slurm(no_slurm: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--dry-run", "--config", str(PRESET_70B)]) == 0
    assert "#SBATCH --nodes=8" in capsys.readouterr().out


def test_prepare_writes_the_run_dir_and_prints_only_its_path(fake_slurm: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--prepare", "--config", str(PRESET_70B), "run.name=byhand"]) == 0
    run_dir = tmp_path / "runs" / "byhand"
    assert capsys.readouterr().out == f"{run_dir}\n"
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "plan.md", "submit.sh", "logs"}
    assert "## Plan: llama-3-70b" in (run_dir / "plan.md").read_text()
    assert not fake_slurm.exists()


def test_hand_written_sbatch_uses_the_same_entry_points() -> None:
    text = (REPO_ROOT / "slurm" / "cot2align.sbatch").read_text()
    d = _directives(text)
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"], d["signal"]) == ("8", "8", "8", "B:USR2@120")
    assert "requeue" in d and "launcher/submit.py\" --prepare" in text and "submit.py\" rank --config" in text
    assert '"$RUN_DIR/logs/%j_%t_log.out"' in text and "scontrol requeue" in text


# ----------------------------------------------------------------------------- without Slurm


def test_several_nodes_without_slurm_is_a_clear_error(no_slurm: None, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(launch, "_run_pipeline", lambda *a: pytest.fail("must not run"))
    assert launch.main(["--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "cluster.nodes=2 (--nodes) needs Slurm" in err and "--world-size N" in err and "--dry-run" in err


def test_no_arguments_runs_the_embedded_pipeline(fake_slurm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    calls: list[Config] = []
    monkeypatch.setattr(launch, "run_embedded", calls.append)
    spec = importlib.util.spec_from_file_location("submit_script", REPO_ROOT / "launcher" / "submit.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([]) == 0  # here, even with Slurm on PATH
    assert [c.to_dict() for c in calls] == [load_config().to_dict()]
    assert not fake_slurm.exists()


def test_local_one_node_runs_the_pipeline_with_the_flags(fake_slurm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Config] = []
    monkeypatch.setattr(launch, "run_embedded", calls.append)
    assert launch.main(["--local", "--name", "x", "train.lr=0.001"]) == 0
    assert [c.to_dict() for c in calls] == [load_config(None, ["train.lr=0.001", "run.name=x"]).to_dict()]
    assert not fake_slurm.exists()


# ----------------------------------------------------------------------------- the task


def _slurm_task_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 5 of a 2-node x 4-task Slurm job."""
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[07-08]",
                 "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "MASTER_PORT": "23456"}.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(k, "stale")  # overwritten by the task; restored by monkeypatch


def _record_run_rank(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, str]]]:
    import os

    import cot2align.recipes.served

    seen: list[tuple[Any, dict[str, str]]] = []
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")

    def run_rank(cfg: Any) -> str:
        seen.append((cfg, {k: os.environ[k] for k in keys}))
        return "done"

    monkeypatch.setattr(cot2align.recipes.served, "run_rank", run_rank)
    return seen


EXPECTED_ENV = {"MASTER_ADDR": "node07", "MASTER_PORT": "23456", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "stale"}


def test_rank_task_exports_the_slurm_task_env_and_runs_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    _slurm_task_env(monkeypatch)
    seen = _record_run_rank(monkeypatch)
    cfg = load_config(None, ["run.name=r", "runtime.mode=served"])
    assert launch.RankTask(cfg.to_dict())() == "done"
    (got_cfg, env), = seen
    assert got_cfg == cfg and env == EXPECTED_ENV


def test_rank_entry_of_the_hand_written_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _slurm_task_env(monkeypatch)
    seen = _record_run_rank(monkeypatch)
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(load_config(None, ["run.name=h"]).to_dict()))
    assert launch.main(["rank", "--config", str(f)]) == 0
    (got_cfg, env), = seen
    assert got_cfg.run.name == "h" and env == EXPECTED_ENV


@pytest.mark.slow
def test_local_world_through_submitit(tiny_task: dict[str, Path], tmp_path: Path, no_slurm: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Two ranks (teacher + student) as submitit LocalExecutor tasks running the real run_rank."""
    teacher = tiny_teacher(tiny_task, tmp_path / "teacher")
    cfg = tiny_job_config(tiny_task, teacher, tmp_path / "runs", "local")
    f = tmp_path / "local.yaml"
    f.write_text(yaml.safe_dump(cfg))
    rc = launch.main(["--local", "--world-size", "2", "--config", str(f)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "done: 2 steps" in out
    run_dir = tmp_path / "runs" / "local"
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert len(list((run_dir / "logs").glob("*_1_log.out"))) == 1  # the student's own log


def test_fixed_layout_that_does_not_fill_the_job_is_refused(fake_slurm: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """tp=2 + dp=2 kept (launch.fixed, 4 ranks): an 8-rank job must be refused before submitting."""
    assert launch.main([*SUBMIT_ARGS[:-1], 'launch.fixed=["tp", "pp", "replicas", "dp"]']) == 2
    err = capsys.readouterr().err
    assert "1 replicas x (tp 2 x pp 1) + dp 2 = 4 GPUs != 8 (2 nodes x 4 GPUs/node)" in err
    assert not fake_slurm.exists()  # sbatch was never called


def test_master_addr_override_replaces_the_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _slurm_task_env(monkeypatch)
    monkeypatch.setenv("COT2ALIGN_MASTER_ADDR", "10.1.2.3")
    seen = _record_run_rank(monkeypatch)
    assert launch.RankTask(load_config(None, ["run.name=r", "runtime.mode=served"]).to_dict())() == "done"
    assert seen[0][1] == {**EXPECTED_ENV, "MASTER_ADDR": "10.1.2.3"}
