"""Evaluate a trained student, one teacher, or the ensemble on a split; write the reports."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, save_config
from .data.dataset import Split
from .data.loader import DaliLoader
from .engine import evaluate_predictions, predict, prepare
from .io import atomic_write_text
from .models import TeacherEnsemble, create_model
from .precision import choose_precision, resolve_device
from .reports.confusion import write_confusion


def load_trained(path, num_classes: int | None = None, classes: list | None = None):
    """A model rebuilt from a dali-erkt checkpoint (its arch and weights), and the checkpoint."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a dali-erkt checkpoint (no 'arch' and 'model'): "
                              "evaluate runs written by train-teacher or distill")
    if classes is not None and list(state.get("classes", classes)) != list(classes):
        raise CheckpointError(f"{path} was trained on classes {state.get('classes')} but the split "
                              f"has {list(classes)}")
    n = num_classes or len(state["classes"])
    model = create_model(state["arch"], n)
    model.load_state_dict(state["model"])
    return model, state


def load_ensemble(paths, weights, combine: str, classes: list) -> TeacherEnsemble:
    """The frozen teacher ensemble from train-teacher checkpoints (one per teacher)."""
    members = [load_trained(p, len(classes), classes)[0] for p in paths]
    return TeacherEnsemble(members, weights, combine)


def evaluate_model(model, cfg: Config, split: Split, out_dir, part: str = "test", name: str = "model",
                   batch_size: int | None = None) -> dict:
    """OA, per-class accuracy and the confusion matrix (CSV and PNG) of `model` on `split`."""
    device = resolve_device(cfg.run.device)
    precision = choose_precision(device, cfg.run.precision)
    model = prepare(model, device, cfg.run.channels_last)
    loader = DaliLoader(split.paths(part), split.labels(part), cfg, device, train=False,
                        batch_size=batch_size)
    preds, targets = predict(model, loader, device, precision)  # no_grad inside
    ev = evaluate_predictions(preds, targets, len(split.classes))
    out = Path(out_dir)
    csv_path, png_path = write_confusion(ev["cm"], split.classes, out, stem=f"{name}_confusion",
                                         title=f"{name} on {part}")
    result = {"name": name, "part": part, "images": int(targets.numel()), "oa": ev["oa"],
              "per_class": {c: (None if v != v else v) for c, v in zip(split.classes, ev["per_class"])},
              "confusion_csv": str(csv_path), "confusion_png": str(png_path)}
    atomic_write_text(out / f"{name}_metrics.json", json.dumps(result, indent=2) + "\n")
    save_config(cfg, out / f"{name}_config.yaml")  # the settings the numbers were measured with
    return result
