"""The GPU path in one run: OT engine speed, bf16 agreement of every loss, a colocated
distillation under bf16 autocast, the megatron teacher, and peak GPU memory of each.

    python bench/gpu.py                       # on a CUDA GPU (what bench/gpu.sh runs), < 8 min
    python bench/gpu.py --device cpu --quick  # every section on CPU, small sizes (checks the script)
    python bench/gpu.py --out bench/results/gpu.json

Sections (one table row each, plus a pass/fail column against its goal):

* ot: the 48 problems of one CoT2Align micro-batch (`bench/losses.py` sizes), 100 Sinkhorn
  iterations, no early stop: `batched_ot` vs the reference per-sample loop, forward + backward,
  median of rounds after a warm-up. Goal: >= 10x on CUDA (on CPU the ratio is only reported).
* loss <name>: every loss of the registry on synthetic inputs (`bench/losses.py`), the value
  in fp32 vs under bf16 autocast; goal: relative difference <= 5e-2.
* colocated: `train()` on a small generated task with tiny random models, fp32 on CPU (the
  reference) vs the device run with bf16 autocast; goal: the first steps' losses within 5e-2
  (relative).
* megatron: the megatron-core teacher (tp 1, pp 1) on the device vs the HF model (fp32, CPU):
  max abs logits difference relative to the largest logit; goal <= 1e-3 (fp32).

Peak memory: torch.cuda.max_memory_allocated per section (reset before it), or "-" on CPU.
Exit status: 0 when every goal holds, 1 otherwise (the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import losses as bench_losses  # noqa: E402

from cot2align.losses.base import LossContext, LossInputs, ResponseView  # noqa: E402
from cot2align.losses.config import LossConfig, SinkhornConfig  # noqa: E402
from cot2align.losses.registry import build_loss, loss_names  # noqa: E402
from cot2align.losses.sinkhorn import batched_ot  # noqa: E402

Row = dict[str, Any]
MIB = 1 << 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def _median_ms(fn: Callable[[], None], device: torch.device, rounds: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- OT engine
def bench_ot(device: torch.device, quick: bool) -> Row:
    sz = bench_losses.QUICK if quick else bench_losses.FULL
    costs = [c.float().to(device) for c in bench_losses.make_costs(sz)]
    cfg = SinkhornConfig(epsilon=bench_losses.EPS, iterations=bench_losses.ITERS, tolerance=0.0)

    def run(method: Callable[[list[Tensor]], Tensor]) -> Callable[[], None]:
        def once() -> None:
            leaves = [c.detach().clone().requires_grad_(True) for c in costs]
            method(leaves).sum().backward()

        return once

    _reset_peak(device)
    ours = _median_ms(run(lambda cs: batched_ot(cs, cfg).values), device, 3 if quick else 5)
    peak = _peak_mib(device)
    loop = _median_ms(run(lambda cs: bench_losses.reference_loop(cs, bench_losses.EPS, bench_losses.ITERS)), device,
                      2 if quick else 3)
    with torch.no_grad():
        ref = bench_losses.reference_loop(costs, bench_losses.EPS, bench_losses.ITERS)
        got = batched_ot(costs, cfg).values
    rel = float(((got - ref).abs() / ref.abs()).max())
    speedup = loop / ours
    ok = (speedup >= 10 or device.type != "cuda") and rel <= 1e-3
    return {"section": "ot", "what": f"{len(costs)} problems, {bench_losses.ITERS} it: ours {ours:.1f} ms vs loop "
            f"{loop:.1f} ms fwd+bwd", "measure": f"{speedup:.1f}x (value rel diff {rel:.1e})",
            "goal": ">= 10x on cuda", "ok": ok, "peak_mib": peak}


# ----------------------------------------------------------------------------- losses, bf16 vs fp32
def _inputs_on(inputs: LossInputs, device: torch.device) -> LossInputs:
    def view(v: ResponseView) -> ResponseView:
        return ResponseView(hidden={k: h.detach().to(device).requires_grad_(h.requires_grad) for k, h in v.hidden.items()},
                            mask=v.mask.to(device), inputs=v.inputs.to(device), targets=v.targets.to(device))

    return LossInputs(student={k: view(v) for k, v in inputs.student.items()},
                      teacher={k: view(v) for k, v in inputs.teacher.items()},
                      student_logits=inputs.student_logits.detach().to(device).requires_grad_(True),
                      student_final=inputs.student_final, teacher_final=inputs.teacher_final,
                      student_head=inputs.student_head, teacher_head=inputs.teacher_head,
                      student_embed=inputs.student_embed, teacher_embed=inputs.teacher_embed,
                      num_tokens=inputs.num_tokens, num_examples=inputs.num_examples, extras=dict(inputs.extras))


def bench_loss(name: str, device: torch.device, quick: bool) -> Row:
    sz = bench_losses.QUICK
    if not quick:
        sz = bench_losses.Sizes(**{**sz.__dict__, "n_student": 128, "n_teacher": 150, "d_student": 512,
                                   "d_teacher": 1024, "vocab_student": 16_000, "vocab_teacher": 32_000})
    row: Row = {"section": f"loss {name}", "goal": "rel diff <= 5e-2"}
    shared = name == "kd"  # plain KD needs one vocabulary for both
    ctx = LossContext(d_student=sz.d_student, d_teacher=sz.d_teacher, vocab_student=sz.vocab_student,
                      vocab_teacher=sz.vocab_student if shared else sz.vocab_teacher, same_tokenizer=shared)
    texts = None
    if name == "mined":  # real tokenizers (.cache/test-assets) and text rows
        built = bench_losses._mined_context(ctx, sz, row)
        if built is None:
            return {**row, "what": "not built", "measure": f"skipped: {row.get('note', '')[:80]}", "ok": True,
                    "peak_mib": None}
        ctx, texts = built
    sz = bench_losses.Sizes(**{**sz.__dict__, "vocab_student": ctx.vocab_student, "vocab_teacher": ctx.vocab_teacher})
    torch.manual_seed(0)
    loss = build_loss(LossConfig(name=name), ctx).to(device)  # type: ignore[arg-type]
    torch.manual_seed(1)
    s_head = nn.Linear(ctx.d_student, ctx.vocab_student, bias=False).to(device)
    t_head = nn.Linear(ctx.d_teacher, ctx.vocab_teacher, bias=False).requires_grad_(False).to(device)
    s_embed = nn.Embedding(ctx.vocab_student, ctx.d_student).to(device)
    t_embed = nn.Embedding(ctx.vocab_teacher, ctx.d_teacher).requires_grad_(False).to(device)
    heads: dict[str, Any] = {"student_head": lambda h: s_head(h.to(s_head.weight.dtype)),
                             "teacher_head": lambda h: t_head(h.to(t_head.weight.dtype)),
                             "student_embed": s_embed, "teacher_embed": t_embed}
    s_layers, t_layers = loss.required_layers()
    inputs = _inputs_on(bench_losses.make_loss_inputs(sz, s_layers, t_layers, heads, texts), device)
    inputs.extras["student_head_weight"] = s_head.weight
    if shared:  # one tokenizer: the teacher's response positions are the student's
        g = torch.Generator().manual_seed(2)
        inputs.teacher = {f: ResponseView(
            hidden={k: torch.randn(*inputs.student[f].mask.shape, h.shape[-1], generator=g).to(h.dtype).to(device)
                    for k, h in t.hidden.items()},
            mask=inputs.student[f].mask, inputs=inputs.student[f].inputs, targets=inputs.student[f].targets)
            for f, t in inputs.teacher.items()}
    _reset_peak(device)
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = loss(inputs)
        out.total.backward()
        values[dtype] = float(out.total.detach())
    rel = abs(values[torch.bfloat16] - values[torch.float32]) / max(abs(values[torch.float32]), 1e-12)
    return {**row, "what": f"fp32 {values[torch.float32]:.5g} vs bf16 autocast {values[torch.bfloat16]:.5g}",
            "measure": f"{rel:.1e}", "ok": rel <= 5e-2, "peak_mib": _peak_mib(device)}


# ----------------------------------------------------------------------------- colocated distillation
def _tiny_task(root: Path) -> dict[str, Path]:
    from cot2align.data.embedded import EmbeddedTaskConfig, write_embedded_task
    from cot2align.data.jsonl import read_jsonl
    from cot2align.data.tokenizer_training import tokenizer_corpus, train_tokenizer

    files = write_embedded_task(EmbeddedTaskConfig(n_train=96, n_dev=16, n_test=16, n_test_long=8), root / "data")
    rows, _ = read_jsonl(files["train"])
    corpus = [{"instruction": e.instruction, "input": e.input, "output": e.output, "rationale": e.rationale}
              for e in rows]
    train_tokenizer(tokenizer_corpus(corpus), "bpe", 400, root / "tok_teacher")
    train_tokenizer(tokenizer_corpus(corpus), "wordpiece", 300, root / "tok_student")
    return {**files, "tok_teacher": root / "tok_teacher", "tok_student": root / "tok_student"}


def _distill(task: dict[str, Path], run_dir: Path, device: torch.device, dtype: str, steps: int) -> list[float]:
    """The colocated recipe (`recipes.colocated.distill_colocated`) with every module on `device`
    and tiny random models; the per-step losses."""
    from cot2align.config import Config
    from cot2align.models import TinyModelConfig, build_tiny_model, hidden_size, load_tokenizer
    from cot2align.recipes.build import distill_loss, open_logger
    from cot2align.recipes.prepare import prepare_data, read_samples
    from cot2align.teacher.colocated import ColocatedTeacher
    from cot2align.train import TrainJob, train

    cfg = Config().merged({
        "run": {"output_dir": str(run_dir.parent), "name": run_dir.name, "seed": 3, "work_dir": str(run_dir / "work"),
                "resume": False},
        "data": {"train_file": str(task["train"]), "dev_file": str(task["dev"]), "test_file": str(task["test"]),
                 "max_length": 128, "max_prompt_length": 40},
        "cot": {"enabled": False},
        "student": {"tokenizer": str(task["tok_student"])},
        "teacher": {"tokenizer": str(task["tok_teacher"])},
        "train": {"lr": 1e-2, "min_lr": 1e-4, "max_steps": steps, "micro_batch_size": 8, "dtype": dtype},
        "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
    })
    p = prepare_data(cfg)
    s_tok, t_tok = load_tokenizer(task["tok_student"]), load_tokenizer(task["tok_teacher"])
    teacher = build_tiny_model(TinyModelConfig(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2,
                                               intermediate=128), t_tok, seed=2).to(device).eval()
    student = build_tiny_model(TinyModelConfig(arch="gpt2", layers=2, hidden=48, heads=4, kv_heads=4,
                                               intermediate=96), s_tok, seed=1).to(device)
    torch.manual_seed(0)
    loss_fn = distill_loss(cfg, student, hidden_size(teacher), s_tok, t_tok).to(device)
    job = TrainJob(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn,
                   samples=read_samples(p.train, cfg.data, s_tok, t_tok),
                   pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}, cfg=cfg.train, seed=3,
                   teacher=ColocatedTeacher(teacher), needs_aux=cfg.loss.ot.cross_pairs,
                   projector_lr=cfg.loss.projector_lr, device=device, resume=False)
    logger = open_logger(cfg, run_dir, run_dir.name)
    try:
        res = train(job, logger=logger, log_cfg=cfg.logging, callbacks=[])
    finally:
        logger.close()
    return [h["loss"] for h in res.history]


def bench_colocated(device: torch.device, quick: bool, work: Path) -> Row:
    steps = 3 if quick else 6
    task = _tiny_task(work / "task")
    ref = _distill(task, work / "cpu-fp32", torch.device("cpu"), "float32", steps)
    _reset_peak(device)
    got = _distill(task, work / f"{device.type}-bf16", device, "bfloat16", steps)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
    return {"section": "colocated", "what": f"cot2align loss, {steps} steps: {device.type} bf16 autocast vs cpu fp32 "
            f"(first {ref[0]:.4g} / {got[0]:.4g})", "measure": f"max rel diff {rel:.1e}", "goal": "<= 5e-2",
            "ok": rel <= 5e-2, "peak_mib": _peak_mib(device)}


# ----------------------------------------------------------------------------- megatron teacher
def _megatron_rank(rank: int, port: int, ckpt: str, ids: Tensor, mask: Tensor, queue: Any) -> None:
    import torch.distributed as dist

    from cot2align.distributed.topology import StudentParallelConfig, TeacherParallelConfig, Topology
    from cot2align.teacher.megatron_model import MegatronTeacher

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))
    topo = Topology(TeacherParallelConfig(tp=1, pp=1, replicas=1), StudentParallelConfig(), 2, rank)
    topo.create_groups()
    if topo.role() == "teacher":
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
            torch.cuda.reset_peak_memory_stats()
        teacher = MegatronTeacher(ckpt, topo.teacher_pg_collection(), dtype=torch.float32)
        logits = teacher.logits(ids, mask)
        peak = torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None
        # as numpy: a tensor would travel as shared memory that dies with this process
        queue.put({"logits": None if logits is None else logits.float().cpu().numpy(), "peak_mib": peak,
                   "device": str(teacher.device or "cpu")})
    dist.barrier()
    dist.destroy_process_group()


def bench_megatron(device: torch.device, work: Path) -> Row:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cot2align.distributed.spawn import free_port

    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
                         vocab_size=250, num_hidden_layers=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
    model.save_pretrained(work / "llama")
    ids = torch.randint(0, 250, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned teacher picks CUDA whenever it sees one
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_megatron_rank, args=(r, port, str(work / "llama"), ids, mask, queue))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        out = queue.get(timeout=300)
        for proc in procs:
            proc.join(timeout=60)
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    valid = mask.bool()
    err = float((torch.from_numpy(out["logits"]) - ref)[valid].abs().max() / ref[valid].abs().max())
    return {"section": "megatron", "what": f"tp 1 teacher on {out['device']} vs HF fp32 logits [4, 12, 250]",
            "measure": f"max abs diff / max |logit| {err:.1e}", "goal": "<= 1e-3", "ok": err <= 1e-3,
            "peak_mib": out["peak_mib"]}


# ----------------------------------------------------------------------------- report
def table(rows: list[Row]) -> str:
    lines = ["| section | what | measured | goal | ok | peak GPU MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['section']} | {r['what']} | {r['measure']} | {r['goal']} | "
                     f"{'yes' if r['ok'] else 'NO'} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small sizes (a check of the script, ~2 min on CPU)")
    parser.add_argument("--only", nargs="*", choices=["ot", "losses", "colocated", "megatron"],
                        help="run only these sections")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU visible (torch.cuda.is_available() is False); use --device cpu")
        return 0
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    sections = set(args.only or ["ot", "losses", "colocated", "megatron"])
    rows: list[Row] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        work = Path(tmp)
        if "ot" in sections:
            rows.append(bench_ot(device, args.quick))
        if "losses" in sections:
            rows.extend(bench_loss(name, device, args.quick) for name in loss_names())
        if "colocated" in sections:
            rows.append(bench_colocated(device, args.quick, work))
        if "megatron" in sections:
            rows.append(bench_megatron(device, work))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s"
          f"{' (--quick)' if args.quick else ''}\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "quick": args.quick, "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
