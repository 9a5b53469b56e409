"""Benchmark of the served runtime against the colocated path on the embedded models.

    python bench/runtime.py            # prints a table, writes bench/results/runtime.json

Measures, for the same global batches (2 student replicas in served mode = grad_accum 2
colocated): the optimizer step time (median over steps after the first, from the
metrics timestamps), what travels teacher -> student per response token (packed
hidden states of the served layers) against what full teacher logits would cost, and
the peak RSS of a teacher rank. Uses the embedded pipeline's trained teacher and
tokenizers when `cot2align.recipes.prepare.paths(cfg)` finds them; otherwise builds the
embedded-size models (random weights: step time does not depend on training) on a
small generated task. On a 2-core CPU the served world's 3-4 processes share the
cores, so served step times here measure overhead, not the speed-up of real hardware.

Three further sections:

* cached epoch vs served live (`--only-cached` runs just this one): the same student (dp 1, one
  torch thread per process) trained with an hf teacher rank serving it live, then from the
  teacher-state cache (written by `cot2align cache-teacher`, bf16, timed) in a world of the student
  alone (teacher replicas 0), and the student alone with the teacher's states replayed from memory;
  epoch seconds = median step x steps per epoch; the ratio that matters is cached step / student-alone
  step (1.0 = reading the cache costs the step nothing); the cached and student-alone runs are
  alternated twice and each figure is the median. `--preset CONFIG` runs the section on a
  real-model config, served live with its own teacher layout (e.g. the SmolLM2 preset: megatron,
  pp 2).

* overlap, pinned: one hf teacher rank and one student rank, each pinned to its own core
  (`os.sched_setaffinity`, one torch thread), against the two halves of the work measured
  alone on one core each: the teacher alone = the serve loop's forward passes (and packing)
  of the same micro-batches, without students; the student alone = the same training
  step (same DeepSpeed stepper, in a 1-rank world) with the teacher's states replayed from
  memory (computed beforehand by the HF teacher in that process, outside the timing).
  With perfect overlap, served step time = max(teacher alone, student alone).
* teacher memory: a ~140M-parameter fp32 Llama teacher (built here with random weights,
  saved as safetensors) served by megatron-core with tp=2 and tp=2 x pp=2: the peak RSS of
  each teacher rank against one process that loads the whole HF teacher and runs the same
  forward, and against the expected fixed overhead (a megatron teacher rank of the
  embedded-size teacher) + weights / (tp x pp).

    python bench/runtime.py --skip-base   # only the two sections above
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cot2align.config import Config, load_config  # noqa: E402
from cot2align.models import load_tokenizer  # noqa: E402
from cot2align.recipes.cache import cache_teacher  # noqa: E402
from cot2align.recipes.inputs import input_paths  # noqa: E402
from cot2align.recipes.pipeline import distill  # noqa: E402
from cot2align.recipes.prepare import paths, read_samples  # noqa: E402
from cot2align.recipes.served import launch_local  # noqa: E402

STEPS = 8
PINNED_STEPS = 12
CACHED_STEPS = 16
QUIET_SHORT_RUN: dict[str, Any] = {
    "eval": {"dev_limit": 1, "max_new_tokens": 1, "seeds": [1]},
    "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
}
"""Overrides of every benchmark run: a token-long dev evaluation, metrics every step, no W&B."""


def _artefacts(cfg: Config, work: Path) -> tuple[dict[str, Any], str]:
    """Config overrides pointing at the data, tokenizers and teacher to use, and where they came from."""
    p = paths(cfg)
    if (p.teacher_model / "config.json").is_file() and p.train.is_file():
        return {}, f"embedded artefacts under {cfg.run.work_dir}"
    from cot2align.data.embedded import write_embedded_task
    from cot2align.data.jsonl import read_jsonl
    from cot2align.data.tokenizer_training import tokenizer_corpus, train_tokenizer
    from cot2align.models import build_tiny_model, load_tokenizer

    files = write_embedded_task(cfg.embedded.task.merged({"n_train": 256, "n_dev": 8, "n_test": 8,
                                                          "n_test_long": 4}), work / "data")
    rows, _ = read_jsonl(files["train"])
    corpus = tokenizer_corpus([{"instruction": e.instruction, "input": e.input, "output": e.output,
                                "rationale": e.rationale} for e in rows])
    for side, spec in (("teacher", cfg.embedded.teacher_tokenizer), ("student", cfg.embedded.student_tokenizer)):
        train_tokenizer(corpus, spec.kind, spec.vocab_size, work / f"tok_{side}")
    t_tok = load_tokenizer(work / "tok_teacher")
    build_tiny_model(cfg.embedded.teacher_model, t_tok, seed=1).save_pretrained(work / "teacher",
                                                                                safe_serialization=True)
    t_tok.save_pretrained(work / "teacher")
    return {
        "data": {"train_file": str(files["train"]), "dev_file": str(files["dev"]), "test_file": str(files["test"])},
        "teacher": {"path": str(work / "teacher"), "tokenizer": str(work / "tok_teacher")},
        "student": {"tokenizer": str(work / "tok_student")},
    }, "embedded-size models built by this script (random weights)"


def _step_times(run_dir: Path) -> tuple[float, float]:
    """Median step time after the first step and median tokens/s, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    times = [b["time"] - a["time"] for a, b in itertools.pairwise(train)]
    return statistics.median(times), statistics.median(r["train/tokens_per_s"] for r in train[1:])


