"""Quality sweep: the methods and ablations of docs/results.md on the embedded reasoning task, 3 seeds.

    python bench/quality.py --seeds 1 2 3            # the sweep (configs/experiments/quality.yaml)
    python bench/quality.py --rows sft "cot2align (dskd)" --seeds 1   # a subset
    python bench/quality.py --quick                  # a smoke run: a few steps per row, one seed
    python bench/quality.py --config configs/experiments/quality-long.yaml --rows ... --seeds 1   # 2x budget

Stage 1 (once, cached under run.work_dir): the data, the teacher SFT, the teacher-written
rationales and the teacher-state caches (cache-teacher), with the config's run.seed. Stage 2: for
every row and seed, the same student is trained with the row's loss and data settings from the
cache (no teacher forward), with the same budget for every row: dev exact match every
train.eval_every steps, early stopping after train.patience evaluations without a better one,
the best dev checkpoint kept. It is then evaluated on the test split as in the paper, with the
STANDARD prompt (no rationale at test time): exact match of the final answer (sampled, mean over
the eval seeds, and one greedy pass), broken down by the number of reasoning steps (the 4-step
problems are held out of training); the CoT prompt's greedy score is a second column. The seed of
a row changes only the student's initialisation and data order: the teacher, its rationales and
the data stay fixed. Nothing is tuned on test.

Each finished (row, seed) is appended to `<out>.jsonl`, so an interrupted sweep resumes where
it stopped; the table (mean +- std over seeds) goes to `<out>.json` and, with --doc, to a
markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import scipy.stats
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROWS: dict[str, dict[str, Any]] = {
    "sft": {"loss": {"name": "sft"}, "data": {"use_cot": False}},
    "dskd": {"loss": {"name": "dskd"}, "data": {"use_cot": False}},
    "dskd + CoT (= cot2align w/o OT)": {"loss": {"name": "dskd"}, "data": {"use_cot": True}},
    "cot2align (dskd)": {"loss": {"name": "cot2align", "base": "dskd"}},
    "cot2align w/o cross pairs": {"loss": {"name": "cot2align", "base": "dskd", "ot": {"cross_pairs": False}}},
    "cot2align, published eps 10": {"loss": {"name": "cot2align", "base": "dskd",
                                             "ot": {"cost_scale": "none", "sinkhorn": {"epsilon": 10.0}}}},
    "uld": {"loss": {"name": "uld"}, "data": {"use_cot": False}},
    "mined": {"loss": {"name": "mined"}, "data": {"use_cot": False}},
    "multilevel_ot": {"loss": {"name": "multilevel_ot"}, "data": {"use_cot": False}},
}
"""Row name -> config overrides (merged over the sweep's config, whose OT cost is divided by each
problem's spread and solved at epsilon 0.1, which gives a real alignment: with the published raw
cost at epsilon 10 the plan is the product of the marginals, docs/benchmarks.md; the published
setting has its own row). Every row trains on the same records (data.pairing=reference): a CoT
row adds the paired CoT record to each standard one. CoT2Align without OT is DSKD on the CoT data:
one row serves both names."""

ONE_SEED: frozenset[str] = frozenset({"uld", "mined", "multilevel_ot"})
"""Baselines of the other papers: the sweep's first seed only (the budget)."""


