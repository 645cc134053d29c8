"""`train-teacher` and `distill`: resolve the configuration and the runtime, build the task, fit."""
from __future__ import annotations

import time

from ..config import Config, teacher_weights_note
from ..data.dataset import load_split
from ..engine import fit, main_logger, split_loaders
from ..models import build_ensemble
from ..tasks import Distillation, Supervised
from ..teacher_cache import open_cache
from ..teachers import CachedTeacher, fill_cache, teacher_source
from ..runtime import close_process_group, resolve_runtime
from .common import config_from_options, resume_base, teacher_paths, weights_flags


def teacher_config(arch, *, weights=None, pretrained=False, **options) -> Config:
    """The configuration train-teacher resolves: the `base` preset by default, `arch`, no teachers."""
    flags = {"model.arch": arch, "model.teachers": (), "model.teacher_weights": (),
             **weights_flags(weights, pretrained)}
    return config_from_options("base", extra_flags=flags, **options)


def student_config(*, weights=None, pretrained=False, no_teacher=False, **options) -> Config:
    """The configuration distill resolves: the `erkt` preset by default; `no_teacher` drops the
    teachers."""
    flags = weights_flags(weights, pretrained)
    if no_teacher:
        flags.update({"model.teachers": (), "model.teacher_weights": ()})
    return config_from_options("erkt", extra_flags=flags, **options)


def train_teacher(split_dir, arch, out_dir, *, weights=None, pretrained=False, resume=False,
                  allow_changes=False, progress=True, config_path=None, **options) -> dict:
    """Fine-tune one teacher on a split with CutMix cross-entropy (the `base` preset by default).
    Its config.yaml names the architecture it trained and no teachers."""
    cfg = teacher_config(arch, weights=weights, pretrained=pretrained,
                         config_path=resume_base(resume, out_dir, config_path), **options)
    split = load_split(split_dir)
    rt = resolve_runtime(cfg.run)
    try:
        return fit(cfg, split, out_dir, Supervised(), rt, resume=resume, allow_changes=allow_changes,
                   progress=progress)
    finally:
        close_process_group()


def distill(split_dir, out_dir, *, teacher_dir=None, teachers=(), weights=None, pretrained=False,
            resume=False, allow_changes=False, progress=True, config_path=None, teacher_cache=None,
            no_teacher=False, **options) -> dict:
    """Distil the frozen teacher ensemble into the student (the VSM + CE + the KD loss
    `loss.kind`, DIST by default); with `teacher_cache`, the teachers' logits are read from it
    where it holds them, else written. `no_teacher`, loss.kind = none (R * CE) or loss.ratio = 2
    (the teacher's term has weight 0) train the student on its own, without running any
    teacher: the paper's Base."""
    cfg = student_config(weights=weights, pretrained=pretrained, no_teacher=no_teacher,
                         config_path=resume_base(resume, out_dir, config_path), **options)
    without_teacher = no_teacher or cfg.loss.kind == "none" or cfg.loss.ratio == 2.0
    if without_teacher:
        split = load_split(split_dir)
    else:
        split, paths, ensemble = _teachers(cfg, split_dir, teacher_dir, teachers)
    rt = resolve_runtime(cfg.run)
    try:
        if without_teacher:
            task = Supervised(kind="student", ce_weight=1.0 if no_teacher else cfg.loss.ratio)
        else:
            _note_weights(cfg, main_logger(rt))
            cache = None if teacher_cache is None else \
                open_cache(teacher_cache, cfg, split, paths, rt, cfg.optim.epochs, main_logger(rt))
            task = Distillation.from_config(teacher_source(ensemble, cache), cfg.loss)
        return fit(cfg, split, out_dir, task, rt, resume=resume, allow_changes=allow_changes,
                   progress=progress)
    finally:
        close_process_group()


def cache_teachers(split_dir, teacher_cache, *, teacher_dir=None, teachers=(), config_path=None,
                   **options) -> dict:
    """Fill the teacher logit cache for `optim.epochs` epochs without training a student."""
    cfg = config_from_options("erkt", config_path=config_path, **options)
    split, paths, ensemble = _teachers(cfg, split_dir, teacher_dir, teachers)
    rt = resolve_runtime(cfg.run)
    try:
        log = main_logger(rt)
        _note_weights(cfg, log)
        cache = open_cache(teacher_cache, cfg, split, paths, rt, cfg.optim.epochs, log)
        train, test = split_loaders(split, cfg, rt)
        start = time.time()
        filled = fill_cache(CachedTeacher(ensemble, cache), train, test, cfg.optim.epochs, rt, log)
        return {"cache": str(teacher_cache), "epochs": cfg.optim.epochs, "filled": filled,
                "seconds": round(time.time() - start, 2)}
    finally:
        close_process_group()


def _note_weights(cfg, log) -> None:
    """Say once per run how teacher weights that do not sum to 1 are used."""
    note = teacher_weights_note(cfg.model.teacher_weights)
    if note:
        log(note)


def _teachers(cfg, split_dir, teacher_dir, teachers):
    """The split, the teachers' checkpoints and the frozen ensemble built from them."""
    split = load_split(split_dir)
    m = cfg.model
    paths = teacher_paths(m.teachers, teacher_dir, teachers)
    return split, paths, build_ensemble(m.teachers, paths, m.teacher_weights, m.combine, split.classes)
