"""Evaluation: a model's predictions over a loader, the scores, and the files that report them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError, TrainingError
from .io import atomic_write_text
from .metrics import ConfusionMeter, overall_accuracy, per_class_accuracy
from .reports.confusion import write_confusion
from .runtime import Runtime


@torch.no_grad()
def predict(model, loader, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits' argmax and targets for every batch of `loader`, kept on the device (no host reads).

    The loader goes on with its next epoch each call: evaluation epochs are all alike, and the
    live pipeline is reused rather than rebuilt. A model whose logits are NaN or infinite on any
    image (finite weights can still overflow) is refused: its argmax would be a silent guess.
    """
    was_training = model.training
    model.eval()
    preds, targets = [], []
    finite = torch.ones((), dtype=torch.bool, device=rt.device)
    for batch in loader:
        with rt.autocast():
            logits = model(batch.images.to(rt.input_dtype))
        finite &= logits.isfinite().all()
        preds.append(logits.argmax(1))
        targets.append(batch.labels)
    model.train(was_training)
    if not finite.item():  # one host read per evaluation
        raise TrainingError("the model computes NaN or infinite logits on the images evaluated")
    return torch.cat(preds), torch.cat(targets)


def scores(preds, targets, num_classes: int) -> dict:
    """{"oa", "per_class" (list, NaN for a class with no images), "cm"} of predictions."""
    meter = ConfusionMeter(num_classes)
    meter.update(preds, targets)
    cm = meter.matrix()
    return {"oa": overall_accuracy(cm), "per_class": per_class_accuracy(cm).tolist(), "cm": cm}


def report_paths(out_dir, name: str) -> list[Path]:
    out = Path(out_dir)
    return [out / f"{name}_metrics.json", out / f"{name}_confusion.csv", out / f"{name}_confusion.png"]


def write_report(ev: dict, classes, out_dir, name: str, part: str, images: int,
                 force: bool = False, extra: dict | None = None) -> dict:
    """<name>_metrics.json and the confusion matrix (CSV, PNG) in `out_dir`; an existing report
    of that name is kept unless `force`."""
    existing = [p for p in report_paths(out_dir, name) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists: pass --force to replace it, or another --out")
    out = Path(out_dir)
    csv_path, png_path = write_confusion(ev["cm"], classes, out, stem=f"{name}_confusion",
                                         title=f"{name} on {part}")
    result = {"name": name, "part": part, "images": images, "oa": ev["oa"],
              "per_class": {c: (None if v != v else v) for c, v in zip(classes, ev["per_class"])},
              **(extra or {}), "confusion_csv": str(csv_path), "confusion_png": str(png_path)}
    atomic_write_text(out / f"{name}_metrics.json", json.dumps(result, indent=2) + "\n")
    return result
