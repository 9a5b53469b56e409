"""Benchmark of the served runtime against the colocated path on the embedded models.

    python bench/runtime.py            # prints a table, writes bench/results/runtime.json

Measures, for the same global batches (2 student replicas in served mode = grad_accum 2
colocated): the optimizer step time (median over steps after the first, from the
metrics timestamps), what travels teacher -> student per response token (packed
hidden states of the served layers) against what full teacher logits would cost, and
the peak RSS of a teacher rank. Uses the embedded pipeline's trained teacher and
tokenizers when `cot2align.pipeline.paths(cfg)` finds them; otherwise builds the
embedded-size models (random weights: step time does not depend on training) on a
small generated task. On a 2-core CPU the served world's 3-4 processes share the
cores, so served step times here measure overhead, not the speed-up of real hardware.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cot2align.config import Config, load_config  # noqa: E402
from cot2align.pipeline import distill, paths  # noqa: E402

STEPS = 8


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
    from cot2align.runtime import launch_local

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


def main() -> None:
    base = load_config(ROOT / "configs" / "embedded.yaml")
    with tempfile.TemporaryDirectory(prefix="bench_runtime_") as tmp:
        work = Path(tmp)
        arte, source = _artefacts(base, work)
        base = base.merged({
            **arte,
            "run": {"output_dir": str(work / "runs"), "resume": False},
            "cot": {"enabled": False},
            "train": {"max_steps": STEPS, "micro_batch_size": 8, "grad_accum": 1},
            "student": {"parallel": {"dp": 2}},
            "eval": {"dev_limit": 1, "max_new_tokens": 1, "seeds": [1]},
            "logging": {"wandb_mode": "disabled", "progress": False, "log_every": 1},
            "runtime": {"timeout_s": 120},
        })
        colocated = {"train": {"grad_accum": 2}}  # the same global batches as 2 student replicas
        rows = [
            _case(base, "colocated (1 process)", "colocated", colocated),
            _case(base, "served hf (1 teacher + 2 students)", "served", {}),
            _case(base, "served megatron tp2 (2 teacher + 2 students)", "served",
                  {"runtime": {"mode": "served", "teacher_backend": "megatron"},
                   "teacher": {"parallel": {"tp": 2}}}),
        ]
        from transformers import AutoConfig

        teacher = AutoConfig.from_pretrained(str(paths(base).teacher_model))
    vocab, hidden = int(teacher.vocab_size), int(teacher.hidden_size)
    layers = len(set(base.loss.ot.teacher_layers) | {-1})
    logits = {"fp32": 4 * vocab, "bf16": 2 * vocab}
    summary = {
        "source": source, "steps": STEPS, "served_layers": layers, "teacher_hidden": hidden,
        "teacher_vocab": vocab, "logits_bytes_per_token": logits, "cases": rows,
        "note": "2-core CPU: the served world's processes share the cores; gloo, fp32 on the wire",
    }
    print(f"source: {source}; {STEPS} steps, micro-batch 8 x 2 replicas, loss {base.loss.name}\n")
    print("| case | step s | tok/s | wall s | payload B/token | incl. headers | teacher peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} | "
              f"{r.get('payload_bytes_per_token', '-')} | {r.get('wire_bytes_per_token_incl_headers', '-')} | "
              f"{r.get('teacher_peak_rss_mb', '-')} |")
    print(f"\nfull teacher logits would be {logits['fp32']} B/token (fp32) or {logits['bf16']} B/token (bf16); "
          f"served: {layers} layers x {hidden} hidden x 4 B = {layers * hidden * 4} B/token (fp32 wire; "
          "bf16 on GPU halves it)")
    out = ROOT / "bench" / "results" / "runtime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