def _case(base: Config, name: str, mode: str, overrides: dict[str, Any]) -> dict[str, Any]:

    cfg = base.merged({"run": {"name": name}, "runtime": {"mode": mode}, **overrides})
    t0 = time.perf_counter()
    if mode == "colocated":
        distill(cfg)
        results: list[Any] = []
    else:
        results = launch_local(cfg, return_all=True, timeout_s=400)
    wall = time.perf_counter() - t0
    step_s, tok_s = _step_times(cfg.run_dir)
    out: dict[str, Any] = {"case": name, "mode": mode, "wall_s": round(wall, 1), "step_s": round(step_s, 3),
                           "tokens_per_s": round(tok_s, 1)}
    if mode == "served":
        from cot2align.teacher.serve import ServeStats

        stats = [r for r in results if isinstance(r, ServeStats)]
        metrics = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        end = next(r for r in metrics if "distill/received_bytes" in r)
        positions = end["distill/received_positions"]
        out.update(
            world=len(results), teacher_ranks=len(stats),
            teacher_peak_rss_mb=round(max(s.peak_rss_mb for s in stats), 1),
            teacher_forwards=sum(s.forwards for s in stats),
            payload_bytes_per_token=round(end["distill/received_bytes"] / max(positions, 1), 1),
            wire_bytes_per_token_incl_headers=round(sum(s.bytes_sent for s in stats) / max(
                sum(s.rows_sent for s in stats), 1), 1),
        )
    return out


# --------------------------------------------------------------------------- pinned processes
def _pin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _pinned_rank(cfg: Config, rank: int, world: int, port: int, results: Any, core: int) -> None:
    """One rank of a served world, pinned to `core` (see cot2align.distributed.spawn)."""
    from cot2align.distributed.spawn import _worker
    from cot2align.recipes.served import run_rank

    _pin(core)
    _worker(run_rank, cfg, rank, world, port, results, {})


def _launch_pinned(cfg: Config, cores: list[int], timeout_s: float) -> list[Any]:
    """A served world with rank r pinned to cores[r]; every rank's result, by rank."""
    import torch.multiprocessing as mp

    from cot2align.distributed.spawn import WorldError, free_port

    ctx = mp.get_context("spawn")
    results, port, world = ctx.Queue(), free_port(), len(cores)
    procs = [ctx.Process(target=_pinned_rank, args=(cfg, r, world, port, results, cores[r])) for r in range(world)]
    for proc in procs:
        proc.start()
    done: dict[int, Any] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(done) < world and time.monotonic() < deadline:
            try:
                rank, result, error = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, proc in enumerate(procs) if r not in done and proc.exitcode not in (None, 0)]
                if dead:
                    raise WorldError({r: f"exited with code {procs[r].exitcode}" for r in dead}) from None
                continue
            if error is not None:
                raise WorldError({rank: error})
            done[rank] = result
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
    if len(done) < world:
        raise WorldError({r: "did not finish" for r in range(world) if r not in done})
    return [done[r] for r in range(world)]


