"""The embedded pipeline and the stages it chains: data -> teacher -> distill -> evaluate.

`distill` dispatches on `runtime.mode` (colocated: `recipes.colocated`; served: a local world of
`recipes.served`); `run_embedded` is what `python launcher/submit.py` runs without arguments.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from cot2align.config import Config
from cot2align.evaluate import evaluate_examples, results_table
from cot2align.models import load_model, load_tokenizer
from cot2align.recipes.colocated import distill_colocated
from cot2align.recipes.inputs import ensure_inputs
from cot2align.recipes.prepare import load_split, prepare_data
from cot2align.recipes.served import launch_local
from cot2align.train import TrainResult


def distill(cfg: Config, run_dir: Path | None = None) -> TrainResult:
    """Distil the teacher into the student with `cfg.loss` (colocated: teacher in this process;
    served: a local world of teacher and student ranks, see `cot2align.recipes.served`)."""
    if cfg.runtime.mode == "served":
        if run_dir is not None:
            cfg = cfg.merged({"run": {"output_dir": str(run_dir.parent), "name": run_dir.name}})
        return launch_local(cfg)  # type: ignore[no-any-return]  # the first student's TrainResult
    return distill_colocated(cfg, run_dir)


def evaluate_model(cfg: Config, model_dir: Path, split: str = "test") -> dict[str, Any]:
    """Evaluate an HF checkpoint folder on a split with `cfg.eval` (see `evaluate.score`).

    Adds exact_match_by_steps {steps: mean over seeds} when `eval.breakdown` is "steps".
    """
    p = prepare_data(cfg)
    examples = load_split({"dev": p.dev, "test": p.test}[split], cfg.data)
    res = evaluate_examples(load_model(model_dir), load_tokenizer(model_dir), examples, cfg.eval)
    groups = res.get("by_steps") or {}
    res["exact_match_by_steps"] = {g: v["exact_match"] for g, v in groups.items() if "exact_match" in v}
    return res


def run_embedded(cfg: Config) -> dict[str, Any]:
    """The embedded pipeline: data -> teacher -> distill (cfg.loss) and an SFT baseline -> evaluate all three."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    p = ensure_inputs(cfg)
    t_teacher = time.perf_counter() - t0
    runs = {cfg.loss.name: cfg}
    if cfg.loss.name != "sft":
        runs["sft"] = cfg.merged({"loss": {"name": "sft"}, "run": {"name": cfg.run.name + "-sft"}})
    results: dict[str, Any] = {"teacher": evaluate_model(cfg, p.teacher_model)}
    for name, c in runs.items():
        res = distill(c)
        results[f"student ({name})"] = evaluate_model(c, res.export_dir)
    keys = ("exact_match", "exact_match_std", "rouge_l", "rouge_l_std", "seeds", "exact_match_by_steps")
    summary = {k: {m: v.get(m) for m in keys} for k, v in results.items()}
    out = cfg.run_dir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "wall_s": time.perf_counter() - t0,
                               "teacher_s": t_teacher}, indent=2))
    print(results_table(summary))
    print(f"wall time {time.perf_counter() - t0:.0f} s (teacher stage {t_teacher:.0f} s); results in {out}")
    return summary
