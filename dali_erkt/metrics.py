"""Classification metrics on integer labels: confusion matrix, OA, per-class accuracy, agreement.

Convention: `cm[t, p]` counts samples of true class t predicted as p (rows = true, cols = predicted).
The functions accept numpy arrays, torch tensors (any device) or sequences of ints.
"""
from __future__ import annotations

import numpy as np
import torch


def _labels(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        return arr.reshape(-1).astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64)


def confusion_matrix(pred, target, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predicted ones."""
    p, t = _labels(pred, "pred"), _labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length ({p.size} vs {t.size})")
    c = int(num_classes)
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= c):
            raise ValueError(f"{name} labels must be in [0, {c}), got range [{a.min()}, {a.max()}]")
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def overall_accuracy(cm) -> float:
    """Correct / all samples; NaN for an empty matrix (nothing was evaluated)."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def per_class_accuracy(cm) -> np.ndarray:
    """Recall of each true class (diagonal / row sum), float64.

    A class with no test samples (an all-zero row) gets NaN, not 0: it was not measured, and a 0
    would drag down a mean over classes. Use `np.nanmean` to average.
    """
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1)
    out = np.full(len(cm), np.nan)
    np.divide(np.diag(cm), rows, out=out, where=rows > 0)
    return out


def agreement(pred_a, pred_b) -> float:
    """Fraction of samples on which two models predict the same class (e.g. teacher and student)."""
    a, b = _labels(pred_a, "pred_a"), _labels(pred_b, "pred_b")
    if a.shape != b.shape:
        raise ValueError(f"predictions differ in length ({a.size} vs {b.size})")
    return float((a == b).mean()) if a.size else float("nan")


class ConfusionMeter:
    """Accumulates a confusion matrix on the device of the first batch; one host read at the end.

    `update` takes logits (N, C) (argmax is taken) or predicted labels (N,), and targets (N,).
    It uses `index_add_` rather than `torch.bincount`: bincount on CUDA reads the input's max
    back to the host to size its output, a sync per batch. Labels outside [0, C) cannot be checked
    without a sync either, so they are counted in an extra bin and `matrix()` raises on them.
    """

    def __init__(self, num_classes: int):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self._counts: torch.Tensor | None = None  # (C*C + 1,) int64; the last bin holds bad labels

    def reset(self) -> None:
        self._counts = None

    @torch.no_grad()
    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> None:
        c = self.num_classes
        pred = logits_or_preds
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        pred, target = pred.reshape(-1), target.reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target differ in length ({pred.numel()} vs {target.numel()})")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("labels must be integers; pass logits as (N, C) with targets (N,)")
        if self._counts is None:
            self._counts = torch.zeros(c * c + 1, dtype=torch.int64, device=target.device)
        pred, target = pred.to(self._counts.device, torch.int64), target.to(self._counts.device, torch.int64)
        ok = (pred >= 0) & (pred < c) & (target >= 0) & (target < c)
        idx = torch.where(ok, target * c + pred, torch.full_like(target, c * c))
        self._counts.index_add_(0, idx, torch.ones_like(idx))

    def matrix(self) -> np.ndarray:
        """The (C, C) int64 matrix so far (zeros before any update)."""
        c = self.num_classes
        if self._counts is None:
            return np.zeros((c, c), dtype=np.int64)
        counts = self._counts.cpu().numpy()
        if counts[-1]:
            raise ValueError(f"{counts[-1]} label(s) outside [0, {c}) were passed to update()")
        return counts[:-1].reshape(c, c).copy()