def _child(fn: Callable[..., Any], core: int | None, out: Any, args: tuple[Any, ...]) -> None:
    if core is not None:
        _pin(core)
    out.put(fn(*args))


def _in_process(fn: Callable[..., Any], core: int | None, *args: Any) -> Any:
    """fn(*args) in a fresh spawned process (pinned to `core` unless None); its return value."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, core, out, args))
    proc.start()
    try:
        while True:
            try:
                return out.get(timeout=2)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{fn.__name__} died with exit code {proc.exitcode}") from None
    finally:
        proc.join(timeout=30)


def _setup(cfg: Config) -> dict[str, Any]:
    """What a student rank builds: data, student, loss, the HF teacher and the step plan."""
    from cot2align.models import hidden_size, load_model, load_tokenizer, num_layers
    from cot2align.recipes.build import distill_loss, needs, student_model
    from cot2align.recipes.inputs import input_paths
    from cot2align.recipes.prepare import read_samples
    from cot2align.train import plan_step

    p = input_paths(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = read_samples(p.train, cfg.data, s_tok, t_tok)
    student = student_model(cfg, s_tok)
    teacher = load_model(p.teacher_model, cfg.teacher.dtype)
    loss_fn = distill_loss(cfg, student, hidden_size(teacher), s_tok, t_tok)
    plan = plan_step(loss_fn, num_layers(student), num_layers(teacher), True, needs(cfg.loss).aux)
    return {"s_tok": s_tok, "t_tok": t_tok, "samples": samples, "student": student, "teacher": teacher,
            "loss": loss_fn, "plan": plan, "pad": {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}}


def _micro_batches(cfg: Config, n: int) -> list[list[list[int]]]:
    from cot2align.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(n, cfg.train.micro_batch_size, cfg.train.grad_accum, 1, cfg.run.seed)
    return [sampler.micro_batches(step, 0) for step in range(cfg.train.max_steps)]


def _teacher_alone(cfg: Config) -> list[float]:
    """Seconds per step of the serve loop's work for one student: teacher forwards + packing."""
    from cot2align.data.dataset import collate
    from cot2align.distributed.transport import pack
    from cot2align.teacher.serve import HFHiddenStates

    s = _setup(cfg)
    states = HFHiddenStates(s["teacher"], torch.device("cpu"))
    layers = s["plan"].teacher_layers
    times = []
    for micro in _micro_batches(cfg, len(s["samples"])):
        t0 = time.perf_counter()
        for idx in micro:
            batch = collate([s["samples"][i] for i in idx], s["pad"])
            for fmt in [f for f in s["plan"].fmts if f in batch.seqs["teacher"]]:
                seq = batch.seqs["teacher"][fmt]
                pack(states.hidden(seq, layers), seq.resp_mask, layers, torch.float32)
        times.append(time.perf_counter() - t0)
    return times


