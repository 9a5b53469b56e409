"""Compute efficiency of the student step on this machine, and the share of it spent in OT.

    python bench/efficiency.py            # prints a table, writes bench/results/efficiency.json

For each student size, on one real micro-batch of the embedded task (CoT-paired, both
tokenizers) with the teacher's views computed once beforehand (a served student receives
them; the teacher's forward is not part of the student's step), the median forward+backward
time of three steps, interleaved rep by rep:

* `sft`: the plain student step (main format only);
* `sft_aux`: the same plus the student's forward on the CoT ("aux") format, which only the
  Cross-CoT OT uses (no backward: nothing depends on it);
* `cot2align`: CE + Cross-CoT OT at the embedding and last layers (the embedded default's loss).

Achieved FLOP/s = `step_flops` (counted analytically on the padded batch as computed: main
format for sft, both formats for cot2align) / step time, against the best FLOP/s of large fp32
matmuls measured in the same run. OT share = (t_cot2align - t_sft_aux) / t_cot2align: everything
the OT term adds (cost matrices, Sinkhorn, projections, and the backward through the student's
aux-format forward).

Teacher and students have random weights: step time does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cot2align.config import Config, load_config  # noqa: E402

SIZES = {
    "embedded (2 x 64)": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 256},
    "quality (3 x 128)": {"arch": "gpt2", "layers": 3, "hidden": 128, "heads": 4, "kv_heads": 4,
                          "intermediate": 512},
    "6 x 512": {"arch": "gpt2", "layers": 6, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 2048},
}


def matmul_flops(sizes: tuple[int, ...] = (1024, 2048, 3072), reps: int = 8) -> float:
    """Best FLOP/s of square fp32 matmuls ([n, n] x [n, n] = 2 n^3 FLOPs) over sizes and runs."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def body_matmul_params(model: nn.Module) -> int:
    """Parameters of the transformer body's matmuls: every 2-d weight outside embedding tables."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in tables)


def step_flops(model: nn.Module, batch: Any, layers: int, hidden: int, fmts: tuple[str, ...]) -> float:
    """FLOPs of the student's forward+backward on `fmts` of a micro-batch as computed (padded): the
    body on [B, T] tokens per format (2 x params + 4 x layers x T x d per token: QK^T and AV), the
    output head (tied embedding, V x d) on the main format's [B, N] response positions;
    backward = 2 x forward."""
    vocab, d = model.get_input_embeddings().weight.shape
    forward = 0.0
    for fmt in fmts:
        b, t = batch.seqs["student"][fmt].input_ids.shape
        forward += b * t * (2 * body_matmul_params(model) + 4 * layers * t * hidden)
    forward += 2 * vocab * d * batch.seqs["student"]["main"].resp_mask.numel()
    return 3 * forward


class ReplayTeacher:
    """A TeacherSource that hands out views computed once (what a served student receives)."""

    def __init__(self, teacher: Any, views: dict[str, Any]) -> None:
        self.final_layer, self.head, self.embed = teacher.final_layer, teacher.head, teacher.embed
        self._views = views

    def start(self, *args: Any) -> None:
        pass

    def views(self, batch: Any, fmts: list[str], layers: list[int]) -> dict[str, Any]:
        return {f: self._views[f] for f in fmts}

    def stop(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def step_seconds(setups: dict[str, tuple[nn.Module, Any, Any]], student: nn.Module, batch: Any,
                 reps: int) -> dict[str, float]:
    """Median forward+backward wall time of one micro-batch per setup (name -> (loss, teacher, plan)),
    the setups interleaved rep by rep so that a shared machine's load hits them alike."""
    from cot2align.models import num_layers
    from cot2align.train import micro_batch_loss

    final = num_layers(student)  # type: ignore[arg-type]
    tokens = float(batch.seqs["student"]["main"].resp_mask.sum())
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i in range(reps + 1):
        for name, (loss_fn, teacher, plan) in setups.items():
            student.zero_grad(set_to_none=True)
            loss_fn.zero_grad(set_to_none=True)
            t = time.perf_counter()
            out = micro_batch_loss(student, final, loss_fn, batch, teacher, plan, tokens, float(len(batch.indices)))
            out.total.backward()
            if i:  # the first round warms up allocators and caches
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(cfg: Config, size: dict[str, Any], micro_batch: int, reps: int) -> dict[str, Any]:
    from cot2align.data.dataset import collate
    from cot2align.losses import LossContext, build_loss
    from cot2align.models import TinyModelConfig, build_tiny_model, hidden_size, load_tokenizer
    from cot2align.recipes.prepare import prepare_data, read_samples
    from cot2align.teacher.colocated import ColocatedTeacher
    from cot2align.train import plan_step

    p = prepare_data(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = [s for s in read_samples(p.train, cfg.data, s_tok, t_tok) if s.paired][:micro_batch]
    batch = collate(samples, {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id})
    teacher = ColocatedTeacher(build_tiny_model(cfg.embedded.teacher_model, t_tok, seed=1))
    student = build_tiny_model(TinyModelConfig.from_dict(size, prefix="size"), s_tok, seed=2)
    results: dict[str, Any] = {"student_params": sum(p.numel() for p in student.parameters())}
    setups = {}
    for name, loss_cfg, aux in (("cot2align", cfg.loss.merged({"name": "cot2align", "base": "none"}), True),
                                ("sft_aux", cfg.loss.merged({"name": "sft"}), True),
                                ("sft", cfg.loss.merged({"name": "sft"}), False)):
        ctx = LossContext(hidden_size(student), teacher.model.config.hidden_size, len(s_tok), len(t_tok), False,
                          s_tok, t_tok)
        loss_fn = build_loss(loss_cfg, ctx)
        plan = plan_step(loss_fn, student.config.num_hidden_layers, teacher.final_layer, name == "cot2align", aux)
        views = teacher.views(batch, plan.fmts, plan.teacher_layers) if plan.teacher_layers else {}
        setups[name] = (loss_fn, ReplayTeacher(teacher, views), plan)
    for name, seconds in step_seconds(setups, student, batch, reps).items():
        results[f"{name}_s"] = seconds
    results["sft_flops"] = step_flops(student, batch, size["layers"], size["hidden"], ("main",))
    results["cot2align_flops"] = step_flops(student, batch, size["layers"], size["hidden"], ("main", "aux"))
    results["tokens"] = sum(int(batch.seqs["student"][f].attention_mask.sum()) for f in ("main", "aux"))
    results["sft_flops_per_s"] = results["sft_flops"] / results["sft_s"]
    results["cot2align_flops_per_s"] = results["cot2align_flops"] / results["cot2align_s"]
    results["ot_share"] = (results["cot2align_s"] - results["sft_aux_s"]) / results["cot2align_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "embedded.yaml"))
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "efficiency.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    peak = matmul_flops()
    rows = {name: measure(cfg, size, args.micro_batch, args.reps) for name, size in SIZES.items()}
    peak = max(peak, matmul_flops())  # measured before and after: the machine is shared
    lines = [f"large fp32 matmul (best of n = 1024-3072, before and after): {peak / 1e9:.1f} GFLOP/s, "
             f"torch threads {torch.get_num_threads()}", "",
             "| student | params | tokens / micro-batch | sft step | sft + aux forward | cot2align step | OT share | "
             "GFLOP/s sft (of peak) | GFLOP/s cot2align (of peak) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['student_params'] / 1e6:.2f} M | {r['tokens']} | {r['sft_s'] * 1e3:.0f} ms | "
                     f"{r['sft_aux_s'] * 1e3:.0f} ms | "
                     f"{r['cot2align_s'] * 1e3:.0f} ms | {r['ot_share'] * 100:.0f}% | "
                     f"{r['sft_flops_per_s'] / 1e9:.1f} ({r['sft_flops_per_s'] / peak * 100:.0f}%) | "
                     f"{r['cot2align_flops_per_s'] / 1e9:.1f} ({r['cot2align_flops_per_s'] / peak * 100:.0f}%) |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"matmul_flops_per_s": peak, "rows": rows, "table": table,
                                          "micro_batch": args.micro_batch, "reps": args.reps}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
