"""Step time of the embedded served job under a real (local) Slurm against a local world, before
and after torch threads follow the task's CPUs.

    python bench/slurm.py              # writes bench/results/slurm.md (and prints it)
    python bench/slurm.py --steps 30

Starts its own 4-node cluster (`slurm/local-cluster.sh start 4`, state in a temporary
directory, stopped at the end; needs root and slurm-wlm + munge) and runs the same job three
times, side by side, on the embedded served layout (megatron teacher tp 2 + 2 DeepSpeed
students = 4 ranks; embedded-size models with random weights, see bench/runtime.py):

* local:  `launcher/submit.py --local --world-size 4` (4 processes on this machine);
* slurm, before: `launcher/submit.py --nodes 4 --gpus-per-node 1` with `train.threads` set to
  what `runtime.run_rank` used to choose: os.cpu_count() // LOCAL_WORLD_SIZE (1 task per node);
* slurm, after: the same job with threads from the task (SLURM_CPUS_PER_TASK, OMP_NUM_THREADS,
  CPU affinity: `cot2align.runtime.rank_threads`).

Step time = median time between consecutive optimizer steps (metrics.jsonl timestamps).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime import _artefacts, _step_times  # noqa: E402  # bench/runtime.py: models and step times

from cot2align.config import load_config  # noqa: E402

NODES = 4


def _sh(*cmd: str, env: dict[str, str], timeout: float = 600) -> str:
    out = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _wait(job_id: str, env: dict[str, str], timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = re.search(r"JobState=(\S+)", _sh("scontrol", "show", "job", "-o", job_id, env=env))
        if state and state.group(1) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state.group(1)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Run the three cases; write the table to --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "slurm.md"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_slurm_"))
    env = {**os.environ, "COT2ALIGN_SLURM_DIR": str(work / "cluster"), "COT2ALIGN_SLURM_PORT": "36817",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    base = load_config(None)  # the embedded default: served, megatron tp 2 + dp 2
    overrides, source = _artefacts(base, work / "models")
    job: dict[str, Any] = {
        **overrides, "run": {"output_dir": str(work / "runs"), "work_dir": str(work / "cache")},
        "cot": {"enabled": False}, "train": {"max_steps": args.steps, "save_every": 0},
        "eval": {"dev_limit": 0, "seeds": [1], "max_new_tokens": 4},
        "logging": {"wandb_mode": "disabled", "log_every": 1},
        "launch": {"fixed": ["tp", "pp", "replicas", "dp"], "slurm": {"time": "30:00"}},
    }
    old_threads = max(1, (os.cpu_count() or 1) // 1)  # the old rule: one task per node under Slurm
    cases = [("local", "--local --world-size 4", {}),
             ("slurm, before (threads = cpu_count // LOCAL_WORLD_SIZE)", "slurm", {"threads": old_threads}),
             ("slurm, after (threads from the task)", "slurm", {})]
    started = _sh("bash", "slurm/local-cluster.sh", "start", str(NODES), env=env)
    env["SLURM_CONF"] = re.search(r"export SLURM_CONF=(\S+)", started).group(1)  # type: ignore[union-attr]
    rows = []
    try:
        for i, (name, how, train) in enumerate(cases):
            cfg = {**job, "run": {**job["run"], "name": f"case{i}"}, "train": {**job["train"], **train}}
            f = work / f"case{i}.yaml"
            f.write_text(yaml.safe_dump(cfg))
            t0 = time.perf_counter()
            if how == "slurm":
                out = _sh(sys.executable, "launcher/submit.py", "--config", str(f), "--nodes", str(NODES),
                          "--gpus-per-node", "1", env=env)
                job_id = re.search(r"submitted Slurm job (\d+)", out).group(1)  # type: ignore[union-attr]
                state = _wait(job_id, env)
                if state != "COMPLETED":
                    raise RuntimeError(f"{name}: job {job_id} ended {state}; logs in {work / 'runs'}")
            else:
                _sh(sys.executable, "launcher/submit.py", "--config", str(f), *how.split(), env=env)
            wall = time.perf_counter() - t0
            step_s, _ = _step_times(work / "runs" / f"case{i}")
            rows.append((name, step_s, wall))
            print(f"{name}: {step_s:.3f} s/step, job wall {wall:.0f} s", flush=True)
    finally:
        _sh("bash", "slurm/local-cluster.sh", "stop", env=env)
    local = rows[0][1]
    load = os.getloadavg()[0]
    lines = [
        "# Slurm vs local: step time of the embedded served job (bench/slurm.py)",
        "",
        f"4 ranks (megatron teacher tp 2 + 2 DeepSpeed students, fp32, gloo), {args.steps} steps, {source}; "
        f"a local 4-node Slurm cluster (1 task per node, `slurm/local-cluster.sh`) on this machine "
        f"({os.cpu_count()} cores, load average {load:.1f} at the end). Step time: median between consecutive "
        "optimizer steps. The three runs ran one after the other in one invocation.",
        "",
        "| run | s/step | vs local | job wall s |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {s:.3f} | {s / local:.2f}x | {w:.0f} |" for name, s, w in rows],
        "",
        f"Reproduce: `python bench/slurm.py --steps {args.steps}` (root; slurm-wlm and munge installed).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