class _Replay:
    """TeacherSource handing out teacher views computed beforehand (by batch indices)."""

    def __init__(self, teacher: Any, views: dict[tuple[int, ...], Any]) -> None:
        self.final_layer, self.head, self.embed = teacher.final_layer, teacher.head, teacher.embed
        self._views = views

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        pass

    def views(self, batch: Any, fmts: list[str], layers: list[int]) -> dict[str, Any]:
        return {f: self._views[tuple(batch.indices)][f] for f in fmts}

    def stop(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def _student_alone(cfg: Config, run_dir: str) -> float:
    """Median seconds per step (after the first) of the student's training step with the teacher's
    states replayed from memory; the DeepSpeed stepper of the served runtime in a 1-rank world."""
    import torch.distributed as dist

    from cot2align.data.dataset import collate
    from cot2align.distributed.parallel import DataParallel
    from cot2align.distributed.spawn import free_port
    from cot2align.logging import MetricsLogger
    from cot2align.student.engine import DeepSpeedStepper, StudentMPU
    from cot2align.teacher.colocated import ColocatedTeacher
    from cot2align.train import TrainJob, train

    s = _setup(cfg)
    colocated = ColocatedTeacher(s["teacher"])
    plan = s["plan"]
    views = {}
    for micro in _micro_batches(cfg, len(s["samples"])):
        for idx in micro:
            batch = collate([s["samples"][i] for i in idx], s["pad"])
            fmts = [f for f in plan.fmts if f in batch.seqs["teacher"]]
            views[tuple(batch.indices)] = colocated.views(batch, fmts, plan.teacher_layers)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        dp = DataParallel(size=1, rank=0, group=dist.group.WORLD)
        mpu = StudentMPU(dp, [0], dist.new_group([0]))
        tc = cfg.train
        logger = MetricsLogger(Path(run_dir), cfg.logging, cfg.to_dict(), name="student-alone")
        job = TrainJob(run_dir=Path(run_dir), student=s["student"], student_tok=s["s_tok"], loss_fn=s["loss"],
                       samples=s["samples"], pad_ids=s["pad"], cfg=tc, seed=cfg.run.seed,
                       teacher=_Replay(colocated, views), needs_aux=len(plan.fmts) > 1,
                       projector_lr=cfg.loss.projector_lr, resume=False, data_parallel=dp,
                       device=torch.device("cpu"),
                       make_stepper=lambda n: DeepSpeedStepper(s["student"], s["loss"], tc, cfg.loss.projector_lr,
                                                               n, cfg.runtime.zero_stage, mpu))
        train(job, logger=logger, log_cfg=cfg.logging)
        logger.close()
    finally:
        dist.destroy_process_group()
    return _step_times(Path(run_dir))[0]


def overlap_pinned(base: Config, work: Path) -> dict[str, Any]:
    """Served (1 hf teacher rank on core 0, 1 student on core 1) vs each half alone on one core."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    cfg = base.merged({"run": {"name": "pinned-served"}, "runtime": {"mode": "served", "teacher_backend": "hf"},
                       "student": {"parallel": {"dp": 1}}, "teacher": {"parallel": {"tp": 1, "pp": 1}},
                       "train": {"max_steps": PINNED_STEPS, "grad_accum": 1, "threads": 1}})
    t0 = time.perf_counter()
    _launch_pinned(cfg, cores, timeout_s=600)
    served = _step_times(cfg.run_dir)[0]
    teacher = statistics.median(_in_process(_teacher_alone, cores[0], cfg)[1:])
    student = _in_process(_student_alone, cores[1], cfg, str(work / "student-alone"))
    bound = max(teacher, student)
    return {"cores": cores, "steps": PINNED_STEPS, "micro_batch": cfg.train.micro_batch_size,
            "served_step_s": round(served, 4), "teacher_alone_step_s": round(teacher, 4),
            "student_alone_step_s": round(student, 4), "ratio_served_to_max": round(served / bound, 3),
            "sum_alone_s": round(teacher + student, 4), "wall_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- cached vs served
def _student_alone_threads(cfg: Config, run_dir: str) -> float:
    """`_student_alone` with train.threads torch threads (as a rank of the worlds it is compared with)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return _student_alone(cfg, run_dir)


def cached_vs_served(base: Config, work: Path, served: str | None = None, repeats: int = 2) -> dict[str, Any]:
    """One student trained by a live teacher, from the cache (students only), and alone; the last two
    `repeats` times, alternated, the median of each kept. The live teacher is one hf rank unless
    `served` names the base config's own served layout (a preset)."""
    teacher = {} if served else {"parallel": {"tp": 1, "pp": 1, "replicas": 1}}
    runtime = {"mode": "served"} if served else {"mode": "served", "teacher_backend": "hf"}
    cfg = base.merged({"runtime": runtime, "student": {"parallel": {"dp": 1}},
                       "teacher": {**teacher, "cache": {"dir": str(work / "teacher-cache"), "dtype": "bfloat16"}},
                       "train": {"max_steps": CACHED_STEPS, "grad_accum": 1, "threads": 1}})
    live_cfg = cfg.merged({"run": {"name": "served-live"}, "teacher": {"cache": {"mode": "off"}}})
    launch_local(live_cfg, timeout_s=900)  # rank 0 prepares the data and tokenizers first
    live = _step_times(live_cfg.run_dir)[0]
    p = input_paths(cfg)
    records = len(read_samples(p.train, cfg.data, load_tokenizer(p.student_tokenizer),
                               load_tokenizer(p.teacher_tokenizer)))
    per_epoch = records // cfg.train.micro_batch_size
    t0 = time.perf_counter()
    _in_process(cache_teacher, None, cfg.merged({"teacher": {"cache": {"mode": "write"}}}))
    cache_s = time.perf_counter() - t0
    cached_runs, alone_runs = [], []
    for rep in range(repeats):  # alternated: a load change on this shared machine hits both
        cached_cfg = cfg.merged({"run": {"name": f"cached-{rep}"}, "teacher": {"cache": {"mode": "read"}}})
        ranks = launch_local(cached_cfg, timeout_s=900, return_all=True)
        cached_runs.append(_step_times(cached_cfg.run_dir)[0])
        alone_runs.append(_in_process(_student_alone_threads, None, cfg, str(work / f"student-alone-cached-{rep}")))
    cached, alone = statistics.median(cached_runs), statistics.median(alone_runs)
    return {"served_label": served or "1 hf teacher rank + 1 student",
            "steps": CACHED_STEPS, "micro_batch": cfg.train.micro_batch_size, "records": records,
            "steps_per_epoch": per_epoch, "threads_per_process": 1, "cached_world_ranks": len(ranks),
            "served_live_step_s": round(live, 4), "cached_step_s": round(cached, 4),
            "cached_step_s_runs": [round(x, 4) for x in cached_runs],
            "student_alone_step_s_runs": [round(x, 4) for x in alone_runs],
            "student_alone_step_s": round(alone, 4),
            "served_live_epoch_s": round(live * per_epoch, 2), "cached_epoch_s": round(cached * per_epoch, 2),
            "student_alone_epoch_s": round(alone * per_epoch, 2), "cache_teacher_s": round(cache_s, 1),
            "ratio_cached_to_student_alone": round(cached / alone, 3),
            "ratio_served_live_to_student_alone": round(live / alone, 3)}


def _print_cached(c: dict[str, Any]) -> None:
    print(f"\ncached epoch vs served live (dp 1, {c['threads_per_process']} torch thread per process, "
          f"{c['steps']} steps of micro-batch {c['micro_batch']}, median step after the first; an epoch = "
          f"{c['steps_per_epoch']} steps of {c['records']} records):\n")
    print("| teacher source | step ms | epoch s | / student alone |")
    print("|---|---:|---:|---:|")
    served = c.get("served_label", "1 hf teacher rank + 1 student")
    for name, key in ((f"served live ({served})", "served_live"),
                      (f"cache (world of {c['cached_world_ranks']} student, no teacher rank)", "cached"),
                      ("student alone (states replayed from memory)", "student_alone")):
        step = c[f"{key}_step_s"]
        print(f"| {name} | {step * 1e3:.1f} | {c[f'{key}_epoch_s']:.2f} | {step / c['student_alone_step_s']:.2f} |")
    if "cached_step_s_runs" in c:
        print(f"\nstep s of each alternated run: cached {c['cached_step_s_runs']}, "
              f"student alone {c['student_alone_step_s_runs']} (medians above)")
    print(f"\ncache-teacher (bf16, every record, in-process): {c['cache_teacher_s']:.1f} s")


# --------------------------------------------------------------------------- teacher memory
BIG_TEACHER = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
               "num_attention_heads": 16, "num_key_value_heads": 8}


