"""`train-teacher` and `distill`: resolve the configuration and the runtime, build the task, fit."""
from __future__ import annotations

from ..data.dataset import load_split
from ..engine import Distillation, Supervised, fit
from ..models import build_ensemble
from ..runtime import close_process_group, resolve_runtime
from .common import config_from_options, resume_base, teacher_paths, weights_flags


def train_teacher(split_dir, arch, out_dir, *, weights=None, pretrained=False, resume=False,
                  allow_changes=False, progress=True, config_path=None, **options) -> dict:
    """Fine-tune one teacher on a split with CutMix cross-entropy (the `base` preset by default).
    Its config.yaml names the architecture it trained and no teachers."""
    flags = {"model.arch": arch, "model.teachers": (), "model.teacher_weights": (),
             **weights_flags(weights, pretrained)}
    cfg = config_from_options("base", config_path=resume_base(resume, out_dir, config_path),
                              extra_flags=flags, **options)
    split = load_split(split_dir)
    rt = resolve_runtime(cfg.run)
    try:
        return fit(cfg, split, out_dir, Supervised(), rt, resume=resume, allow_changes=allow_changes,
                   progress=progress)
    finally:
        close_process_group()


def distill(split_dir, out_dir, *, teacher_dir=None, teachers=(), weights=None, pretrained=False,
            resume=False, allow_changes=False, progress=True, config_path=None, **options) -> dict:
    """Distil the frozen teacher ensemble into the student (the VSM + CE + DIST)."""
    cfg = config_from_options("erkt", config_path=resume_base(resume, out_dir, config_path),
                              extra_flags=weights_flags(weights, pretrained), **options)
    split = load_split(split_dir)
    m = cfg.model
    paths = teacher_paths(m.teachers, teacher_dir, teachers)
    ensemble = build_ensemble(m.teachers, paths, m.teacher_weights, m.combine, split.classes)
    rt = resolve_runtime(cfg.run)
    try:
        return fit(cfg, split, out_dir, Distillation.from_config(ensemble, cfg.loss), rt,
                   resume=resume, allow_changes=allow_changes, progress=progress)
    finally:
        close_process_group()
