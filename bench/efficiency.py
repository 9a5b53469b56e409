"""Compute efficiency of the student step on this machine, and the share of it spent in OT.

    python bench/efficiency.py            # prints a table, writes bench/results/efficiency.json

For each student size, on one real micro-batch of the embedded task (CoT-paired, both
tokenizers) with the teacher's views computed once beforehand (a served student receives
them; the teacher's forward is not part of the student's step):

* step time of `cot2align` (CE + Cross-CoT OT at the embedding and last layers, the
  embedded default's loss) and of `sft` with the same forward passes (both formats), median
  of several forward+backward passes;
* achieved FLOP/s of the cot2align step's student forward+backward, counted analytically
  (3 x (2 x matmul parameters + 4 x layers x context x d) per token, both formats), against the
  FLOP/s of a large fp32 matmul measured in the same run;
* OT share = (t_cot2align - t_sft) / t_cot2align: everything the OT term adds (cost matrices,
  Sinkhorn, projections and their backward).

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


def matmul_flops(n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an [n, n] x [n, n] fp32 matmul (2 n^3 FLOPs) over `reps` runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def matmul_params(model: nn.Module) -> int:
    """Parameters used in matmuls per token: every 2-d weight except the input embeddings, plus the
    (tied) output head."""
    emb = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not emb)
    return n + emb.numel()  # the LM head multiplies by the (tied) embedding matrix


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


def step_seconds(student: nn.Module, loss_fn: nn.Module, batch: Any, teacher: Any, plan: Any, reps: int) -> float:
    """Median forward+backward time of one micro-batch."""
    from cot2align.models import num_layers
    from cot2align.train import micro_batch_loss

    final = num_layers(student)  # type: ignore[arg-type]
    tokens = float(batch.seqs["student"]["main"].resp_mask.sum())
    times = []
    for i in range(reps + 1):
        student.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out = micro_batch_loss(student, final, loss_fn, batch, teacher, plan, tokens, float(len(batch.indices)))
        out.total.backward()
        if i:  # the first pass warms up allocators and caches
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(cfg: Config, size: dict[str, Any], micro_batch: int, reps: int) -> dict[str, Any]:
    from cot2align.data.dataset import collate
    from cot2align.losses import LossContext, build_loss
    from cot2align.models import TinyModelConfig, build_tiny_model, hidden_size, load_tokenizer
    from cot2align.pipeline import _samples, paths, prepare_data
    from cot2align.train import ColocatedTeacher, plan_step

    prepare_data(cfg)
    p = paths(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = [s for s in _samples(cfg, cfg.data, s_tok, t_tok, p) if s.paired][:micro_batch]
    batch = collate(samples, {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id})
    teacher = ColocatedTeacher(build_tiny_model(cfg.embedded.teacher_model, t_tok, seed=1))
    student = build_tiny_model(TinyModelConfig.from_dict(size, prefix="size"), s_tok, seed=2)
    results: dict[str, Any] = {"student_params": sum(p.numel() for p in student.parameters())}
    for name, loss_cfg in (("cot2align", cfg.loss.merged({"name": "cot2align", "base": "none"})),
                           ("sft", cfg.loss.merged({"name": "sft"}))):
        ctx = LossContext(hidden_size(student), teacher.model.config.hidden_size, len(s_tok), len(t_tok), False,
                          s_tok, t_tok)
        loss_fn = build_loss(loss_cfg, ctx)
        plan = plan_step(loss_fn, student.config.num_hidden_layers, teacher.final_layer, name != "sft", True)
        views = teacher.views(batch, plan.fmts, plan.teacher_layers) if plan.teacher_layers else {}
        results[f"{name}_s"] = step_seconds(student, loss_fn, batch, ReplayTeacher(teacher, views), plan, reps)
    per_token = 2 * matmul_params(student)
    tokens = 0
    for fmt in ("main", "aux"):
        seq = batch.seqs["student"][fmt]
        n = int(seq.attention_mask.sum())
        ctx_len = seq.input_ids.shape[1]
        tokens += n
        per_token_fmt = per_token + 4 * size["layers"] * ctx_len * size["hidden"]
        results.setdefault("flops", 0.0)
        results["flops"] += 3.0 * per_token_fmt * n
    results["tokens"] = tokens
    results["student_flops_per_s"] = results["flops"] / results["cot2align_s"]
    results["ot_share"] = (results["cot2align_s"] - results["sft_s"]) / results["cot2align_s"]
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
    lines = [f"large fp32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s, torch threads {torch.get_num_threads()}", "",
             "| student | params | tokens / micro-batch | sft step | cot2align step | OT share | "
             "student GFLOP/s | of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['student_params'] / 1e6:.2f} M | {r['tokens']} | {r['sft_s'] * 1e3:.0f} ms | "
                     f"{r['cot2align_s'] * 1e3:.0f} ms | {r['ot_share'] * 100:.0f}% | "
                     f"{r['student_flops_per_s'] / 1e9:.1f} | {r['student_flops_per_s'] / peak * 100:.1f}% |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"matmul_flops_per_s": peak, "rows": rows, "table": table,
                                          "micro_batch": args.micro_batch, "reps": args.reps}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