def _build_big_teacher(tok_dir: Path, out: Path) -> int:
    """A random fp32 Llama of ~140M parameters with the teacher tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cot2align.models import load_tokenizer

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=512,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **BIG_TEACHER))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _whole_teacher_rss(cfg: Config) -> dict[str, float]:
    """One process: RSS after imports, then peak RSS after loading the whole HF teacher and
    running the forward of one micro-batch (as the hf backend does)."""
    from cot2align.data.dataset import collate
    from cot2align.models import load_model, load_tokenizer
    from cot2align.recipes.prepare import read_samples
    from cot2align.teacher.serve import HFHiddenStates, peak_rss_mb

    before = peak_rss_mb()
    p = paths(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = read_samples(p.train, cfg.data, s_tok, t_tok)
    states = HFHiddenStates(load_model(p.teacher_model, cfg.teacher.dtype), torch.device("cpu"))
    batch = collate(samples[: cfg.train.micro_batch_size], {"student": s_tok.pad_token_id,
                                                            "teacher": t_tok.pad_token_id})
    states.hidden(batch.seqs["teacher"]["main"], [0, states.num_layers])
    return {"imports_mb": round(before, 1), "peak_mb": round(peak_rss_mb(), 1)}


def _memory_status() -> dict[str, float]:
    """VmHWM (peak), VmRSS, RssAnon (private) and RssFile (mapped file pages) of this process, MiB."""
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(x.split()[1]) / 1024 for x in lines for k in keys if x.startswith(k + ":")}


def _reader_rss(checkpoint_dir: Path, tp: int) -> dict[str, Any]:
    """Memory of reading tp-rank 0's slices (columns of o_proj / down_proj, rows of the rest) with
    the megatron loader's safetensors reader, kept in memory as copies: while the file is open
    and after it is closed (a simplified loader: no model, no megatron)."""
    from cot2align.teacher.hf_to_megatron import CheckpointReader

    start = _memory_status()
    kept = []
    reader = CheckpointReader(checkpoint_dir)
    for name in reader.weight_map:
        shape = reader.shape(name)
        if len(shape) == 2 and ("o_proj" in name or "down_proj" in name):
            kept.append(reader.read(name, cols=slice(0, shape[1] // tp)).clone())
        else:
            kept.append(reader.read(name, rows=slice(0, shape[0] // tp)).clone())
    open_ = _memory_status()
    reader.close()
    return {"start": start, "file_open": open_, "closed": _memory_status(),
            "kept_mb": sum(t.numel() * t.element_size() for t in kept) / 2**20}


def teacher_memory(base: Config, work: Path, overhead_mb: float | None) -> dict[str, Any]:
    """Peak RSS per megatron teacher rank (tp=2; tp=2 x pp=2) vs one process with the whole teacher."""
    from cot2align.teacher.serve import ServeStats

    params = _in_process(_build_big_teacher, None, paths(base).teacher_tokenizer, work / "big_teacher")
    weights_mb = params * 4 / 2**20
    cfg = base.merged({"teacher": {"path": str(work / "big_teacher")},
                       "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1},
                       "student": {"parallel": {"dp": 1}}, "runtime": {"timeout_s": 300}})
    whole = _in_process(_whole_teacher_rss, None, cfg)
    rows: list[dict[str, Any]] = [{"case": "whole HF teacher, 1 process", "ranks": 1,
                                   "peak_rss_mb": [whole["peak_mb"]], "imports_mb": whole["imports_mb"]}]
    for tp, pp in ((2, 1), (2, 2)):
        run = cfg.merged({"run": {"name": f"rss-tp{tp}-pp{pp}"},
                          "runtime": {"mode": "served", "teacher_backend": "megatron"},
                          "teacher": {"parallel": {"tp": tp, "pp": pp}}})
        stats = [r for r in launch_local(run, return_all=True, timeout_s=600) if isinstance(r, ServeStats)]
        rows.append({"case": f"megatron tp={tp} pp={pp}, per teacher rank", "ranks": tp * pp,
                     "peak_rss_mb": [round(x.peak_rss_mb, 1) for x in stats],
                     "expected_mb": round(overhead_mb + weights_mb / (tp * pp), 1) if overhead_mb else None})
    reader = _in_process(_reader_rss, None, work / "big_teacher", 2)
    return {"teacher_params": params, "weights_mb": round(weights_mb, 1), "config": BIG_TEACHER,
            "overhead_mb": overhead_mb, "rows": rows, "reader_tp2": reader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-base", action="store_true", help="skip the served-vs-colocated table")
    parser.add_argument("--only-cached", action="store_true",
                        help="only the cached-epoch vs served-live section (writes bench/results/runtime-cached.json)")
    parser.add_argument("--preset", type=Path,
                        help="with --only-cached: a real-model config, served live with its own teacher layout "
                             "(writes bench/results/runtime-cached-<run.name>.json)")
    args = parser.parse_args()
    if args.preset and not args.only_cached:
        parser.error("--preset goes with --only-cached")
    if args.only_cached:
        return main_cached(args.preset)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_runtime_") as tmp:
        work = Path(tmp)
        base, source = _bench_base(work)
        colocated = {"train": {"grad_accum": 2}}  # the same global batches as 2 student replicas
        megatron = {"runtime": {"mode": "served", "teacher_backend": "megatron"}, "teacher": {"parallel": {"tp": 2}}}
        rows = []
        if not args.skip_base:
            rows += [_case(base, "colocated (1 process)", "colocated", colocated),
                     _case(base, "served hf (1 teacher + 2 students)", "served", {})]
        rows.append(_case(base, "served megatron tp2 (2 teacher + 2 students)", "served", megatron))
        overhead = rows[-1]["teacher_peak_rss_mb"]  # a megatron teacher rank whose weights are ~1 MB
        cached = cached_vs_served(base, work)
        pinned = overlap_pinned(base, work)
        memory = teacher_memory(base, work, overhead)
        from transformers import AutoConfig

        teacher = AutoConfig.from_pretrained(str(paths(base).teacher_model))
    vocab, hidden = int(teacher.vocab_size), int(teacher.hidden_size)
    layers = len(set(base.loss.ot.teacher_layers) | {-1})
    logits = {"fp32": 4 * vocab, "bf16": 2 * vocab}
    summary = {
        "source": source, "steps": STEPS, "served_layers": layers, "teacher_hidden": hidden,
        "teacher_vocab": vocab, "logits_bytes_per_token": logits, "cases": rows, "overlap_pinned": pinned,
        "teacher_memory": memory, "cached_vs_served": cached, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "note": "2-core CPU: the served world's processes share the cores; gloo, fp32 on the wire",
    }
    print(f"source: {source}; {STEPS} steps, micro-batch 8 x 2 replicas, loss {base.loss.name}; "
          f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print("| case | step s | tok/s | wall s | payload B/token | incl. headers | teacher peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} | "
              f"{r.get('payload_bytes_per_token', '-')} | {r.get('wire_bytes_per_token_incl_headers', '-')} | "
              f"{r.get('teacher_peak_rss_mb', '-')} |")
    print(f"\nfull teacher logits would be {logits['fp32']} B/token (fp32) or {logits['bf16']} B/token (bf16); "
          f"served: {layers} layers x {hidden} hidden x 4 B = {layers * hidden * 4} B/token (fp32 wire; "
          "bf16 on GPU halves it)")
    print(f"\noverlap, pinned (cores {pinned['cores']}, {pinned['steps']} steps, micro-batch {pinned['micro_batch']}, "
          "median step after the first):\n")
    print("| teacher alone ms | student alone ms | max ms | served ms | served / max | sum ms |")
    print("|---|---|---|---|---|---|")
    bound = max(pinned["teacher_alone_step_s"], pinned["student_alone_step_s"])
    print(f"| {pinned['teacher_alone_step_s'] * 1e3:.1f} | {pinned['student_alone_step_s'] * 1e3:.1f} | "
          f"{bound * 1e3:.1f} | {pinned['served_step_s'] * 1e3:.1f} | {pinned['ratio_served_to_max']:.2f} | "
          f"{pinned['sum_alone_s'] * 1e3:.1f} |")
    print(f"\nteacher memory: {memory['teacher_params'] / 1e6:.0f}M-parameter fp32 Llama ({memory['weights_mb']} MiB of "
          f"weights), fixed overhead {overhead} MiB (megatron rank of the embedded teacher):\n")
    print("| case | ranks | peak RSS MiB per rank | expected MiB |")
    print("|---|---|---|---|")
    for r in memory["rows"]:
        print(f"| {r['case']} | {r['ranks']} | {', '.join(f'{x:.0f}' for x in r['peak_rss_mb'])} | "
              f"{r.get('expected_mb') or '-'} |")
    _print_cached(cached)
    r = memory["reader_tp2"]
    print(f"\nreader alone (tp rank 0 of 2, {r['kept_mb']:.0f} MiB kept): peak {r['file_open']['VmHWM']:.0f} MiB with "
          f"the file open, of which mapped file pages {r['file_open']['RssFile']:.0f} and private "
          f"{r['file_open']['RssAnon']:.0f}; after closing it: RSS {r['closed']['VmRSS']:.0f} "
          f"(started at {r['start']['VmRSS']:.0f})")
    out = ROOT / "bench" / "results" / "runtime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


def _bench_base(work: Path) -> tuple[Config, str]:
    """The embedded config on this script's artefacts, short runs, no W&B."""
    base = load_config(ROOT / "configs" / "embedded.yaml")
    arte, source = _artefacts(base, work)
    return base.merged({
        **arte,
        "run": {"output_dir": str(work / "runs"), "resume": False,
                **({"work_dir": str(work / "work")} if arte else {})},
        "cot": {"enabled": False},
        "train": {"max_steps": STEPS, "micro_batch_size": 8, "grad_accum": 1},
        "student": {"parallel": {"dp": 2}},
        **QUIET_SHORT_RUN,
        "runtime": {"timeout_s": 120},
    }), source


