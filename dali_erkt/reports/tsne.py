"""t-SNE maps of features (the paper's Figures 11-12): plain arrays in, a 2-D embedding, a CSV of
its coordinates and a PNG coloured by class out.

scikit-learn is an optional extra (`pip install 'dali-erkt[figures]'`), imported only here.
"""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_write

MIN_POINTS = 5
SMALL = 5000  # points: t-SNE below this runs on one thread


def effective_perplexity(perplexity: float, n: int) -> float:
    """`perplexity`, lowered to (n - 1) / 3 where there are few points (scikit-learn needs it
    below n; a third keeps each point's neighbourhood a minority of the set)."""
    if not (0 < perplexity < math.inf):
        raise ConfigError(f"perplexity = {perplexity} must be a positive number (5-50 is usual)")
    return float(min(perplexity, max(1.0, (n - 1) / 3)))


def require_sklearn() -> None:
    """One line saying how to install scikit-learn where it is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError("embed needs scikit-learn: pip install 'dali-erkt[figures]'") from None


def tsne_2d(features: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """(N, 2) t-SNE coordinates of `features` (N, D) and the final KL divergence.

    scikit-learn's defaults (Barnes-Hut, Euclidean distance, PCA initialisation, automatic
    learning rate, 1000 iterations), seeded; `perplexity` lowered by `effective_perplexity`.
    """
    require_sklearn()
    from sklearn.manifold import TSNE
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < MIN_POINTS:
        raise DataError(f"t-SNE needs at least {MIN_POINTS} feature vectors (N, D); got shape "
                        f"{x.shape}")
    if not np.isfinite(x).all():
        raise DataError("the features hold NaN or infinite values: the model's weights are broken")
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    model = TSNE(n_components=2, perplexity=effective_perplexity(perplexity, len(x)),
                 init="pca", learning_rate="auto", random_state=int(seed))
    # Small sets on one thread: Barnes-Hut's OpenMP threads spin against torch's (measured on 2
    # busy cores: 140 points in 0.4 s on one thread, 4.6-7.9 s on two).
    with threadpool_limits(1 if len(x) < SMALL else None, user_api="openmp"):
        coords = model.fit_transform(x)
    return coords.astype(np.float32), float(model.kl_divergence_)


def write_coords(out, coords: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                 paths: Sequence[str] | None = None, predicted: Sequence[int] | None = None) -> Path:
    """CSV: one row per point: path (where given), label, class, predicted (where given), x, y."""
    n = len(coords)
    paths = list(paths) if paths is not None else None
    predicted = list(predicted) if predicted is not None else None

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow((["path"] if paths else []) + ["label", "class"]
                       + (["predicted"] if predicted else []) + ["x", "y"])
            for i in range(n):
                y = int(labels[i])
                w.writerow(([paths[i]] if paths else []) + [y, class_names[y]]
                           + ([int(predicted[i])] if predicted else [])
                           + [f"{coords[i, 0]:.5f}", f"{coords[i, 1]:.5f}"])
    out = Path(out)
    atomic_write(out, write)
    return out


def class_colours(n: int) -> np.ndarray:
    """n distinct RGBA colours: tab10 up to 10 classes, tab20 + tab20b + tab20c up to 60."""
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    table = np.concatenate([colormaps[c](np.arange(20)) for c in ("tab20", "tab20b", "tab20c")])
    if n <= len(table):
        return table[:n]
    return colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))


def tsne_figure(coords: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                predicted: Sequence[int] | None = None, title: str = "", dpi: int = 120):
    """The t-SNE map as a matplotlib Figure (Agg canvas, constrained layout): a scatter of
    `coords` coloured by true class, one legend entry per class beside it; where `predicted` is
    given, misclassified points are drawn as crosses. The title is the figure's, wrapped to its
    width, so it is never wider than the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    coords = np.asarray(coords)
    labels = np.asarray(labels, dtype=int)
    names = list(class_names)
    colours = class_colours(len(names))
    wrong = (np.asarray(predicted) != labels) if predicted is not None else np.zeros(len(labels), bool)
    ncol = 1 if len(names) <= 16 else 2 if len(names) <= 32 else 3
    width = 6.2 + 1.7 * ncol
    fig = Figure(figsize=(width, 6.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    size = 22 if len(labels) <= 2000 else 8
    for k, name in enumerate(names):
        own = labels == k
        ax.scatter(coords[own & ~wrong, 0], coords[own & ~wrong, 1], s=size, color=colours[k],
                   edgecolors="none", alpha=0.85)
        ax.scatter(coords[own & wrong, 0], coords[own & wrong, 1], s=size * 1.4, color=colours[k],
                   marker="x", linewidths=1.0)
    handles = [Line2D([], [], marker="o", ls="", color=colours[k],
                      label=f"{name} ({int((labels == k).sum())})") for k, name in enumerate(names)]
    if wrong.any():
        handles.append(Line2D([], [], marker="x", ls="", color="0.3", label="misclassified"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              frameon=False, ncol=ncol, title="class (points)", title_fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    if title:
        fig.suptitle(textwrap.fill(title, width=max(30, int(width * 72 / (9 * 0.6)))), fontsize=9)
    return fig


def write_tsne_png(out, coords: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                   predicted: Sequence[int] | None = None, title: str = "", dpi: int = 120) -> Path:
    """The t-SNE map PNG (`tsne_figure`), written atomically to `out`."""
    fig = tsne_figure(coords, labels, class_names, predicted, title, dpi)
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight",
                                              pad_inches=0.05))
    return out