def prepare(cfg: Any, teacher_cache: bool = True) -> dict[str, Any]:
    """Stage 1: data, teacher, rationales and (teacher_cache) the teacher-state caches, written once
    by cache-teacher in fp32 (the final and OT layers, both formats: every row's subset; one cache
    per data.use_cot, see `cache_dir`) so that no run of the sweep runs the teacher. Returns config
    overrides that pin every run to them."""
    from cot2align.recipes.cache import cache_teacher
    from cot2align.recipes.cot import generate_cot
    from cot2align.recipes.prepare import paths, prepare_data, train_teacher

    prepare_data(cfg)
    teacher = train_teacher(cfg)
    cot_file = generate_cot(cfg) if cfg.cot.enabled else paths(cfg).train
    p = paths(cfg)
    pinned: dict[str, Any] = {
        "data": {"train_file": str(cot_file), "dev_file": str(p.dev), "test_file": str(p.test)},
        "teacher": {"path": str(teacher), "tokenizer": str(p.teacher_tokenizer)},
        "student": {"tokenizer": str(p.student_tokenizer)},
        "cot": {"enabled": False},  # the rationales are in the train file already
    }
    if teacher_cache:
        for use_cot in (True, False):
            c = cfg.merged(pinned).merged({"data": {"use_cot": use_cot}})
            cache_teacher(c.merged({"teacher": {"cache": {"mode": "write", "dtype": "float32",
                                                          "dir": cache_dir(c)}}}))
        pinned["teacher"]["cache"] = {"mode": "read", "dtype": "float32"}
    return pinned


def cache_dir(cfg: Any) -> str:
    """The sweep's teacher-state cache of a run: one per data.use_cot (it changes the samples)."""
    return str(Path(cfg.run.work_dir) / "teacher-cache-sweep" / ("cot" if cfg.data.use_cot else "std"))


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one evaluation kept in the sweep's records."""
    by_steps = {str(k): float(v) for k, v in (res.get("exact_match_by_steps") or {}).items()}
    longest = max(by_steps, key=int) if by_steps else None
    return {"exact_match": float(res.get("exact_match", float("nan"))),
            "rouge_l": float(res.get("rouge_l", float("nan"))),
            "held_out_em": by_steps[longest] if longest is not None else float("nan"),
            "by_steps": by_steps}


def plan_entropy(run_dir: Path, last_steps: int = 50) -> dict[str, float]:
    """Mean OT plan entropy / log(nm) (1 = the product plan) of each Cross-CoT pair and layer pair
    over the run's last `last_steps` steps, from its metrics.jsonl (train/ot/entropy/<name>, logged
    every logging.log_every steps); {} for a run without OT."""
    path = run_dir / "metrics.jsonl"
    rows = [r for r in map(json.loads, path.read_text().splitlines() if path.exists() else []) if "train/loss" in r]
    if not rows:
        return {}
    end = max(int(r["step"]) for r in rows)
    tail = [r for r in rows if int(r["step"]) > end - last_steps]
    keys = sorted({k for r in tail for k in r if "/entropy/" in k})
    return {k.split("/entropy/", 1)[1]: statistics.mean(r[k] for r in tail if k in r) for k in keys}


