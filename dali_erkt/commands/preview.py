"""See what the VSM does: gate rates from the plan and a grid of real DALI views.

Two independent parts:
- `gate_rates`: for each of the nine units, its configured p and the share of samples (CutMix:
  of batches) whose gate fired, over the first N samples of the training order. It reads only the
  plan, which is exactly what the pipeline executes, so no image is decoded.
- `render_grid`: R images from different classes, each shown resized to the training size and
  then as the real DALI training pipeline (`DaliLoader`, train=True) augments it in epochs
  0, 1, ...; every tile is labelled from the replayed plan, with the CutMix and erased boxes drawn.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import textwrap
from pathlib import Path

import numpy as np

from ..config import Config
from ..data.dataset import load_rgb, scan, why_unreadable
from ..data.loader import DaliLoader
from ..errors import DataError
from ..data.plan import BatchPlan, epoch_order, make_batch_plan, num_batches
from ..data.units import UNIT_TABLE

# --------------------------------------------------------------------------------------------
# Gate rates
# --------------------------------------------------------------------------------------------


def gate_rates(cfg: Config, n_images: int, samples: int, seed: int) -> dict:
    """Configured p and fired rate per unit over the first `samples` samples of training.

    Batches of `cfg.data.batch_size` (clipped to the dataset size so tiny folders still work)
    follow `epoch_order` epoch after epoch, as the loader does, until `samples` samples are
    covered. A per-batch unit (CutMix) has one coin per batch: its rate and n count batches.
    Erasing also reports `applied`, the share of samples where a fitting box was found and pixels
    were really erased.
    """
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    size = cfg.data.image_size
    bs = min(cfg.data.batch_size, n_images)
    per_epoch = num_batches(n_images, bs, cfg.data.drop_last)
    fired = {unit.name: [] for unit in UNIT_TABLE}
    erased = []
    covered, epoch, batches = 0, 0, 0
    while covered < samples:
        order = epoch_order(n_images, seed, epoch)
        for b in range(per_epoch):
            plan = make_batch_plan(cfg.vsm, size, seed, epoch, b, order[b * bs:(b + 1) * bs])
            k = min(bs, samples - covered)  # the last batch counts only the samples still needed
            for unit in UNIT_TABLE:
                fired[unit.name].append(plan.gates[unit.name][:1 if unit.per_batch else k])
            erased.append((plan.erase_box[:k, 2] > 0) & (plan.erase_box[:k, 3] > 0))
            covered, batches = covered + k, batches + 1
            if covered >= samples:
                break
        epoch += 1

    out = {}
    for unit in UNIT_TABLE:
        hits = np.concatenate(fired[unit.name])
        out[unit.name] = {"p": float(getattr(cfg.vsm, unit.name).p), "rate": float(hits.mean()),
                          "n": int(hits.size), "per": "batch" if unit.per_batch else "sample"}
    out["erasing"]["applied"] = float(np.concatenate(erased).mean())
    return {"gates": out, "samples": covered, "batches": batches, "batch_size": bs,
            "epochs": epoch}


def format_rates(rates: dict) -> str:
    lines = [f"{'unit':<14}{'p':>7}{'rate':>8}{'n':>7}"]
    for unit, r in rates["gates"].items():
        note = "  per batch" if r["per"] == "batch" else ""
        if "applied" in r:
            note = f"  (box found and erased: {r['applied']:.3f})"
        lines.append(f"{unit:<14}{r['p']:>7.3f}{r['rate']:>8.3f}{r['n']:>7}{note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def pick_rows(samples: list[tuple[str, int]], rows: int, seed: int) -> list[int]:
    """Indices of `rows` samples, one class after another in a seeded order (cycling if needed)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    pools = [list(rng.permutation(by_class[c])) for c in rng.permutation(sorted(by_class))]
    chosen: list[int] = []
    while len(chosen) < min(rows, len(samples)):
        for pool in pools:
            if pool and len(chosen) < rows:
                chosen.append(int(pool.pop()))
    return chosen


def describe(plan: BatchPlan, j: int, row_names: list[str]) -> str:
    """What fired for sample j of the plan, in pipeline order, as short wrapped text."""
    parts = [unit.describe(plan, j, row_names) for unit in UNIT_TABLE if plan.gates[unit.name][j]]
    return textwrap.fill(", ".join(parts) or "(nothing fired)", width=34)


