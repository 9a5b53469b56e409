"""A real Slurm scheduler in the loop: jobs go through real sbatch / srun / scancel / scontrol.

The `slurm_cluster` fixture starts a 4-node local cluster once per test session
(`slurm/local-cluster.sh start 4`: slurmctld + 4 slurmd of 2 CPUs each on this machine, state in a temporary
directory) and stops it afterwards. Every job is the same tiny served run (2 hf teacher replicas
+ 2 DeepSpeed students, fp32, gloo) on 4 nodes x 1 task; its per-step losses are compared with
the same config run as a local world of 4 ranks (`--local --world-size 4`), which does not touch
Slurm. Skipped, with the reason, where the packages are not installed (`apt-get install -y
slurm-wlm munge`, root) - scripts/test.sh installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from jobs import tiny_job_config, tiny_teacher

from cot2align.launch import layout, slurm
from cot2align.launch import submit as launch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
NODES = 4
STEPS = 24
TIMEOUT_S = 20.0
"""runtime.timeout_s of the jobs: how long a rank waits for a silent peer."""
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

needs_cluster = pytest.mark.slurm


# ----------------------------------------------------------------------------- the cluster


def _missing_packages() -> list[str]:
    return [c for c in ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "srun", "scontrol", "sinfo")
            if shutil.which(c) is None]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running 4-node local cluster for the session; yields the environment that reaches it."""
    missing = _missing_packages()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing {', '.join(missing)}): "
                    "apt-get install -y slurm-wlm munge (as root; scripts/test.sh does it)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (slurm/local-cluster.sh); not root here")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "COT2ALIGN_SLURM_DIR": str(state), "COT2ALIGN_SLURM_CPUS": "2",
           "COT2ALIGN_SLURM_PORT": os.environ.get("COT2ALIGN_TEST_SLURM_PORT", "26817")}
    started = subprocess.run(["bash", str(SCRIPT), "start", str(NODES)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout)
    assert conf, started.stdout
    try:
        yield {"SLURM_CONF": conf.group(1), "COT2ALIGN_SLURM_DIR": str(state)}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def on_slurm(slurm_cluster: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's environment reaches the cluster: SLURM_CONF, the worktree on PYTHONPATH."""
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    return {**os.environ}


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (JobState, Restarts, NodeList, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def _wait(job_id: str, timeout_s: float, until: set[str] = TERMINAL) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = _job(job_id)
        if info["JobState"] in until:
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=30)
            raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout_s:.0f} s: {info}")
        time.sleep(1)


def _submit(cfg_file: Path, nodes: int = NODES, tasks_per_node: int = 1) -> str:
    """`python launcher/submit.py --config F --nodes 4 --gpus-per-node 1`; returns the job id."""
    out = subprocess.run([sys.executable, str(REPO / "launcher" / "submit.py"), "--config", str(cfg_file),
                          "--nodes", str(nodes), "--gpus-per-node", str(tasks_per_node)],
                         capture_output=True, text=True, timeout=120, cwd=cfg_file.parent)
    assert out.returncode == 0, f"submit failed:\n{out.stdout}\n{out.stderr}"
    m = re.search(r"submitted Slurm job (\d+)", out.stdout)
    assert m, out.stdout
    return m.group(1)


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl; a step logged twice is an error."""
    out: dict[int, float] = {}
    f = run_dir / "metrics.jsonl"
    for line in f.read_text().splitlines() if f.is_file() else []:
        row = json.loads(line)
        if "train/loss" in row:
            assert row["step"] not in out, f"step {row['step']} was trained twice"
            out[row["step"]] = row["train/loss"]
    return out


def _wait_for_step(run_dir: Path, job_id: str, step: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while max(_losses(run_dir), default=0) < step:
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {step}: {_job(job_id)}"
        assert _job(job_id)["JobState"] not in TERMINAL, f"job {job_id} ended before step {step}: {_job(job_id)}"
        time.sleep(0.2)


def _rank_process(logs: Path, rank: int) -> psutil.Process:
    """The process of global rank `rank` of the job whose submitit folder is `logs` (started by slurmd)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if any("submitit.core._submit" in a for a in cmd) and str(logs) in cmd \
                    and p.environ().get("SLURM_PROCID") == str(rank):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no process of rank {rank} under {logs}")


def _logs(run_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob(f"{job_id}_*_log.*")))