def _preset_base(preset: Path, work: Path) -> tuple[Config, str]:
    """A real-model config as it is (its teacher layout and backend), short runs, no W&B."""
    cfg = load_config(preset)
    t = cfg.teacher.parallel
    layout = f"{t.tp * t.pp} {cfg.runtime.teacher_backend} teacher ranks (tp {t.tp} x pp {t.pp}) + 1 student"
    return cfg.merged({
        "run": {"output_dir": str(work / "runs"), "resume": False},
        **QUIET_SHORT_RUN,
        "runtime": {"timeout_s": 300},
    }), layout


def main_cached(preset: Path | None = None) -> None:
    """`python bench/runtime.py --only-cached [--preset CONFIG]`: the cached-epoch section alone, on
    the embedded-size models or on a real-model preset served live with its own teacher layout."""
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_runtime_cached_") as tmp:
        if preset:
            base, served = _preset_base(preset, Path(tmp))
            source = f"{preset} ({base.teacher.path} -> {base.student.tokenizer} student)"
        else:
            (base, source), served = _bench_base(Path(tmp)), None
        cached = cached_vs_served(base, Path(tmp), served)
    summary = {"source": source, "cached_vs_served": cached, "loadavg_start": load_start,
               "loadavg_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t0, 1),
               "note": f"CPU only, {os.cpu_count()} cores shared with other jobs; gloo, fp32 on the wire"}
    print(f"source: {source}; load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"wall {summary['wall_s']:.0f} s")
    _print_cached(cached)
    name = f"runtime-cached-{base.run.name}.json" if preset else "runtime-cached.json"
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
