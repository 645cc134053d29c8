"""Write a confusion matrix as a CSV table and a PNG heat map (rows = true, columns = predicted)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write
from ..metrics import overall_accuracy


def _write_csv(cm: np.ndarray, names: Sequence[str], tmp: str) -> None:
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, cm):
            w.writerow([name, *(int(v) for v in row)])


def confusion_figure(cm: np.ndarray, names: Sequence[str], title: str):
    # Figure without pyplot: no global state, no backend switch, safe in threads; savefig to
    # PNG renders with Agg.
    from matplotlib.figure import Figure

    n = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    longest = max(len(str(s)) for s in names)
    cell = 0.6 if n <= 10 else 0.34  # inches per class: 45 classes still get readable labels
    label_in = min(0.075 * longest, 3.0)  # room for the class names beside the grid
    side = cell * n + label_in + 1.6
    fig = Figure(figsize=(side + 1.2, side), dpi=120)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="fraction of the true class")

    font = 9 if n <= 10 else 7 if n <= 25 else 5.5
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(s) for s in names], rotation=60, ha="right", rotation_mode="anchor",
                  fontsize=font + 1)
    ax.set_yticks(ticks, [str(s) for s in names], fontsize=font + 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)

    skip_zeros = n > 20  # a large matrix is mostly zeros; printing them hides the errors
    for t, p in zip(*np.nonzero(cm) if skip_zeros else np.indices(cm.shape).reshape(2, -1)):
        ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", fontsize=font,
                color="white" if norm[t, p] > 0.5 else "black")
    fig.tight_layout()
    return fig


def write_confusion(cm, class_names: Sequence[str], out_dir, stem: str = "confusion",
                    title: str | None = None) -> tuple[Path, Path]:
    """Write `<stem>.csv` and `<stem>.png` into `out_dir`; return (csv_path, png_path).

    The CSV has a header row of predicted class names and a first column of true class names.
    The PNG colours each row by its share of the true class and prints the counts (zeros are
    left out above 20 classes); the title ends with the overall accuracy.
    """
    cm = np.asarray(cm)
    names = list(class_names)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names) or not names:
        raise ValueError(f"need a square matrix with one row per class name; got shape {cm.shape} "
                         f"and {len(names)} names")
    out = Path(out_dir)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    atomic_write(csv_path, lambda tmp: _write_csv(cm, names, tmp))

    oa = overall_accuracy(cm)
    score = "n/a" if np.isnan(oa) else f"{oa:.2%}"
    heading = f"{title or 'confusion matrix'} - OA {score} ({int(cm.sum())} samples)"
    fig = confusion_figure(cm, names, heading)
    # The temporary name ends in .tmp, so the format must be named.
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    return csv_path, png_path