# ----------------------------------------------------------------------------- the tiny job


def _job_config(tiny_task: dict[str, Path], teacher_dir: Path, out: Path, name: str,
                **sections: Any) -> dict[str, Any]:
    cfg = tiny_job_config(
        tiny_task, teacher_dir, out, name, run={"seed": 5, "resume": True}, loss={"name": "cot2align"},
        train={"max_steps": STEPS, "lr": 1e-2, "min_lr": 1e-4, "save_every": 8},
        logging={"wandb_mode": "offline", "log_every": 1},
        runtime={"mode": "served", "teacher_backend": "hf", "timeout_s": TIMEOUT_S, "startup_timeout_s": 120},
        student={"parallel": {"dp": 2}},
        launch={"fixed": ["tp", "pp", "replicas", "dp"],
                "slurm": {"cpus_per_task": 1, "time": "10:00", "signal_delay_s": 30}})
    cfg["teacher"]["parallel"] = {"tp": 1, "pp": 1, "replicas": 2}
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    return cfg


@pytest.fixture(scope="module")
def job(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny teacher and a writer of job configs: `job["write"](name, **sections) -> (file, run_dir)`."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    teacher = tiny_teacher(tiny_task, root / "teacher")

    def write(name: str, **sections: Any) -> tuple[Path, Path]:
        f = root / f"{name}.yaml"
        f.write_text(yaml.safe_dump(_job_config(tiny_task, teacher, root / "runs", name, **sections)))
        return f, root / "runs" / name

    return {"write": write, "root": root}


@pytest.fixture(scope="module")
def reference(job: dict[str, Any]) -> dict[int, float]:
    """Per-step losses of the tiny job as a local world of 4 ranks (no Slurm)."""
    f, run_dir = job["write"]("local")
    assert launch.main(["--local", "--world-size", str(NODES), "--config", str(f)]) == 0
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _assert_same_losses(run_dir: Path, reference: dict[int, float]) -> None:
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), "every step trained exactly once"
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx([reference[s] for s in range(1, STEPS + 1)],
                                                                  rel=1e-5, abs=0)


# ----------------------------------------------------------------------------- the tests


@needs_cluster
def test_submit_on_4_nodes_completes_and_matches_the_local_world(
        on_slurm: dict[str, str], job: dict[str, Any], reference: dict[int, float]) -> None:
    f, run_dir = job["write"]("four")
    job_id = _submit(f)
    info = _wait(job_id, 400)
    assert info["JobState"] == "COMPLETED", info
    assert info["NumNodes"] == str(NODES) and info["NumTasks"] == str(NODES)
    assert info["NodeList"] == f"node[1-{NODES}]"
    # 4 tasks on 4 nodes form one world: rank k is task k on node k (submitit's view of its Slurm task)
    for rank in range(NODES):
        out = (run_dir / "logs" / f"{job_id}_{rank}_log.out").read_text()
        assert f"node={rank}({NODES}), global_rank={rank}({NODES})" in out, out[:2000]
    assert (run_dir / "final" / "model.safetensors").is_file()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert [p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*")] == [True]
    assert (run_dir / "job_ids.txt").read_text().split() == [job_id]
    _assert_same_losses(run_dir, reference)


@needs_cluster
def test_usr2_mid_run_checkpoints_requeues_and_resumes_with_the_same_losses(
        on_slurm: dict[str, str], job: dict[str, Any], reference: dict[int, float]) -> None:
    f, run_dir = job["write"]("preempted")
    job_id = _submit(f)
    _wait_for_step(run_dir, job_id, 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)  # as Slurm does on preemption
    info = _wait(job_id, 400)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, info
    logs = _logs(run_dir, job_id)
    stopped = {int(n) for n in re.findall(rf"stopped at step (\d+) of {STEPS} on request", logs)}
    assert len(stopped) == 1 and 3 <= min(stopped) < STEPS, stopped  # every student at the same step boundary
    assert "Requeued job" in logs
    _assert_same_losses(run_dir, reference)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(run_id) for p in attempts)  # one W&B run, continued


