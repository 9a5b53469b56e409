"""`cot2align report RUN_DIR`: PNG plots and a markdown summary of a run, without W&B.

Reads what a run directory holds: metrics.jsonl (train/, dev/, distill/, serve/, teacher/
keys), config.yaml, eval_results.json files (from `cot2align evaluate`), results.json (the
embedded pipeline) and ot_plans/step_*.pt (Cross-CoT OT plans saved during distillation
every `logging.heatmap_every` steps). Plots use matplotlib (the `report` extra), Agg backend.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cot2align.evaluate import eval_table, results_table
from cot2align.logging import log
from cot2align.losses.ot import CrossCoTOT, transport_plans

#: train/ keys that are not loss parts (plotted elsewhere or not at all)
_NOT_LOSS = {"grad_norm", "lr", "epoch", "tokens_per_s"}
#: config keys shown in the report, when present
_HIGHLIGHTS = ("run.name", "loss.name", "loss.base", "loss.kd_rate", "loss.ot.cost", "loss.ot.weight",
               "loss.ot.student_layers", "loss.ot.teacher_layers", "loss.ot.sinkhorn.epsilon", "train.lr",
               "train.epochs", "train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.dtype",
               "teacher.path", "student.path", "runtime.mode", "student.parallel.dp", "eval.decoding",
               "eval.seeds")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("cot2align report needs matplotlib: pip install 'cot2align[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> key -> [(step, value)] sorted by step, for every finite numeric value; a step
    logged again (a resumed or repeated run appends to the file) keeps its last value."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                if math.isfinite(v):
                    series[k][step] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}


def _plot(plt: Any, panels: dict[str, list[tuple[int, float]]], title: str, out: Path) -> Path:
    """One subplot per series (value over steps), saved as a PNG."""
    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, pts) in zip(axes.flat, panels.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_metrics(series: dict[str, list[tuple[int, float]]], out_dir: Path) -> dict[str, Path]:
    """PNGs: one per loss part (loss_<part>.png), optimizer.png, throughput.png, dev.png (when the keys exist)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, pts in series.items():
        if key.startswith("train/") and key.removeprefix("train/") not in _NOT_LOSS:
            part = key.removeprefix("train/")
            written[key] = _plot(plt, {key: pts}, part, out_dir / f"loss_{part.replace('/', '_')}.png")
    groups = {
        "optimizer": {k: v for k, v in series.items() if k in ("train/lr", "train/grad_norm")},
        "throughput": {k: v for k, v in series.items()
                       if k == "train/tokens_per_s" or k.startswith(("teacher/", "serve/"))},
        "dev": {k: v for k, v in series.items() if k.startswith("dev/") and not k.endswith("_std")},
    }
    for name, panels in groups.items():
        if panels:
            written[name] = _plot(plt, panels, name, out_dir / f"{name}.png")
    return written


def _token_strings(tok: Any, ids: list[int]) -> list[str]:
    if tok is None:
        return [str(i) for i in ids]
    return [str(t) for t in tok.convert_ids_to_tokens(ids)]


def save_plans(module: nn.Module, step: int, run_dir: Path) -> Path | None:
    """Write the plans of the states `module` (a CrossCoTOT) recorded to run_dir/ot_plans/step_XXXXXX.pt:
    {"step", "plans": {name: P [N_s, N_t]}, "student_tokens": {name: [N_s]}, "teacher_tokens": {name: [N_t]}}."""
    states = getattr(module, "recorded", None)
    if states is None or not states.problems:
        return None
    s_tok, t_tok = module.tokenizers  # type: ignore[misc]
    record = {
        "step": step,
        "plans": transport_plans(module),  # type: ignore[arg-type]
        "student_tokens": {k: _token_strings(s_tok, ids[0]) for k, ids in states.token_ids.items()},
        "teacher_tokens": {k: _token_strings(t_tok, ids[1]) for k, ids in states.token_ids.items()},
    }
    out = run_dir / "ot_plans" / f"step_{step:06d}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, out)
    return out


