"""Benchmark of the teacher-state cache on the embedded default, plus the 70B preset on paper.

    python bench/cache.py              # prints tables, writes bench/results/cache.json

Four sections, every ratio from runs made side by side in this one process (one torch thread):

* step / epoch time: the same training steps (colocated, embedded models) with the teacher
  live, from the cache (`teacher.cache.mode=read`, bf16 shards written by `cache-teacher`),
  and the student alone (the same loop with the teacher's states replayed from memory,
  computed beforehand outside the timing). Goal: cached <= 1.1 x student alone.
* bytes per response token on disk: measured (bf16 and int8 caches written here, shard bytes /
  cached positions, every stored layer) and by formula for embedded / GPT-2 / SmolLM2 / 70B
  sizes, against full teacher logits (bf16) and top-k logits (k = 64: bf16 value + int32 id).
* read throughput: a fresh `CacheReader` (sha256 of every shard checked) reading every record,
  against the positions per second the cached student consumes.
* the 70B preset (configs/llama70b-to-1b-8nodes.yaml) on paper, from the planner's model: GPU-hours
  of 10 epochs served live vs cache-teacher once on all 64 GPUs + 10 epochs with 64 students.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime import _artefacts, _Replay, _setup, _step_times  # noqa: E402

from cot2align.config import Config, load_config  # noqa: E402
from cot2align.data.dataset import collate  # noqa: E402
from cot2align.data.sampler import GlobalBatchSampler  # noqa: E402
from cot2align.launch.layout import plan_for  # noqa: E402
from cot2align.logging import MetricsLogger  # noqa: E402
from cot2align.recipes.cache import cache_key, cache_teacher  # noqa: E402
from cot2align.recipes.inputs import input_paths  # noqa: E402
from cot2align.recipes.pipeline import distill  # noqa: E402
from cot2align.teacher.cache import MANIFEST, CacheReader  # noqa: E402
from cot2align.teacher.colocated import ColocatedTeacher  # noqa: E402
from cot2align.train import TrainJob, train  # noqa: E402

STEPS = 24
TOPK = 64
SIZES = {  # (teacher hidden size, teacher vocabulary)
    "GPT-2 (768, 50257)": (768, 50257),
    "SmolLM2-1.7B (2048, 49152)": (2048, 49152),
    "Llama-3-70B (8192, 128256)": (8192, 128256),
}


def _student_alone(cfg: Config, run_dir: Path) -> float:
    """Median step seconds of the colocated loop with the teacher's views replayed from memory."""
    s = _setup(cfg)
    colocated = ColocatedTeacher(s["teacher"])
    plan = s["plan"]
    sampler = GlobalBatchSampler(len(s["samples"]), cfg.train.micro_batch_size, 1, 1, cfg.run.seed)
    views = {}
    for step in range(STEPS):
        for idx in sampler.micro_batches(step, 0):
            batch = collate([s["samples"][i] for i in idx], s["pad"])
            fmts = [f for f in plan.fmts if f in batch.seqs["teacher"]]
            views[tuple(batch.indices)] = colocated.views(batch, fmts, plan.teacher_layers)
    logger = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), name="student-alone")
    job = TrainJob(run_dir=run_dir, student=s["student"], student_tok=s["s_tok"], loss_fn=s["loss"],
                   samples=s["samples"], pad_ids=s["pad"], cfg=cfg.train, seed=cfg.run.seed,
                   teacher=_Replay(colocated, views), needs_aux=len(plan.fmts) > 1,
                   projector_lr=cfg.loss.projector_lr, resume=False)
    train(job, logger=logger, log_cfg=cfg.logging)
    logger.close()
    return _step_times(run_dir)[0]


def _cache_stats(root: Path) -> dict[str, Any]:
    manifest = json.loads((root / MANIFEST).read_text())
    positions = sum(rows for shard in manifest["index"] for *_, rows in shard)
    total = sum(s["bytes"] for s in manifest["shards"])
    layers = len(manifest["key"]["layers"])
    return {"bytes": total, "positions": positions, "layers": layers, "width": manifest["key"]["width"],
            "bytes_per_token": total / positions, "bytes_per_token_layer": total / positions / layers}


def _read_all(cfg: Config, root: Path) -> dict[str, float]:
    """Every record through a fresh reader (shard checksums verified on first touch)."""
    manifest = json.loads((root / MANIFEST).read_text())
    key = cache_key(cfg, input_paths(cfg), manifest["key"]["layers"], manifest["key"]["formats"],
                    manifest["key"]["width"])
    t0 = time.perf_counter()
    reader = CacheReader(root, key, "full")
    positions = 0
    for shard in manifest["index"]:
        for sample, fmt, layers, _, rows in shard:
            reader.read(sample, fmt, layers)
            positions += rows
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "positions_per_s": positions / seconds,
            "mib_per_s": _cache_stats(root)["bytes"] / seconds / 2**20}