def dev_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, dev exact match) of every dev evaluation of a run (its metrics.jsonl)."""
    out = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if "dev/exact_match" in rec:
            out.append((int(rec["step"]), float(rec["dev/exact_match"])))
    return out


def term_grad_norms(cfg: Any, model_dir: Path | None, steps: int = 8) -> dict[str, float]:
    """What each term of L = (1 - lambda) CE + lambda (KD + w OT) adds to the step: the norm of each
    weighted term's gradient w.r.t. the student's weights over a global batch (every replica's
    micro-batches, as the data-parallel step sums them), mean over the run's first `steps` global
    batches. At the exported student `model_dir` (with its loss modules: projectors) or, None, at
    the run's initial student. Also the mean cosine of each distillation term's gradient with the
    CE gradient ("cos/kd", "cos/ot"). The teacher runs in this process (the sweep's teacher is
    small). Losses built by `Distiller` only (not multilevel_ot)."""
    import torch
    import torch.nn.functional as F

    from cot2align.data.dataset import collate
    from cot2align.data.sampler import GlobalBatchSampler
    from cot2align.models import hidden_size, load_model, load_tokenizer, num_layers
    from cot2align.recipes.build import distill_loss, needs, student_model
    from cot2align.recipes.inputs import input_paths
    from cot2align.recipes.prepare import read_samples
    from cot2align.teacher.colocated import ColocatedTeacher
    from cot2align.train import loss_inputs, plan_step, response_tokens

    p = input_paths(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = read_samples(p.train, cfg.data, s_tok, t_tok)
    torch.manual_seed(cfg.run.seed)
    student = load_model(model_dir) if model_dir else student_model(cfg, s_tok)
    teacher = ColocatedTeacher(load_model(p.teacher_model, cfg.teacher.dtype))
    loss_fn = distill_loss(cfg, student, hidden_size(teacher.model), s_tok, t_tok)
    if model_dir:
        loss_fn.load_state_dict(torch.load(model_dir / "loss_modules.pt", weights_only=True))
    final = num_layers(student)
    want = needs(cfg.loss)
    plan = plan_step(loss_fn, final, teacher.final_layer, want.teacher, want.aux)
    dp = cfg.student.parallel.dp  # the step's global batch: every replica's micro-batches
    sampler = GlobalBatchSampler(len(samples), cfg.train.micro_batch_size, cfg.train.grad_accum, dp, cfg.run.seed)
    params = [q for q in student.parameters() if q.requires_grad]
    pad = {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}
    out: dict[str, float] = {}
    for step in range(steps):
        micro = [m for r in range(dp) for m in sampler.micro_batches(step, r)]
        tokens, examples = float(sum(response_tokens(samples, m) for m in micro)), float(sum(map(len, micro)))
        grads: dict[str, torch.Tensor] = {}
        for idx in micro:
            inputs = loss_inputs(student, final, collate([samples[i] for i in idx], pad, plan.fmts), teacher, plan,
                                 tokens, examples)
            terms, _ = loss_fn.terms(inputs)
            for name, value in terms.items():
                g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                flat = torch.cat([(x if x is not None else torch.zeros_like(q)).flatten() for x, q in zip(g, params)])
                grads[name] = grads[name] + flat if name in grads else flat
        for name, g in grads.items():
            out[name] = out.get(name, 0.0) + float(g.norm()) / steps
            if name != "ce":
                cos = float(F.cosine_similarity(g, grads["ce"], dim=0))
                out[f"cos/{name}"] = out.get(f"cos/{name}", 0.0) + cos / steps
    return out


def teacher_scores(cfg: Any, teacher_dir: Path, memo: Path) -> dict[str, Any]:
    """The teacher's test scores (CoT prompt, as it was trained: sampled and greedy; and greedy with the
    standard prompt), remembered in `memo` by the digest of its checkpoint (a resumed sweep skips them)."""
    from cot2align.recipes.pipeline import evaluate_model
    from cot2align.teacher.cache import file_digest

    digest = file_digest([teacher_dir])
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if known.get("digest") == digest:
        return dict(known["scores"])
    as_teacher = cfg.merged({"eval": {"prompt": "cot"}})  # the teacher was trained to reason first
    scores = {**summarise(evaluate_model(as_teacher, teacher_dir)), "greedy_em": greedy_em(as_teacher, teacher_dir),
              "std_greedy_em": greedy_em(cfg, teacher_dir, "std")}
    memo.write_text(json.dumps({"teacher": str(teacher_dir), "digest": digest, "scores": scores}, indent=2))
    return scores


def wanted(row: str, seed: int, first_seed: int) -> bool:
    """Whether the sweep runs (row, seed): ONE_SEED rows run the first seed only."""
    return row not in ONE_SEED or seed == first_seed


def _num(x: float, digits: int) -> str:
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def _mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _num(values[0], digits)
    return f"{_num(statistics.mean(values), digits)} ± {statistics.stdev(values):.{digits}f}"


COLUMNS: dict[str, str] = {
    "exact_match": "test EM (std prompt)", "greedy_em": "greedy", "cot_em": "CoT prompt (greedy)",
    "held_out_em": "4-step (held out)", "dev_em": "best dev EM", "steps": "steps"}


def table(records: list[dict[str, Any]], teacher: dict[str, float] | None) -> str:
    """Markdown: one line per row, mean +- std over its seeds (the teacher answers with the CoT prompt)."""
    lines = ["| method | seeds | " + " | ".join(COLUMNS.values()) + " | early stops | minutes / run |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    if teacher:
        lines.append(f"| teacher (CoT prompt) | - | {teacher['exact_match']:.1f} | {teacher['greedy_em']:.1f} | "
                     f"{teacher['greedy_em']:.1f} | {teacher['held_out_em']:.1f} | - | - | - | - |")
        if "std_greedy_em" in teacher:
            lines.append(f"| teacher (std prompt) | - | - | {teacher['std_greedy_em']:.1f} | - | - | - | - | - | - |")
    for row, rs in _rows_of(records):
        cells = [_mean_std([float(r[k]) for r in rs], 0 if k == "steps" else 1) for k in COLUMNS]
        early = sum(bool(r.get("early_stopped")) for r in rs)
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) +
                     f" | {early}/{len(rs)} | {statistics.median(r['wall_s'] for r in rs) / 60:.1f} |")
    return "\n".join(lines)


def _rows_of(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(row, its records) in ROWS order, rows without records left out."""
    return [(row, rs) for row in ROWS if (rs := [r for r in records if r["row"] == row])]