def plot_plans(plan_file: Path, out_dir: Path, max_plots: int = 4) -> dict[str, Path]:
    """Heatmaps (student positions x teacher positions, tokens on the axes) of a saved plan file."""
    plt = _pyplot()
    record = torch.load(plan_file, weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in list(record["plans"])[:max_plots]:
        plan = record["plans"][name]
        s_toks, t_toks = record["student_tokens"][name], record["teacher_tokens"][name]
        n, m = plan.shape
        fig, ax = plt.subplots(figsize=(min(14.0, max(4.0, 0.22 * m + 2)), min(12.0, max(3.5, 0.22 * n + 1.5))))
        # each row scaled by N_s: a row of the plan is a distribution over teacher positions
        im = ax.imshow((plan * n).numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        _ticks(ax.set_xticks, ax.set_xticklabels, t_toks, rotation=90)
        _ticks(ax.set_yticks, ax.set_yticklabels, s_toks, rotation=0)
        ax.set_xlabel("teacher response tokens")
        ax.set_ylabel("student response tokens")
        ax.set_title(f"step {record['step']}: {name}", fontsize=9)
        fig.colorbar(im, ax=ax, label="N_s x P")
        fig.tight_layout()
        path = out_dir / f"{plan_file.stem}_{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written[name] = path
    return written


def _ticks(set_ticks: Any, set_labels: Any, labels: list[str], rotation: int, most: int = 48) -> None:
    every = max(1, math.ceil(len(labels) / most))
    pos = list(range(0, len(labels), every))
    set_ticks(pos)
    set_labels([labels[i] for i in pos], fontsize=6, rotation=rotation)


_WARNED: set[str] = set()


def ot_plan_hook(loss_fn: nn.Module, step: int, every: int, run_dir: Path, logger: Any = None) -> Path | None:
    """Called by the training loop after each step on the logging rank: every `every` steps, save
    (and plot, and log to W&B) the OT plans recorded during the step; turn recording on for the
    step before the next save only, so other steps pay nothing. Returns the saved plan file."""
    mods = [m for m in loss_fn.modules() if isinstance(m, CrossCoTOT)]
    saved = None
    for m in mods[:1]:
        if step % every == 0:
            saved = save_plans(m, step, run_dir)
        m.record_plans = (step + 1) % every == 0
        m.recorded = None
    if saved is not None and logger is not None:
        try:
            pngs = plot_plans(saved, saved.parent)
        except ImportError as e:
            if "matplotlib" not in _WARNED:
                log.warning("%s; OT plans are saved but not plotted", e)
                _WARNED.add("matplotlib")
            return saved
        logger.log_images(step, {f"ot_plan/{k}": p for k, p in pngs.items()})
    return saved


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, max_plan_files: int = 3) -> Path:
    """Plots and report.md for a run directory (written to out_dir, default run_dir/report)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    out = Path(out_dir) if out_dir else run_dir / "report"
    series = read_metrics(metrics_path)
    plots = plot_metrics(series, out)
    lines = [f"# Run report: {run_dir.name}", "", f"Run directory: `{run_dir}`", ""]
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        flat = _flat(yaml.safe_load(cfg_path.read_text()) or {})
        lines += ["## Configuration highlights", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {flat[k]} |" for k in _HIGHLIGHTS if k in flat and flat[k] not in ("", None)]
        lines.append("")
    lines += ["## Final metrics", "", "| metric | step | last value | min | max |", "|---|---|---|---|---|"]
    for key in sorted(series):
        pts = series[key]
        vals = [v for _, v in pts]
        lines.append(f"| {key} | {pts[-1][0]} | {pts[-1][1]:.5g} | {min(vals):.5g} | {max(vals):.5g} |")
    lines.append("")
    losses = [k for k in plots if k.startswith("train/")]
    lines += ["## Loss parts", ""] + [f"![{k}]({plots[k].name})" for k in losses] + [""]
    for name in ("optimizer", "throughput", "dev"):
        if name in plots:
            lines += [f"## {name.capitalize()}", "", f"![{name}]({plots[name].name})", ""]
    for path in sorted(run_dir.rglob("eval_results.json")):
        results = json.loads(path.read_text())
        lines += [f"## Evaluation: {path.parent.relative_to(run_dir) or '.'}", "",
                  f"Model `{results.get('model')}`", "", eval_table(results.get("datasets", {})), ""]
    if (run_dir / "results.json").is_file():
        summary = json.loads((run_dir / "results.json").read_text()).get("summary", {})
        lines += ["## Embedded pipeline results", "", results_table(summary), ""]
    plan_files = sorted((run_dir / "ot_plans").glob("step_*.pt"))[-max_plan_files:]
    if plan_files:
        lines += ["## Cross-CoT OT plans (first sample of a micro-batch)", ""]
        for f in plan_files:
            for name, png in plot_plans(f, out / "ot_plans").items():
                lines.append(f"![{f.stem} {name}](ot_plans/{png.name})")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