def augmented_views(paths, labels, cfg: Config, device, seed: int, views: int):
    """Yield (epoch, plan, images HWC [0, 1]) from the real DALI loader over these images only
    (`device`: a device or the command's `Runtime`, as `DaliLoader.from_config` takes it).

    The loader gets batch size = len(paths), so each epoch is one batch holding every image. Keys
    are indices into this subset, so a view here is not the one the image gets in full training,
    but each label is replayed from exactly the plan the pipeline ran.
    """
    sub = copy.deepcopy(cfg)
    sub.data.batch_size, sub.data.drop_last = len(paths), True
    sub.data.prefetch = 1
    sub.data.num_threads = max(1, min(cfg.data.num_threads, os.cpu_count() or 1))
    mean = np.asarray(cfg.data.mean, dtype=np.float32)
    std = np.asarray(cfg.data.std, dtype=np.float32)
    loader = DaliLoader.from_config(paths, labels, sub, device=device, train=True, seed=seed)
    try:
        for epoch in range(views):
            loader.set_epoch(epoch)
            for batch in loader:
                idx = batch.indices.cpu().numpy()
                plan = make_batch_plan(sub.vsm, sub.data.image_size, seed, epoch, 0, idx)
                # Guard: the replayed plan must be the one the pipeline used.
                if not np.allclose(plan.cutmix_weight, batch.mix_weight.cpu().numpy()):
                    raise RuntimeError("replayed plan does not match the loader's batch")
                x = batch.images.float().cpu().permute(0, 2, 3, 1).numpy()
                yield epoch, plan, np.clip(x * std + mean, 0.0, 1.0)  # undo normalisation
    finally:
        loader.close()


def render_grid(root, samples, classes, cfg: Config, out, rows: int = 6, views: int = 6,
                seed: int = 0, device="cpu") -> Path:
    """Save the grid PNG to `out`: per row the resized original, then one view per epoch."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..data.reference import resize, to_tensor
    from ..io import atomic_write

    size = cfg.data.image_size
    chosen = pick_rows(samples, rows, seed)
    paths = [os.path.join(root, samples[i][0]) for i in chosen]
    labels = [samples[i][1] for i in chosen]
    names = [f"{classes[y]} (row {r + 1})" for r, y in enumerate(labels)]
    cols = 1 + views
    fig, axes = plt.subplots(len(chosen), cols, figsize=(1.9 * cols, 2.45 * len(chosen) + 0.5),
                             squeeze=False)
    for r, path in enumerate(paths):
        original = resize(to_tensor(load_rgb(path)), size).clamp(0, 1).permute(1, 2, 0).numpy()
        ax = axes[r, 0]
        ax.imshow(original)
        ax.set_ylabel(classes[labels[r]], fontsize=8)
        ax.set_xlabel(textwrap.fill(os.path.basename(path), 34), fontsize=5.5)
    for epoch, plan, images in augmented_views(paths, labels, cfg, device, seed, views):
        for j, k in enumerate(plan.indices):
            ax = axes[int(k), 1 + epoch]
            ax.imshow(images[j])
            ax.set_xlabel(describe(plan, j, names), fontsize=5.5)
            for unit in UNIT_TABLE:  # the boxes of the units that fired and have one
                box = unit.box(plan, j, size) if unit.box and plan.gates[unit.name][j] else None
                if box is not None:
                    y, x, h, w = box
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, **unit.box_style))
    for c in range(cols):
        axes[0, c].set_title("original (resized)" if c == 0 else f"epoch {c - 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = "; ".join(u.box_legend for u in UNIT_TABLE if u.box)
    fig.suptitle(f"VSM preview, preset {cfg.preset}, seed {seed}: real DALI views per epoch. "
                 f"{legend[0].upper() + legend[1:]}.", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    plt.close(fig)
    return out


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (Python and native, e.g. DALI's logs) to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def preview(data, *, samples: int, out, rows: int, device: str, seed=None, **options) -> dict:
    """Gate rates over `samples` samples of the plan and the grid PNG of real DALI views."""
    import time

    from ..runtime import resolve_runtime
    from .common import config_from_options

    start = time.perf_counter()
    cfg = config_from_options("erkt", device=device, **options)
    seed = cfg.run.seed if seed is None else seed
    rt = resolve_runtime(cfg.run)  # where the grid's DALI pipeline runs
    classes, items = scan(data)
    rates = gate_rates(cfg, len(items), samples, seed)
    shown, unreadable = readable_rows(data, items, rows, seed)
    # DALI may log to stdout; keep stdout for our own output (one JSON object with --json).
    with stdout_to_stderr():
        grid = render_grid(data, shown, classes, cfg, out, rows=len(shown), seed=seed, device=rt)
    return {"gates": rates["gates"], "samples": rates["samples"], "batches": rates["batches"],
            "batch_size": rates["batch_size"], "preset": cfg.preset, "seed": seed,
            "device": str(rt.device), "grid": str(grid), "unreadable": unreadable,
            "seconds": round(time.perf_counter() - start, 2), "_rates": rates}


def readable_rows(root, items, rows: int, seed: int):
    """Up to `rows` samples for the grid, from different classes, that decode; and the
    unreadable files met on the way (left out, as `check-data` would list them)."""
    shown, unreadable = [], []
    for i in pick_rows(items, len(items), seed):
        reason = why_unreadable(os.path.join(root, items[i][0]))
        if reason is None:
            shown.append(items[i])
        else:
            unreadable.append({"path": items[i][0], "reason": reason})
        if len(shown) == rows:
            break
    if not shown:
        raise DataError(f"no image under {root} decodes: run `dali-erkt check-data {root}`")
    return shown, unreadable