def _grid(title: str, columns: list[str], lines: list[list[str]]) -> str:
    return "\n".join([f"**{title}**", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|",
                      *("| " + " | ".join(x) + " |" for x in lines)])


def seeds_table(records: list[dict[str, Any]]) -> str:
    """Every run's test EM: std prompt sampled / greedy, CoT prompt greedy; * = stopped early."""
    seeds = sorted({int(r["seed"]) for r in records})
    by = {(r["row"], int(r["seed"])): r for r in records}

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return (f"{r['exact_match']:.1f} / {r['greedy_em']:.1f} / {r['cot_em']:.1f}"
                + (" *" if r.get("early_stopped") else ""))

    return _grid("Per seed: test EM, std prompt sampled / greedy, CoT prompt greedy (* = stopped early)",
                 ["method", *(f"seed {k}" for k in seeds)],
                 [[row, *(cell(by.get((row, k))) for k in seeds)] for row, _ in _rows_of(records)])


def by_steps_table(records: list[dict[str, Any]]) -> str:
    """Test EM (std prompt, sampled) by the number of reasoning steps of the problem, mean +- std over seeds."""
    counts = sorted({k for r in records for k in r.get("by_steps", {})}, key=int)
    return _grid("Test exact match by reasoning steps (std prompt, sampled; the longest are held out of training)",
                 ["method", "seeds", *(f"{k} steps" for k in counts)],
                 [[row, str(len(rs)), *(_mean_std([r["by_steps"][k] for r in rs if k in r.get("by_steps", {})])
                                        for k in counts)] for row, rs in _rows_of(records)])


def entropy_table(records: list[dict[str, Any]]) -> str:
    """Plan entropy / log(nm) per Cross-CoT pair and layer pair at the end of training, mean over seeds."""
    rows = [(row, rs) for row, rs in _rows_of(records) if any(r.get("entropy") for r in rs)]
    keys = sorted({k for _, rs in rows for r in rs for k in r.get("entropy", {})})
    return _grid("OT plan entropy / log(nm) over the last 50 steps (1 = the product of the marginals: no alignment)",
                 ["method", "seeds", *keys],
                 [[row, str(len(rs)), *(_mean_std([r["entropy"][k] for r in rs if k in r.get("entropy", {})], 3)
                                        for k in keys)] for row, rs in rows])