@needs_cluster
def test_time_limit_signal_requeues_and_finishes_in_two_allocations(
        on_slurm: dict[str, str], job: dict[str, Any]) -> None:
    # SIGUSR2 135 s before the time limit. The first allocation starts with 10 minutes; once the ranks
    # train (their handlers are installed: a signal while submitit still unpickles the task ends the
    # job), the limit is cut to 1-2 minutes from now, so Slurm's next time-limit check (every ~30 s)
    # sends the signal while training still runs, whatever the machine's speed. The ranks stop at a
    # step boundary and rank 0 requeues the job; the second allocation gets 30 minutes and trains the rest.
    steps = 2000
    f, run_dir = job["write"]("timed", train={"max_steps": steps, "save_every": 0},
                              launch={"fixed": ["tp", "pp", "replicas", "dp"],
                                      "slurm": {"cpus_per_task": 1, "time": "10:00", "signal_delay_s": 135}})
    job_id = _submit(f)
    _wait_for_step(run_dir, job_id, 2)
    elapsed_min = _minutes(_job(job_id)["RunTime"])
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={elapsed_min + 2}"], check=True, timeout=30)
    assert _requeued(job_id, 300), f"the time limit's signal did not requeue the job: {_job(job_id)}"
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30:00"], check=True, timeout=30)
    info = _wait(job_id, 1500)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, info
    logs = _logs(run_dir, job_id)
    # (submitit's "Requeued job" line is not asserted: Slurm may end the task before it is written)
    stopped = re.search(rf"stopped at step (\d+) of {steps} on request", logs)
    assert stopped and re.search(rf"resumed from \S+ at step {stopped.group(1)}\b", logs), logs[-4000:]
    assert sorted(_losses(run_dir)) == list(range(1, steps + 1))  # every step once, across the two


