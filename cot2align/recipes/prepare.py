"""The artefacts every recipe reads: data splits, tokenizers, tokenized samples, run files.

Each is resolved from the config and cached under `run.work_dir` (the embedded task's data and
tokenizers, keyed by a digest of the settings that shape them), so stages and runs share them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedTokenizerBase

from cot2align.checkpoint import latest_checkpoint
from cot2align.config import Config
from cot2align.configbase import changed_keys
from cot2align.data.dataset import DataConfig, Sample, build_samples
from cot2align.data.embedded import write_embedded_task
from cot2align.data.jsonl import Example, read_jsonl
from cot2align.data.tokenizer_training import tokenizer_corpus, train_tokenizer
from cot2align.logging import log
from cot2align.lora import ADAPTER_DIR, apply_lora, export_merged, require_peft, trainable_parameters
from cot2align.losses import LossContext, build_loss
from cot2align.models import build_tiny_model, hidden_size, load_model, load_tokenizer
from cot2align.recipes.build import callbacks, open_logger
from cot2align.train import TrainJob, train


@dataclass
class Paths:
    """Where each artefact of a config lives."""

    train: Path
    dev: Path
    test: Path
    teacher_tokenizer: Path
    student_tokenizer: Path
    teacher_model: Path


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def _embedded_task(cfg: Config) -> dict[str, Any]:
    """The embedded settings that shape data, tokenizers and teacher (not the student model)."""
    return {k: v for k, v in cfg.embedded.to_dict().items() if k != "student_model"}


def _teacher_digest(cfg: Config) -> str:
    key = {"embedded": _embedded_task(cfg), "teacher_train": cfg.teacher_train.to_dict(),
           "data": cfg.data.to_dict(), "seed": cfg.run.seed}
    if cfg.teacher_train_lora.enabled:  # only when set: keeps the digests of existing cached teachers
        key["teacher_train_lora"] = cfg.teacher_train_lora.to_dict()
    if cfg.teacher.init:
        key["teacher_init"] = str(Path(cfg.teacher.init).resolve())
    return _digest(key)


def paths(cfg: Config) -> Paths:
    """Resolve data, tokenizer and teacher locations (embedded defaults under run.work_dir)."""
    work = Path(cfg.run.work_dir)
    embedded = _digest(_embedded_task(cfg))[:8]
    data_dir, emb_tok = work / f"data-{embedded}", work / f"tokenizers-{embedded}"
    return Paths(
        train=Path(cfg.data.train_file) if cfg.data.train_file else data_dir / "train.jsonl",
        dev=Path(cfg.data.dev_file) if cfg.data.dev_file else data_dir / "dev.jsonl",
        test=Path(cfg.data.test_file) if cfg.data.test_file else data_dir / "test.jsonl",
        teacher_tokenizer=Path(cfg.teacher.tokenizer or cfg.teacher.path or cfg.teacher.init or emb_tok / "teacher"),
        student_tokenizer=Path(cfg.student.tokenizer or cfg.student.path or emb_tok / "student"),
        teacher_model=Path(cfg.teacher.path) if cfg.teacher.path else work / f"teacher-{_teacher_digest(cfg)}",
    )


def prepare_data(cfg: Config) -> Paths:
    """Write the embedded task's splits and train both tokenizers (skipped when cached)."""
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
    """A JSONL split; malformed rows are skipped or refused per `data.on_bad_row`."""
    examples, report = read_jsonl(path, cfg.on_bad_row)
    if report.total_skipped:
        log.warning("%s: skipped %d malformed rows: %s", path, report.total_skipped, dict(report.skipped))
    return examples


def read_samples(train: Path, data_cfg: DataConfig, s_tok: PreTrainedTokenizerBase,
                 t_tok: PreTrainedTokenizerBase) -> list[Sample]:
    """The train split tokenized on both sides (student and teacher) into training samples."""
    samples, report = build_samples(load_split(train, data_cfg), s_tok, t_tok, data_cfg)
    log.info("tokenized %s", report.summary())
    return samples


def write_run_files(cfg: Config, run_dir: Path, stage: str) -> None:
    """Write the resolved config; warn when a run that will be resumed was made with another config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if cfg.run.resume and path.is_file() and latest_checkpoint(run_dir) is not None:
        changed = changed_keys(yaml.safe_load(path.read_text()) or {}, cfg.to_dict())
        if changed:
            log.warning("%s: resuming %s, whose checkpoint was made with a different config (%s); "
                        "use another run.name or run.resume=false to start over", stage, run_dir,
                        ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
    path.write_text(cfg.to_yaml())
    log.info("%s: run directory %s", stage, run_dir)


def train_teacher(cfg: Config, force: bool = False) -> Path:
    """The teacher checkpoint distillation reads: `teacher.path` as is, else SFT of the embedded tiny
    teacher (fresh) or of `teacher.init` on the std + CoT members (as separate samples), cached by
    config. Every weight is trained, or only LoRA adapters (`teacher_train_lora.enabled`), merged
    into the saved checkpoint. Returns the checkpoint folder."""
    p = prepare_data(cfg)
    out = p.teacher_model
    if cfg.teacher.path:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"teacher.path: {out} is not an HF checkpoint (no config.json)")
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
    samples = read_samples(p.train, cfg.data.merged({"pairing": "separate"}), tok, tok)
    sft = build_loss(cfg.loss.merged({"name": "sft"}),
                     LossContext(hidden_size(model), hidden_size(model), len(tok), len(tok), True))
    if lora.enabled:
        model = apply_lora(model, lora)
        n_train, n_all = trainable_parameters(model)
        log.info("train-teacher: LoRA r=%d on %s: %d of %d parameters trainable", lora.r,
                 ",".join(lora.target_modules), n_train, n_all)
    run_dir = out.parent / (out.name + ".run")
    write_run_files(cfg, run_dir, "train-teacher")
    job = TrainJob(run_dir=run_dir, student=model, student_tok=tok, loss_fn=sft, samples=samples,
                   pad_ids={"student": tok.pad_token_id, "teacher": tok.pad_token_id}, cfg=cfg.teacher_train,
                   seed=cfg.run.seed, projector_lr=cfg.loss.projector_lr, resume=cfg.run.resume)
    logger = open_logger(cfg, run_dir, f"{cfg.run.name}-teacher", job_type="train-teacher")
    try:
        res = train(job, logger=logger, log_cfg=cfg.logging,
                    callbacks=callbacks(cfg.logging, cfg.eval, cfg.teacher_train, run_dir,
                                        load_split(p.dev, cfg.data)))
    finally:
        logger.close()
    if lora.enabled:  # the loop's exports hold their adapters in adapter/
        export_merged(model, tok, out, adapter_dir=res.export_dir / ADAPTER_DIR)
    else:
        load_model(res.export_dir).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    log.info("teacher trained: best dev %s -> %s", res.best_dev, out)
    return out