def curves_table(records: list[dict[str, Any]]) -> str:
    """Dev EM (greedy, std prompt) at every evaluation, mean over the seeds still training at that step."""
    steps = sorted({int(s) for r in records for s, _ in r.get("dev_curve", [])})
    lines = []
    for row, rs in _rows_of(records):
        at = [{int(s): float(v) for s, v in r.get("dev_curve", [])} for r in rs]
        lines.append([row, str(len(rs)), *(f"{statistics.mean(c[s] for c in at if s in c):.1f}"
                                           if any(s in c for c in at) else "-" for s in steps)])
    return _grid("Learning curves: dev exact match (greedy, std prompt), mean over the seeds still training at "
                 "that step ('-': every seed had stopped early)", ["method", "seeds", *map(str, steps)], lines)


REFERENCE_ROW = "cot2align (dskd)"


def paired_table(records: list[dict[str, Any]], reference: str = REFERENCE_ROW) -> str:
    """`reference` minus every other row, seed by seed (a seed fixes the initialisation and the data
    order of both): the differences of test EM (std prompt, sampled), their mean +- std, and a paired
    t-test (two-sided p), sampled and greedy. Rows sharing fewer than 2 seeds with it are left out
    ("": none left)."""
    by = {(r["row"], int(r["seed"])): r for r in records}
    lines = []
    for row, rs in _rows_of(records):
        seeds = sorted(int(r["seed"]) for r in rs if (reference, int(r["seed"])) in by)
        if row == reference or len(seeds) < 2:
            continue
        cells = [row, str(len(seeds))]
        for key in ("exact_match", "greedy_em"):
            diffs = [float(by[(reference, k)][key]) - float(by[(row, k)][key]) for k in seeds]
            if key == "exact_match":
                cells.append(", ".join(f"{d:+.1f}" for d in diffs))
            cells += [_mean_std(diffs), *_paired_t(diffs)]
        lines.append(cells)
    if not lines:
        return ""
    return _grid(f"Paired by seed: {reference} minus each row, test EM (std prompt); t and two-sided p of a paired "
                 "t-test", ["method", "seeds", "differences (sampled)", "mean ± std", "t", "p", "greedy: mean ± std",
                            "t", "p"], lines)


def _paired_t(diffs: list[float]) -> list[str]:
    """[t, two-sided p] of the paired t-test of `diffs` against 0, formatted."""
    sd = statistics.stdev(diffs)
    if sd == 0:
        return ["-", "-"]
    t = statistics.mean(diffs) / (sd / len(diffs) ** 0.5)
    return [f"{t:.1f}", f"{2 * scipy.stats.t.sf(abs(t), len(diffs) - 1):.3f}"]


def grads_table(grads: dict[str, dict[str, dict[str, float]]]) -> str:
    """`term_grad_norms` of each row's lowest seed, at the initial and at the best student."""
    cols = ["ce", "kd", "ot", "cos/kd", "cos/ot"]
    lines = [[row, when, *(f"{g[c]:.3g}" if c in g else "-" for c in cols)]
             for row in ROWS if row in grads for when, g in grads[row].items()]
    return _grid("Gradient norm of each weighted loss term ((1 - lambda) CE, lambda KD, lambda w OT) w.r.t. the "
                 "student's weights, mean over the first 8 global batches; cos = cosine with the CE gradient",
                 ["method (lowest seed)", "student", "CE", "KD", "OT", "cos(KD, CE)", "cos(OT, CE)"], lines)


def report(records: list[dict[str, Any]], teacher: dict[str, float] | None,
           grads: dict[str, dict[str, dict[str, float]]]) -> str:
    """The sweep's markdown: the table and the evidence sections (docs/results.md quotes them)."""
    sections = [table(records, teacher), seeds_table(records), paired_table(records), by_steps_table(records),
                entropy_table(records), curves_table(records), grads_table(grads) if grads else ""]
    return "\n\n".join(s for s in sections if s)