def _minutes(run_time: str) -> int:
    """Whole minutes (rounded up) of a Slurm RunTime: [D-]HH:MM:SS."""
    days, _, hms = run_time.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return -(-((int(days or 0) * 24 + h) * 3600 + m * 60 + s) // 60)


def _requeued(job_id: str, timeout_s: float) -> bool:
    """Wait until the job was requeued once (Restarts=1); False when it ended first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job(job_id)
        if int(info.get("Restarts", "0")) >= 1:
            return True
        if info["JobState"] in TERMINAL:
            return False
        time.sleep(0.5)
    return False


@needs_cluster
@pytest.mark.parametrize("rank,role", [(1, "teacher"), (3, "student")])
def test_a_killed_rank_ends_the_job_and_the_log_names_it(
        on_slurm: dict[str, str], job: dict[str, Any], rank: int, role: str) -> None:
    # the teacher case: a megatron teacher split over tp 2 (ranks 0, 1 on the first of 2 nodes x 2
    # tasks); rank 1 dies inside the replica's collectives; its students, served by rank 0, must
    # name rank 1 (told by rank 0 or from the check-ins), never rank 0
    sections: dict[str, Any] = {"train": {"max_steps": 200}}
    nodes, tasks = NODES, 1
    if role == "teacher":
        sections["runtime"] = {"mode": "served", "teacher_backend": "megatron", "timeout_s": TIMEOUT_S,
                               "startup_timeout_s": 120}
        sections["teacher"] = {"parallel": {"tp": 2, "pp": 1, "replicas": 1}}
        nodes, tasks = 2, 2
    f, run_dir = job["write"](f"killed_{role}", **sections)
    job_id = _submit(f, nodes, tasks)
    _wait_for_step(run_dir, job_id, 2)
    _rank_process(run_dir / "logs", rank).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    info = _wait(job_id, 3 * TIMEOUT_S + 60)
    assert time.monotonic() - killed < 2 * TIMEOUT_S + 60, "the job outlived the ranks' deadline"
    assert info["JobState"] in ("FAILED", "CANCELLED"), info
    logs = _logs(run_dir, job_id)
    named = re.findall(r"(teacher|student) rank (\d+) \([^)]*\) (died or hangs|is unreachable)", logs)
    assert (role, str(rank), "died or hangs") in named or (role, str(rank), "is unreachable") in named, logs[-4000:]
    # nobody else is accused: the rendezvous store (on rank 0) outlives every rank still deciding
    assert {(r, k) for r, k, _ in named} == {(role, str(rank))}, named
    if role == "teacher":  # the students name the killed teacher rank, not the one that serves them
        students = "".join((run_dir / "logs" / f"{job_id}_{t}_log.err").read_text(errors="replace") for t in (2, 3))
        assert "teacher rank 1 (replica 0, pp 0, tp 1) died or hangs" in students, students[-4000:]


@needs_cluster
def test_sbatch_script_by_hand_runs_the_same_job(
        on_slurm: dict[str, str], job: dict[str, Any], reference: dict[int, float]) -> None:
    f, run_dir = job["write"]("by_hand")
    out = subprocess.run(["sbatch", "--parsable", f"--nodes={NODES}", "--ntasks-per-node=1", "--cpus-per-task=1",
                          "--gpus-per-node=0", "--time=10:00", f"--output={job['root']}/by_hand-%j.out",
                          str(REPO / "slurm" / "cot2align.sbatch"), str(f)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    info = _wait(job_id, 400)
    batch = (job["root"] / f"by_hand-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{batch}"
    assert f"run dir: {run_dir}" in batch
    assert sorted(p.name for p in (run_dir / "logs").glob(f"{job_id}_*_log.out")) == \
        [f"{job_id}_{t}_log.out" for t in range(NODES)]
    assert (run_dir / "final" / "model.safetensors").is_file()
    _assert_same_losses(run_dir, reference)


# ----------------------------------------------------------------------------- without a cluster

SINFO = """gpu*|64|gpu:h100:8(S:0-1)|1031000
gpu*|64|gpu:h100:4(S:0)|1031000
cpu|2|(null)|24105
cpu|4|(null)|24105
"""


def test_sinfo_is_read_per_partition_with_the_smallest_node() -> None:
    assert slurm.parse_sinfo(SINFO, "") == slurm.Partition("gpu", nodes=2, cpus=64, gpus=4, memory_mb=1031000)
    assert slurm.parse_sinfo(SINFO, "cpu") == slurm.Partition("cpu", nodes=2, cpus=2, gpus=0, memory_mb=24105)
    assert slurm.parse_sinfo(SINFO, "nope") is None
    assert slurm._gres_gpus("gpu:a100:4,gpu:v100:2,shard:8") == 6


def _cfg(**flags: Any) -> Any:
    from cot2align.config import Config

    return Config().merged({"cluster": {"nodes": 4, **flags.pop("cluster", {})}, **flags})


def _problems(cfg: Any, part: slurm.Partition) -> list[str]:
    return slurm.partition_problems(cfg.launch.slurm, cfg.cluster, part)


def test_a_request_that_does_not_fit_the_partition_is_named() -> None:
    cpu = slurm.Partition("local", nodes=4, cpus=2, gpus=0, memory_mb=1000)
    assert _problems(_cfg(cluster={"gpus_per_node": 1}, launch={"slurm": {"cpus_per_task": 2}}), cpu) == []
    problems = _problems(
        _cfg(cluster={"nodes": 8, "gpus_per_node": 1}, launch={"slurm": {"cpus_per_task": 8, "mem": "2G"}}), cpu)
    assert len(problems) == 3
    assert "cluster.nodes (--nodes) = 8" in problems[0] and "has 4 node(s)" in problems[0]
    assert "launch.slurm.cpus_per_task (--cpus-per-task) = 8" in problems[1] and "--cpus-per-task 2" in problems[1]
    assert "launch.slurm.mem (--mem) = 2G" in problems[2]
    gpu = slurm.Partition("gpu", nodes=4, cpus=64, gpus=4, memory_mb=10**6)
    assert "have 4 GPU(s)" in _problems(_cfg(cluster={"gpus_per_node": 8}), gpu)[0]


def test_cpu_partitions_get_one_task_per_node_and_no_gpu_request(tmp_path: Path) -> None:
    cpu = slurm.Partition("local", nodes=8, cpus=2, gpus=0, memory_mb=1000)
    fitted = layout.fit_to_partition(_cfg(), cpu, set())
    assert (fitted.cluster.gpus_per_node, fitted.launch.slurm.cpus_per_task) == (1, 2)
    given = layout.fit_to_partition(_cfg(launch={"slurm": {"cpus_per_task": 1}}), cpu, {"launch.slurm.cpus_per_task"})
    assert (given.cluster.gpus_per_node, given.launch.slurm.cpus_per_task) == (2, 1)
    kept = layout.fit_to_partition(_cfg(cluster={"gpus_per_node": 3}), cpu, {"cluster.gpus_per_node"})
    assert kept.cluster.gpus_per_node == 3
    gpu = slurm.Partition("gpu", nodes=8, cpus=64, gpus=8, memory_mb=10**6)
    assert layout.fit_to_partition(_cfg(), gpu, set()).cluster.gpus_per_node == 8
    # the sbatch script asks for GPUs only where the partition has them
    cfg = _cfg(run={"output_dir": str(tmp_path)}, launch={"plan": False})
    prep = layout.Prepared(cfg, None, "", tmp_path, partition=gpu)
    assert prep.sbatch_parameters()["gpus_per_node"] == 8
    prep.partition = cpu
    assert "gpus_per_node" not in prep.sbatch_parameters()


def test_given_keys_come_from_the_yaml_the_overrides_and_the_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("cluster: {gpus_per_node: 2}\nlaunch: {slurm: {time: '1:00'}}\n")
    keys = launch.given_keys(str(f), ["train.lr=0.1"], {"launch": {"slurm": {"cpus_per_task": 3}}})
    assert {"cluster.gpus_per_node", "launch.slurm.time", "train.lr", "launch.slurm.cpus_per_task"} <= keys
    assert "cluster.nodes" not in keys


def test_rank_threads_follow_what_the_task_was_given() -> None:
    from cot2align.distributed.world import rank_threads

    cpus = set(range(8))
    assert rank_threads(4, {}, cpus) == 2  # the node's CPUs shared by its ranks
    assert rank_threads(4, {"SLURM_CPUS_PER_TASK": "3"}, cpus) == 3
    assert rank_threads(4, {"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "1"}, cpus) == 1
    assert rank_threads(1, {"SLURM_CPUS_PER_TASK": "16"}, {0, 1}) == 2  # never more than the affinity
    assert rank_threads(8, {}, {5}) == 1


def test_an_unresolvable_rendezvous_address_fails_at_once_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cot2align.config import Config
    from cot2align.distributed.world import RendezvousError
    from cot2align.recipes.served import run_rank

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("MASTER_ADDR", "no-such-node.invalid")
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match=r"MASTER_ADDR='no-such-node.invalid'.*export COT2ALIGN_MASTER_ADDR="):
        run_rank(Config())
    assert time.monotonic() - t0 < 30  # not the stall of the process group's own look-ups
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(RendezvousError, match="MASTER_ADDR is not set"):
        run_rank(Config())
