"""Distillation in one process: the teacher runs in the student's process (`runtime.mode=colocated`).

The reference every other mode is tested against: the served world runs the same loop with the
same parts, only with the teacher on other ranks and DeepSpeed as optimizer.
"""

from __future__ import annotations

import time
from pathlib import Path

from cot2align.config import Config
from cot2align.models import DTYPES, hidden_size, load_model, load_tokenizer
from cot2align.recipes.build import callbacks, distill_loss, needs, open_logger, student_model
from cot2align.recipes.cache import (
    cache_key,
    cached_teacher,
    loss_layers,
    resolve_mode,
    run_formats,
    writing_teacher,
)
from cot2align.recipes.inputs import ensure_inputs
from cot2align.recipes.prepare import load_split, read_samples, write_run_files
from cot2align.student.teacher_io import load_teacher_io
from cot2align.teacher.colocated import ColocatedTeacher
from cot2align.train import TeacherSource, TrainJob, TrainResult, train


def distill_colocated(cfg: Config, run_dir: Path | None = None) -> TrainResult:
    """Distil the teacher into the student with `cfg.loss`, both in this process."""
    p = ensure_inputs(cfg)
    run_dir = run_dir or cfg.run_dir
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    student = student_model(cfg, s_tok)
    need = needs(cfg.loss)
    samples = read_samples(p.train, cfg.data, s_tok, t_tok)
    pad_ids = {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}
    teacher: TeacherSource | None = None
    if cfg.teacher.cache.mode == "off" or not need.teacher:
        teacher_model = load_model(p.teacher_model, cfg.teacher.dtype)
        loss_fn = distill_loss(cfg, student, hidden_size(teacher_model), s_tok, t_tok)
        teacher = ColocatedTeacher(teacher_model) if need.teacher else None
    else:
        io = load_teacher_io(p.teacher_model, DTYPES[cfg.teacher.dtype])  # head, embedding and sizes only
        loss_fn = distill_loss(cfg, student, io.hidden_size, s_tok, t_tok)
        key = cache_key(cfg, p, loss_layers(loss_fn, io.num_layers), run_formats(cfg), io.hidden_size)
        if resolve_mode(cfg, key) == "read":  # the teacher is never loaded
            teacher = cached_teacher(cfg, key, io, samples, 1, 0)
        else:
            live = ColocatedTeacher(load_model(p.teacher_model, cfg.teacher.dtype))
            teacher = writing_teacher(cfg, key, live, io, samples, pad_ids)
    job = TrainJob(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn, samples=samples,
                   pad_ids=pad_ids, cfg=cfg.train, seed=cfg.run.seed, teacher=teacher,
                   needs_aux=need.aux, projector_lr=cfg.loss.projector_lr, resume=cfg.run.resume)
    write_run_files(cfg, run_dir, "distill")
    logger = open_logger(cfg, run_dir, cfg.run.name)
    t0 = time.perf_counter()
    try:
        res = train(job, logger=logger, log_cfg=cfg.logging,
                    callbacks=callbacks(cfg.logging, cfg.eval, cfg.train, run_dir,
                                        load_split(p.dev, cfg.data)))
        logger.log(res.steps, {"wall_s": time.perf_counter() - t0}, prefix="distill/")
    finally:
        logger.close()
    return res
