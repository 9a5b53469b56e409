"""The pipeline stages behind the CLI: prepare-data, train-teacher, distill, evaluate.

Each stage resolves what it needs from the config, reusing the artefacts earlier stages
cached under `run.work_dir` (data, tokenizers, the trained embedded teacher).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align.config import Config
from cot2align.data.dataset import DataConfig, Sample, build_samples
from cot2align.data.jsonl import Example, read_jsonl
from cot2align.evaluate import evaluate_examples
from cot2align.logging import MetricsLogger, log
from cot2align.lora import ADAPTER_DIR, apply_lora, export_merged, require_peft, trainable_parameters
from cot2align.losses import LossContext, build_loss
from cot2align.models import build_tiny_model, hidden_size, load_model, load_tokenizer
from cot2align.train import ColocatedTeacher, TrainResult, train


@dataclass
class Paths:
    """Where each artefact of a config lives."""

    train: Path
    dev: Path
    test: Path
    teacher_tokenizer: Path
    student_tokenizer: Path
    teacher_model: Path


def paths(cfg: Config) -> Paths:
    """Resolve data, tokenizer and teacher locations (embedded defaults under run.work_dir)."""
    work = Path(cfg.run.work_dir)
    data_dir = work / f"data-{_embedded_digest(cfg)[:8]}"
    emb_tok = work / f"tokenizers-{_embedded_digest(cfg)[:8]}"
    teacher_dir = work / f"teacher-{_teacher_digest(cfg)}"
    return Paths(
        train=Path(cfg.data.train_file) if cfg.data.train_file else data_dir / "train.jsonl",
        dev=Path(cfg.data.dev_file) if cfg.data.dev_file else data_dir / "dev.jsonl",
        test=Path(cfg.data.test_file) if cfg.data.test_file else data_dir / "test.jsonl",
        teacher_tokenizer=Path(cfg.teacher.tokenizer or cfg.teacher.path or cfg.teacher.init or emb_tok / "teacher"),
        student_tokenizer=Path(cfg.student.tokenizer or cfg.student.path or emb_tok / "student"),
        teacher_model=Path(cfg.teacher.path) if cfg.teacher.path else teacher_dir,
    )


def _embedded_task(cfg: Config) -> dict[str, Any]:
    """The embedded settings that shape data, tokenizers and teacher (not the student model)."""
    return {k: v for k, v in cfg.embedded.to_dict().items() if k != "student_model"}


def _embedded_digest(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(_embedded_task(cfg), sort_keys=True).encode()).hexdigest()[:12]


def _teacher_digest(cfg: Config) -> str:
    import hashlib

    key = {"embedded": _embedded_task(cfg), "teacher_train": cfg.teacher_train.to_dict(),
           "data": cfg.data.to_dict(), "seed": cfg.run.seed}
    if cfg.teacher_train_lora.enabled:  # only when set: keeps the digests of existing cached teachers
        key["teacher_train_lora"] = cfg.teacher_train_lora.to_dict()
    if cfg.teacher.init:
        key["teacher_init"] = str(Path(cfg.teacher.init).resolve())
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_data(cfg: Config) -> Paths:
    """Write the embedded task's splits and train both tokenizers (skipped when cached)."""
    from cot2align.data.embedded import write_embedded_task
    from cot2align.data.tokenizer_training import tokenizer_corpus, train_tokenizer

    p = paths(cfg)
    if not cfg.data.train_file:
        write_embedded_task(cfg.embedded.task, p.train.parent)
    specs = {"teacher": (p.teacher_tokenizer, cfg.embedded.teacher_tokenizer,
                         not (cfg.teacher.path or cfg.teacher.init)),
             "student": (p.student_tokenizer, cfg.embedded.student_tokenizer, not cfg.student.path)}
    for role, (out, spec, embedded) in specs.items():
        if embedded and not (out / "tokenizer.json").is_file():
            rows, _ = read_jsonl(p.train, cfg.data.on_bad_row)
            corpus = tokenizer_corpus([{"instruction": e.instruction, "input": e.input, "output": e.output,
                                        "rationale": e.rationale} for e in rows])
            train_tokenizer(corpus, spec.kind, spec.vocab_size, out)
            log.info("trained the %s tokenizer (%s, %d) -> %s", role, spec.kind, spec.vocab_size, out)
    return p


def load_split(path: Path, cfg: DataConfig) -> list[Example]:
    examples, report = read_jsonl(path, cfg.on_bad_row)
    if report.total_skipped:
        log.warning("%s: skipped %d malformed rows: %s", path, report.total_skipped, dict(report.skipped))
    return examples


