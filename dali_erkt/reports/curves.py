"""Training curves of one configuration: loss parts, OA and learning rate per epoch, a line per seed."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_write


def write_curves(histories: dict, out: Path, title: str) -> Path:
    """`histories` maps a seed's label to its log records (log.jsonl's dicts); one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss", "ce", "inter", "intra") if any(k in r for h in histories.values() for r in h)]
    panels += ["oa", "lr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, history in histories.items():
            points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
        ax.set_title({"oa": "test OA", "lr": "learning rate", "ce": "train CE",
                      "loss": "train loss"}.get(key, f"train {key}"), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