def _doc_block(path: Path, name: str) -> tuple[str, re.Match[str] | None]:
    """The page's text and its `<!-- tables NAME ... -->` ... `<!-- /tables -->` block (None: the page
    has no markers at all, so the report is the whole file). A page with other sweeps' markers only
    is an error (ValueError naming the file and the line it lacks): overwriting it would lose it."""
    text = path.read_text() if path.is_file() else ""
    block = re.search(rf"(<!-- tables {re.escape(name)}[:\s][^\n]*-->\n).*?(\n<!-- /tables -->)", text, re.S)
    if block is None and "<!-- tables" in text:
        raise ValueError(f"{path}: has no '<!-- tables {name} -->' ... '<!-- /tables -->' block for the tables of "
                         f"this sweep (--out name {name!r}); add one, or pass another --doc")
    return text, block


def write_doc(path: Path, md: str, name: str) -> None:
    """Write the report `md` to `path`: between its table markers for the sweep `name` (the --out
    name) when it has them, so the hand-written text around them stays; else the whole file."""
    text, block = _doc_block(path, name)
    path.write_text(text[:block.end(1)] + md + text[block.start(2):] if block else md + "\n")


def run_name(base: Any, row: str, seed: int) -> str:
    """run.name of one (row, seed) run: `<row>-seed<k>` (its folder: `<output_dir>/<sweep name>/<run.name>`)."""
    return f"{re.sub(r'[^A-Za-z0-9.]+', '_', row).strip('_')}-seed{seed}"


def run_config(base: Any, pinned: dict[str, Any], row: str, seed: int) -> Any:
    """The validated config of one (row, seed) run."""
    from cot2align.recipes.served import without_teacher_ranks

    cfg = base.merged(pinned).merged(ROWS[row]).merged({"run": {
        "seed": seed, "name": run_name(base, row, seed), "output_dir": str(Path(base.run.output_dir) / base.run.name)}})
    if cfg.teacher.cache.mode == "read":  # as the run records it (its saved config.yaml)
        cfg = without_teacher_ranks(cfg.merged({"teacher": {"cache": {"dir": cache_dir(cfg)}}}))
    cfg.validate()
    return cfg


def clear_stale_run(cfg: Any) -> bool:
    """Delete the run directory of (row, seed) when its checkpoint was made with another config (an
    earlier version of the sweep): resuming it would mix two settings. Returns whether it did."""
    from cot2align.configbase import changed_keys

    saved = Path(cfg.run_dir) / "config.yaml"
    if not saved.is_file() or not changed_keys(yaml.safe_load(saved.read_text()) or {}, cfg.to_dict()):
        return False
    shutil.rmtree(cfg.run_dir)
    return True