def _write_run_files(cfg: Config, run_dir: Path, stage: str) -> None:
    """Write the resolved config; warn when a run that will be resumed was made with another config."""
    from cot2align.checkpoint import latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if cfg.run.resume and path.is_file() and latest_checkpoint(run_dir) is not None:
        changed = _changed_keys(yaml.safe_load(path.read_text()) or {}, cfg.to_dict())
        if changed:
            log.warning("%s: resuming %s, whose checkpoint was made with a different config (%s); "
                        "use another run.name or run.resume=false to start over", stage, run_dir,
                        ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log.info("%s: run directory %s", stage, run_dir)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out


def _samples(cfg: Config, data_cfg: DataConfig, s_tok: PreTrainedTokenizerBase,
             t_tok: PreTrainedTokenizerBase, p: Paths) -> list[Sample]:
    samples, report = build_samples(load_split(p.train, data_cfg), s_tok, t_tok, data_cfg)
    log.info("tokenized %s", report.summary())
    return samples


def train_teacher(cfg: Config, force: bool = False) -> Path:
    """SFT of the teacher on std + CoT members (as separate samples); cached by config.

    The model is the embedded tiny teacher (fresh) or `teacher.init` (a checkpoint to fine-tune);
    every weight is trained, or only LoRA adapters (`teacher_train_lora.enabled`), which are merged
    into the weights of the saved checkpoint. Returns the checkpoint folder.
    """
    p = prepare_data(cfg)
    out = p.teacher_model
    if cfg.teacher.path:
        log.info("teacher.path is set (%s): nothing to train", out)
        return out
    if (out / "config.json").is_file() and not force:
        log.info("reusing the trained teacher %s", out)
        return out
    lora = cfg.teacher_train_lora
    if lora.enabled:
        require_peft()  # before anything heavy
    tok = load_tokenizer(p.teacher_tokenizer)
    model = (load_model(cfg.teacher.init) if cfg.teacher.init
             else build_tiny_model(cfg.embedded.teacher_model, tok, seed=cfg.run.seed))
    data_cfg = cfg.data.merged({"pairing": "separate"})
    samples = _samples(cfg, data_cfg, tok, tok, p)
    sft = build_loss(cfg.loss.merged({"name": "sft"}),
                     LossContext(hidden_size(model), hidden_size(model), len(tok), len(tok), True))
    if lora.enabled:
        model = apply_lora(model, lora)
        n_train, n_all = trainable_parameters(model)
        log.info("train-teacher: LoRA r=%d on %s: %d of %d parameters trainable", lora.r,
                 ",".join(lora.target_modules), n_train, n_all)
    run_dir = out.parent / (out.name + ".run")
    _write_run_files(cfg, run_dir, "train-teacher")
    logger = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), name=f"{cfg.run.name}-teacher",
                           job_type="train-teacher")
    try:
        res = train(run_dir=run_dir, student=model, student_tok=tok, loss_fn=sft, teacher=None, samples=samples,
                    pad_ids={"student": tok.pad_token_id, "teacher": tok.pad_token_id}, cfg=cfg.teacher_train,
                    projector_lr=cfg.loss.projector_lr, needs_aux=False, seed=cfg.run.seed, logger=logger,
                    log_cfg=cfg.logging, dev=load_split(p.dev, cfg.data), eval_cfg=cfg.eval, resume=cfg.run.resume)
    finally:
        logger.close()
    if lora.enabled:  # the loop's exports hold their adapters in adapter/
        export_merged(model, tok, out, adapter_dir=res.export_dir / ADAPTER_DIR)
    else:
        best = load_model(res.export_dir)
        best.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    log.info("teacher trained: best dev %s -> %s", res.best_dev, out)
    return out