def _positions_per_step(cfg: Config) -> float:
    """Teacher response positions (every format) the student consumes per step, averaged over STEPS."""
    s = _setup(cfg)
    sampler = GlobalBatchSampler(len(s["samples"]), cfg.train.micro_batch_size, 1, 1, cfg.run.seed)
    n = 0
    for step in range(STEPS):
        for idx in sampler.micro_batches(step, 0):
            for i in idx:
                for fmt in s["plan"].fmts:
                    seq = s["samples"][i].seqs["teacher"].get(fmt)
                    n += len(seq.ids) - seq.prompt_len if seq is not None else 0
    return n / STEPS


def paper_70b() -> dict[str, Any]:
    """GPU-hours per 10k examples: 10 served epochs vs cache once + 10 cached epochs (planner model)."""
    cfg = load_config(ROOT / "configs" / "llama70b-to-1b-8nodes.yaml")
    plan, why = plan_for(cfg)
    if plan is None:
        raise RuntimeError(why)
    gpus = plan.world_size
    teacher_tokens_per_example = plan.teacher_tokens_per_s / plan.examples_per_s
    student_tokens_per_example = plan.student_tokens_per_s / plan.examples_per_s
    replica_cap = plan.teacher_capacity_tokens_per_s / plan.replicas
    cache_replicas = gpus // (plan.tp * plan.pp)
    cache_eps = cache_replicas * replica_cap / teacher_tokens_per_example
    student_cap_per_gpu = plan.student_capacity_tokens_per_s / plan.dp
    cached_eps = gpus * student_cap_per_gpu / student_tokens_per_example
    n, epochs = 10_000, 10
    live_h = epochs * n / plan.examples_per_s * gpus / 3600
    cache_h = n / cache_eps * gpus / 3600
    cached_h = epochs * n / cached_eps * gpus / 3600
    first_live_h = live_h / epochs  # teacher.cache.mode=auto: the served first epoch writes the cache
    layers = plan.workload.served_layers * plan.workload.formats
    disk = teacher_tokens_per_example * plan.teacher.hidden_size * plan.workload.served_layers * 2
    return {"gpus": gpus, "served_layout": f"{plan.replicas} x (tp {plan.tp} x pp {plan.pp}) + dp {plan.dp}",
            "served_examples_per_s": plan.examples_per_s, "student_idle": plan.student_idle,
            "cache_teacher_replicas": cache_replicas, "cache_examples_per_s": cache_eps,
            "cached_examples_per_s": cached_eps, "gpu_hours_per_10k_examples": {
                "10 epochs served live": live_h, "cache once": cache_h, "10 epochs cached": cached_h,
                "cache once + 10 cached": cache_h + cached_h,
                "auto: 1 served epoch (writes) + 9 cached": first_live_h + cached_h * (epochs - 1) / epochs},
            "ratio_live_to_cached": live_h / (cache_h + cached_h),
            "bf16_disk_bytes_per_example_upper_bound": disk, "served_layers_x_formats": layers,
            "note": "teacher tokens per example at data.max_length (an upper bound: responses are shorter); "
                    "the cached students' DP exchange is taken as in the served plan; cache-teacher uses "
                    f"{cache_replicas} replicas of the served tp x pp ({gpus - cache_replicas * plan.tp * plan.pp} "
                    "GPUs idle, still counted)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    base = load_config(ROOT / "configs" / "embedded.yaml")
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        work = Path(tmp)
        arte, source = _artefacts(base, work)
        base = base.merged({
            **arte,
            "run": {"output_dir": str(work / "runs"), "resume": False},
            "cot": {"enabled": False},
            "train": {"max_steps": STEPS, "micro_batch_size": 8, "grad_accum": 1, "threads": 1},
            "eval": {"dev_limit": 1, "max_new_tokens": 1, "seeds": [1]},
            "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
            "runtime": {"mode": "colocated"},
        })
        caches = {d: work / f"cache-{d}" for d in ("bfloat16", "int8")}
        write_s = {}
        for dtype, root in caches.items():
            t0 = time.perf_counter()
            cache_teacher(base.merged({"teacher": {"cache": {"mode": "write", "dir": str(root), "dtype": dtype}}}))
            write_s[dtype] = time.perf_counter() - t0
        steps: dict[str, list[float]] = {"live": [], "cached": [], "alone": []}
        for rnd in range(2):  # interleaved rounds: the load of the shared machine hits every case
            for name, over in (("live", {"mode": "off"}),
                               ("cached", {"mode": "read", "dir": str(caches["bfloat16"])})):
                cfg = base.merged({"run": {"name": f"{name}-{rnd}"}, "teacher": {"cache": over}})
                distill(cfg)
                steps[name].append(_step_times(cfg.run_dir)[0])
            steps["alone"].append(_student_alone(base, work / f"alone-{rnd}"))
        med = {k: statistics.median(v) for k, v in steps.items()}
        sampler = GlobalBatchSampler(len(_setup(base)["samples"]), 8, 1, 1, base.run.seed)
        disk = {d: _cache_stats(r) for d, r in caches.items()}
        reads = _read_all(base.merged({"teacher": {"cache": {"dtype": "bfloat16"}}}), caches["bfloat16"])
        consumed = _positions_per_step(base) / med["cached"]
        emb_width = disk["bfloat16"]["width"]
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(str(input_paths(base).teacher_model)).vocab_size)
        stored_layers = disk["bfloat16"]["layers"]
    sizes = {f"embedded ({emb_width}, {vocab})": (emb_width, vocab), **SIZES}
    per_token = {name: {"bf16 states / layer": 2 * d, "int8 states / layer": d + 4,
                        f"bf16 states x {stored_layers} layers": 2 * d * stored_layers,
                        "full logits bf16": 2 * v, f"top-{TOPK} logits (bf16 + int32 id)": TOPK * 6}
                 for name, (d, v) in sizes.items()}
    paper = paper_70b()
    summary = {
        "source": source, "steps": STEPS, "micro_batch": 8, "steps_per_epoch": sampler.steps_per_epoch,
        "step_s": {k: [round(x, 4) for x in v] for k, v in steps.items()},
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "epoch_s": {k: round(v * sampler.steps_per_epoch, 2) for k, v in med.items()},
        "ratio_cached_to_alone": round(med["cached"] / med["alone"], 3),
        "ratio_live_to_alone": round(med["live"] / med["alone"], 3),
        "cache_teacher_s": {k: round(v, 2) for k, v in write_s.items()},
        "disk": disk, "bytes_per_token": per_token, "read": reads,
        "student_consumes_positions_per_s": consumed,
        "read_to_consumption": reads["positions_per_s"] / consumed, "paper_70b": paper,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "torch_threads": 1,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"source: {source}; {STEPS} steps x micro-batch 8 ({sampler.steps_per_epoch} steps per epoch), "
          f"1 thread; load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| teacher source | median step ms | epoch s | / student alone |")
    print("|---|---:|---:|---:|")
    for k in ("live", "cached", "alone"):
        print(f"| {k} | {med[k] * 1e3:.1f} | {med[k] * sampler.steps_per_epoch:.2f} | {med[k] / med['alone']:.3f} |")
    print(f"\ncache-teacher (whole data set): bf16 {write_s['bfloat16']:.1f} s, int8 {write_s['int8']:.1f} s\n")
    print("| cache on disk | bytes | positions | layers | B/token | B/token/layer |")
    print("|---|---:|---:|---:|---:|---:|")
    for d, s in disk.items():
        print(f"| {d} | {s['bytes']:,} | {s['positions']:,} | {s['layers']} | {s['bytes_per_token']:.1f} | "
              f"{s['bytes_per_token_layer']:.1f} |")
    cols = list(next(iter(per_token.values())))
    print("\n| teacher (d, V) | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in per_token.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:,}" for c in cols) + " |")
    print(f"\nread: {reads['positions_per_s']:,.0f} positions/s ({reads['mib_per_s']:.1f} MiB/s, checksums included); "
          f"the cached student consumes {consumed:,.0f} positions/s: {summary['read_to_consumption']:.1f}x headroom\n")
    print(f"70B preset on paper ({paper['gpus']} GPUs, served layout {paper['served_layout']}, students idle "
          f"{paper['student_idle']:.0%}): GPU-hours per 10k examples")
    print("| schedule | GPU-hours |")
    print("|---|---:|")
    for k, v in paper["gpu_hours_per_10k_examples"].items():
        print(f"| {k} | {v:.2f} |")
    print(f"| live / (cache once + 10 cached) | {paper['ratio_live_to_cached']:.2f}x |")


if __name__ == "__main__":
    main()
