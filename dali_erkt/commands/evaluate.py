"""`evaluate`: a trained run, or the teacher ensemble, on a split.

A checkpoint is evaluated with the settings it was trained with (its stored configuration:
image size, normalisation, architecture, classes); an option that overrides one is named in one
line. Reports are named after what was evaluated and never replace an existing one without
--force.
"""
from __future__ import annotations

from pathlib import Path

from ..config import save_config, teacher_weights_note, to_dict
from ..data.dataset import load_split
from ..data.loader import DaliLoader
from ..errors import ConfigError, TrainingError
from ..evaluation import predict, scores, write_report
from ..models import build_ensemble, load_trained, place
from ..run_state import stored_config
from ..runtime import resolve_runtime
from .common import config_from_options, teacher_paths

_SHOWN = ("data.image_size", "data.mean", "data.std")


def evaluate(split_dir, out_dir, *, checkpoint=None, teacher_dir=None, teachers=(), part="test",
             force=False, note=print, **options) -> dict:
    split = load_split(split_dir)
    if checkpoint and (teachers or teacher_dir):
        raise ConfigError("give either --checkpoint or the ensemble's teachers, not both")
    if checkpoint:
        model, state = load_trained(checkpoint, split.classes)
        stored = to_dict(state.stored_config())
        name = f"{state.kind}-{state.arch}-{Path(checkpoint).stem}"
    else:
        cfg = config_from_options("erkt", **options)
        paths = teacher_paths(cfg.model.teachers, teacher_dir, teachers)
        stored = to_dict(stored_config(paths[0]))
        model = None
        name = "ensemble-" + "+".join(cfg.model.teachers)
    # The run's data settings (size, normalisation) are the base; where it runs is chosen now.
    cfg = config_from_options("erkt", base={"data": stored["data"]}, **options)
    for key in _SHOWN:  # what the user changed against the run's own settings
        section, field = key.split(".")
        was, now = stored[section][field], to_dict(cfg)[section][field]
        if was != now:
            note(f"note: evaluating with {key} = {now}; the run was trained with {was}")
    if model is None:
        m = cfg.model
        model = build_ensemble(m.teachers, paths, m.teacher_weights, m.combine, split.classes)
        if teacher_weights_note(m.teacher_weights):
            note(f"note: {teacher_weights_note(m.teacher_weights)}")
    if part != "test":
        name += f"-{part}"
    rt = resolve_runtime(cfg.run)
    loader = DaliLoader.from_split(split, part, cfg, device=rt, train=False)
    try:
        preds, targets = predict(place(model, rt.device, rt.channels_last), loader, rt)
    except TrainingError as exc:
        raise TrainingError(f"{checkpoint or name}: {exc}; it cannot be evaluated (retrain it, or "
                            "evaluate an earlier checkpoint)") from None
    finally:
        loader.close()
    result = write_report(scores(preds, targets, len(split.classes)), split.classes, out_dir, name,
                          part, int(targets.numel()), force=force,
                          extra={"checkpoint": str(checkpoint) if checkpoint else None,
                                 "image_size": cfg.data.image_size})
    save_config(cfg, Path(out_dir) / f"{name}_config.yaml")  # the settings the numbers were measured with
    return result

