"""Benchmark: a student rank's peak memory while it saves a ZeRO checkpoint, against its shard.

    python bench/checkpoint.py            # prints a table, writes bench/results/checkpoint.json
    python bench/checkpoint.py --quick    # smaller models (smoke run, < 1 min)

For two GPT-2 student sizes and 1 or 2 student ranks (gloo on CPU, DeepSpeed ZeRO-2 and
ZeRO-3, AdamW in fp32), each rank takes one optimizer step, then saves:

* per rank (ours): `DeepSpeedStepper.state_dict()` + `save_sharded`, each rank writing its own
  shard of the fp32 weights and Adam moments;
* all-gather (before): every rank's ZeRO optimizer `state_dict()` gathered onto every rank with
  `all_gather_object` and written by the first, as the engine did before per-rank shards.

Peak memory = the rise of the process's peak RSS (VmHWM, reset before the save) over its RSS
just before the save (after `malloc_trim`, so that the save's allocations cannot hide in freed
pages the process still holds). Shard MiB = this rank's shard file; state MiB = the shared state.pt (whole
weights, written by rank 0). Linux only (reads /proc/self/status). Not a timed test: a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cot2align.checkpoint import save_sharded, shard_name  # noqa: E402
from cot2align.distributed.parallel import DataParallel  # noqa: E402
from cot2align.distributed.spawn import free_port  # noqa: E402
from cot2align.losses.base import LossOutput  # noqa: E402
from cot2align.optim import TrainConfig  # noqa: E402
from cot2align.student.engine import DeepSpeedStepper, StudentMPU  # noqa: E402

MIB = 1 << 20
SIZES = {"small": dict(n_embd=128, n_layer=4, vocab_size=4000), "large": dict(n_embd=384, n_layer=6, vocab_size=16000)}
QUICK = {"small": dict(n_embd=64, n_layer=2, vocab_size=1000), "large": dict(n_embd=128, n_layer=4, vocab_size=4000)}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Hand freed heap memory back to the OS (so that new allocations show in RSS instead of
    silently reusing resident free pages), reset the peak; returns the RSS (KiB) to measure from."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss_kib("VmRSS")


class _NoLoss(torch.nn.Module):
    """Next-token cross-entropy (the loss module holds no parameters)."""

    def forward(self, student: torch.nn.Module, ids: torch.Tensor) -> LossOutput:
        out = student(input_ids=ids, labels=ids)
        return LossOutput(out.loss, {})


def _rank(rank: int, world: int, port: int, model: dict[str, int], stage: int, out: str, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    dp = DataParallel(size=world, rank=rank, group=dist.group.WORLD)
    singles = [dist.new_group([r]) for r in range(world)]
    torch.manual_seed(0)
    student = GPT2LMHeadModel(GPT2Config(n_positions=64, n_head=4, **model))
    params = sum(p.numel() for p in student.parameters())
    cfg = TrainConfig(lr=1e-3, max_steps=2, micro_batch_size=2)
    loss = _NoLoss()
    stepper = DeepSpeedStepper(student, loss, cfg, 1e-3, 2, stage, StudentMPU(dp, list(range(world)), singles[rank]))
    ids = torch.randint(0, model["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(rank))
    stepper.zero_grad()
    o = stepper.forward(lambda: loss(student, ids))
    stepper.backward(o.total)
    stepper.step()
    row: dict[str, Any] = {"rank": rank, "params": params}

    dist.barrier()
    before = _reset_peak()
    trained = stepper.state_dict()
    shard = trained.pop("shard")
    folder = save_sharded(Path(out) / "ours", 1, trained if rank == 0 else None, shard, rank, world, dp.barrier)
    row["ours_peak_mib"] = (_rss_kib("VmHWM") - before) / 1024
    row["shard_mib"] = (folder / shard_name(rank)).stat().st_size / MIB
    row["state_mib"] = (folder / "state.pt").stat().st_size / MIB
    del trained, shard

    dist.barrier()
    before = _reset_peak()
    opt = stepper.engine.optimizer
    if stage == 3:
        opt.checkpoint_event_prologue()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, opt.state_dict(), group=dp.group)
    if stage == 3:
        opt.checkpoint_event_epilogue()
    if rank == 0:
        full = stepper.full_weights()
        torch.save({"student": full.student.state_dict(), "optimizer_by_rank": parts}, Path(out) / "gathered.pt")
    else:
        stepper.full_weights()
    dist.barrier()
    row["gather_peak_mib"] = (_rss_kib("VmHWM") - before) / 1024
    row["gathered_file_mib"] = (Path(out) / "gathered.pt").stat().st_size / MIB
    queue.put(row)
    dist.barrier()
    dist.destroy_process_group()


def run_case(model: dict[str, int], world: int, stage: int) -> list[dict[str, Any]]:
    """One world of `world` student ranks; returns each rank's row."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as out:
        procs = [ctx.Process(target=_rank, args=(r, world, port, model, stage, out, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = []
        while len(rows) < world:
            try:
                rows.append(queue.get(timeout=5))
            except Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a rank failed (exit codes {[p.exitcode for p in procs]})") from None
        for p in procs:
            p.join(timeout=60)
    return sorted(rows, key=lambda r: r["rank"])


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| student | params | ZeRO | dp | rank | shard MiB | state.pt MiB | peak during save MiB (per rank) "
             "| peak / shard | all-gather peak MiB (before) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['stage']} | {r['dp']} | {r['rank']} | "
                     f"{r['shard_mib']:.1f} | {r['state_mib'] if r['rank'] == 0 else 0:.1f} | "
                     f"{r['ours_peak_mib']:.1f} | {r['ours_peak_mib'] / max(r['shard_mib'], 1e-9):.2f} | "
                     f"{r['gather_peak_mib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models (smoke run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint.json"))
    args = parser.parse_args(argv)
    rows = []
    for size, model in (QUICK if args.quick else SIZES).items():
        for stage in (2, 3):
            for world in (1, 2):
                for row in run_case(model, world, stage):
                    rows.append({"size": size, "stage": stage, "dp": world, **row})
    print(report(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"quick": args.quick, "rows": rows, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