def greedy_em(cfg: Any, model_dir: Path, prompt: str | None = None) -> float:
    """Test exact match of one greedy pass (the low-variance companion of the sampled EM), with
    `prompt` (std | cot) or the config's eval.prompt."""
    from cot2align.recipes.pipeline import evaluate_model

    ev: dict[str, Any] = {"decoding": "greedy", **({"prompt": prompt} if prompt else {})}
    return float(evaluate_model(cfg.merged({"eval": ev}), model_dir)["exact_match"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "experiments" / "quality.yaml"))
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="row names (default: all)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default="", help="results path without suffix (default: bench/results/<run.name>)")
    ap.add_argument("--doc", default="", help="also write the tables to this markdown file (between its "
                    "'<!-- tables OUT-NAME -->' and '<!-- /tables -->' lines when it has them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps per row, one seed")
    ap.add_argument("--no-teacher-cache", action="store_true",
                    help="run the teacher in every run instead of reading the teacher-state cache")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {list(ROWS)}")

    from cot2align.config import load_config
    from cot2align.logging import setup_console_logging
    from cot2align.recipes.pipeline import distill, evaluate_model

    setup_console_logging()
    overrides = list(args.overrides)
    seeds = args.seeds
    if args.quick:
        overrides += ["train.max_steps=3", "eval.dev_limit=4", "eval.seeds=[10]",
                      "run.name=quality-quick"]
        seeds = seeds[:1]
    base = load_config(args.config, overrides)
    out = Path(args.out + ("-quick" if args.quick else "") if args.out else REPO / "bench" / "results" / base.run.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.doc:
        try:
            _doc_block(Path(args.doc), out.name)
        except ValueError as e:
            ap.error(str(e))
    log_path = out.with_suffix(".jsonl")
    records = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
    stale = [r for r in records if not r.get("entropy") and ROWS.get(r["row"], {}).get("loss", {}).get("name")
             == "cot2align"]  # written before plan_entropy read the run's metrics: fill in from the run
    for rec in stale:
        rec["entropy"] = plan_entropy(Path(base.run.output_dir) / base.run.name / run_name(base, rec["row"], rec["seed"]))
    if stale:
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    t0 = time.perf_counter()
    pinned = prepare(base, teacher_cache=not args.no_teacher_cache)
    teacher = teacher_scores(base, Path(pinned["teacher"]["path"]), out.parent / f"{out.name}-teacher.json")
    done = {(r["row"], r["seed"]) for r in records}
    prep_s = time.perf_counter() - t0
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"

    grads_path = out.parent / f"{out.name}-grads.json"
    grads = json.loads(grads_path.read_text()) if grads_path.exists() else {}

    def write_summary() -> str:
        """The table so far (also after every run: an interrupted sweep keeps its table)."""
        md = table(records, teacher)
        summary = {"rows": [r for r in ROWS if any(x["row"] == r for x in records)], "records": records,
                   "teacher": teacher, "prepare_s": prep_s, "wall_s": time.perf_counter() - t0,
                   "machine": machine, "config": args.config, "overrides": overrides, "table": md}
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        if args.doc:
            write_doc(Path(args.doc), report(records, teacher, grads), out.name)
        return md

    for seed in seeds:  # seed-major: a partial sweep covers every row
        for row in args.rows:
            if (row, seed) in done or not wanted(row, seed, seeds[0]):
                continue
            cfg = run_config(base, pinned, row, seed)
            if clear_stale_run(cfg):
                print(f"{row} seed {seed}: {cfg.run_dir} was made with another config: starting over", flush=True)
            t = time.perf_counter()
            res = distill(cfg)
            train_s = time.perf_counter() - t
            rec = {"row": row, "seed": seed, **summarise(evaluate_model(cfg, res.export_dir)),
                   "greedy_em": greedy_em(cfg, res.export_dir), "cot_em": greedy_em(cfg, res.export_dir, "cot"),
                   "dev_em": float("nan") if res.best_dev is None else res.best_dev, "steps": res.steps,
                   "early_stopped": res.early_stopped, "entropy": plan_entropy(cfg.run_dir),
                   "dev_curve": dev_curve(cfg.run_dir), "train_s": train_s, "wall_s": time.perf_counter() - t}
            records.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            write_summary()
            print(f"{row} seed {seed}: EM {rec['exact_match']:.1f} greedy {rec['greedy_em']:.1f} "
                  f"CoT prompt {rec['cot_em']:.1f} after {res.steps} steps ({rec['wall_s']:.0f} s)", flush=True)
    for row in args.rows:  # evidence of what each term adds: the lowest seed of every row that has a run
        ran = [int(r["seed"]) for r in records if r["row"] == row]
        if row in grads or ROWS[row]["loss"]["name"] == "multilevel_ot" or not ran:
            continue
        cfg = run_config(base, pinned, row, min(ran))
        if not (cfg.run_dir / "best").is_dir():
            continue
        grads[row] = {"initial": term_grad_norms(cfg, None), "best": term_grad_norms(cfg, cfg.run_dir / "best")}
        grads_path.write_text(json.dumps(grads, indent=2))
    print(write_summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