def _student_model(cfg: Config, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The student to distil into: student.path or a fresh embedded model, wrapped with LoRA adapters
    when student_lora.enabled (then a peft model whose base weights are frozen)."""
    model = (load_model(cfg.student.path, cfg.student.dtype) if cfg.student.path
             else build_tiny_model(cfg.embedded.student_model, tok, seed=cfg.run.seed))
    if not cfg.student_lora.enabled:
        return model
    lora_model: PreTrainedModel = apply_lora(model, cfg.student_lora, "student_lora")
    n_train, n_all = trainable_parameters(lora_model)
    log.info("student: LoRA r=%d on %s: %d of %d parameters trainable", cfg.student_lora.r,
             ",".join(cfg.student_lora.target_modules), n_train, n_all)
    return lora_model


def distill(cfg: Config, run_dir: Path | None = None) -> TrainResult:
    """Distil the teacher into the student with `cfg.loss` (colocated: teacher in this process;
    served: a local world of teacher and student ranks, see `cot2align.runtime`)."""
    if cfg.runtime.mode == "served":
        from cot2align.runtime import launch_local

        if run_dir is not None:
            cfg = cfg.merged({"run": {"output_dir": str(run_dir.parent), "name": run_dir.name}})
        return launch_local(cfg)  # the first student's TrainResult
    p = prepare_data(cfg)
    if cfg.cot.enabled and cfg.data.use_cot:
        from cot2align.cot import generate_cot

        p = dataclasses.replace(p, train=generate_cot(cfg))
    run_dir = run_dir or cfg.run_dir
    if not (p.teacher_model / "config.json").is_file():
        if cfg.teacher.path:
            raise FileNotFoundError(f"teacher.path: {p.teacher_model} is not an HF checkpoint")
        train_teacher(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    student = _student_model(cfg, s_tok)
    teacher_model = load_model(p.teacher_model, cfg.teacher.dtype)
    same = s_tok.get_vocab() == t_tok.get_vocab()
    ctx = LossContext(hidden_size(student), hidden_size(teacher_model), len(s_tok), len(t_tok), same,
                      s_tok, t_tok, cache_dir=str(Path(cfg.run.work_dir) / "cache"))
    loss_fn = build_loss(cfg.loss, ctx)
    samples = _samples(cfg, cfg.data, s_tok, t_tok, p)
    needs_teacher = cfg.loss.name != "sft"
    needs_aux = cfg.loss.name == "cot2align" and cfg.loss.ot.cross_pairs
    _write_run_files(cfg, run_dir, "distill")
    logger = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), name=cfg.run.name)
    t0 = time.perf_counter()
    try:
        res = train(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn,
                    teacher=ColocatedTeacher(teacher_model) if needs_teacher else None, samples=samples,
                    pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}, cfg=cfg.train,
                    projector_lr=cfg.loss.projector_lr, needs_aux=needs_aux, seed=cfg.run.seed, logger=logger,
                    log_cfg=cfg.logging, dev=load_split(p.dev, cfg.data), eval_cfg=cfg.eval, resume=cfg.run.resume)
        logger.log(res.steps, {"wall_s": time.perf_counter() - t0}, prefix="distill/")
    finally:
        logger.close()
    return res


def evaluate_model(cfg: Config, model_dir: Path, split: str = "test") -> dict[str, Any]:
    """Evaluate an HF checkpoint folder on a split with `cfg.eval` (see `evaluate.score`).

    Adds exact_match_by_steps {steps: mean over seeds} when `eval.breakdown` is "steps".
    """
    p = prepare_data(cfg)
    examples = load_split({"dev": p.dev, "test": p.test}[split], cfg.data)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    res = evaluate_examples(model, tok, examples, cfg.eval)
    groups = res.get("by_steps") or {}
    res["exact_match_by_steps"] = {g: v["exact_match"] for g, v in groups.items() if "exact_match" in v}
    return res


def run_embedded(cfg: Config) -> dict[str, Any]:
    """The embedded pipeline: data -> teacher -> distill (cfg.loss) and an SFT baseline -> evaluate all three."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher_dir = train_teacher(cfg)
    if cfg.cot.enabled and cfg.data.use_cot:
        from cot2align.cot import generate_cot

        generate_cot(cfg)
    t_teacher = time.perf_counter() - t0
    runs = {cfg.loss.name: cfg}
    if cfg.loss.name != "sft":
        runs["sft"] = cfg.merged({"loss": {"name": "sft"}, "run": {"name": cfg.run.name + "-sft"}})
    results: dict[str, Any] = {"teacher": evaluate_model(cfg, teacher_dir)}
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


def results_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table: model, exact match and ROUGE-L (mean +- std over the seeds), exact match per steps."""
    from cot2align.evaluate import mean_std

    steps = sorted({s for v in summary.values() for s in (v.get("exact_match_by_steps") or {})})
    head = "| model | exact match | ROUGE-L | " + " | ".join(f"EM {s} steps" for s in steps) + " |"
    lines = [head, "|" + "---|" * (3 + len(steps))]
    for name, v in summary.items():
        cells = [name, mean_std(v, "exact_match"), mean_std(v, "rouge_l")]
        cells += [f"{(v.get('exact_match_by_steps') or {}).get(s, float('nan')):.1f}" for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = next((v.get("seeds") for v in summary.values() if v.get("seeds")), None)
    if seeds:
        lines.append(f"\nmean ± std over seeds {seeds}")
    return "\n".join(lines)
