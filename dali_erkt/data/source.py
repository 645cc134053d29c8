"""What feeds the pipeline: file paths in the plan's order, labels, and the plan's parameters.

DALI calls a source with a `BatchInfo` (iteration within the epoch, number of resets so far);
the source turns that into (epoch, batch) and returns the batch, or raises StopIteration at the
end of the epoch. Everything is derived from (seed, epoch, batch), so prefetching, restarting
mid-epoch and sharding over processes all see the same batches.

The source also says which values it yields (`names`): the pipeline builds its graph from them.

Files are read by the pipeline (`fn.io.file.read`, in DALI's threads), not here: a source runs
on the Python thread that drives the iterator, once per batch, and reading 30 files there took
about 3.3 ms of its 4.5 ms per batch (2-core CPU, page cache), time in which a GPU pipeline waits
(bench/RESULTS.md). The source yields each file's path as UTF-8 bytes, encoded once.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from ..config import VSMConfig
from .plan import epoch_order, make_batch_plan, num_batches, shard

# The values a training batch may carry, in order. A unit with p = 0 is left out of the graph and
# p = 1 needs no gate, so the source computes only what the configured graph uses.
TRAIN_INPUTS = (
    "path", "labels", "partner_labels", "mix_weight", "indices",
    "color_jitter", "brightness", "contrast", "saturation",
    "rotation", "angle", "hflip", "vflip", "grayscale", "autocontrast",
    "erase_anchor", "erase_shape", "resized_crop", "crop_start", "crop_end",
    "paste_ids", "paste_anchors", "paste_shapes",
)
EVAL_INPUTS = ("path", "labels", "indices")
_UNIT_INPUTS = {
    "color_jitter": ("brightness", "contrast", "saturation"),
    "rotation": ("angle",),
    "hflip": ("hflip", "vflip"),
    "vflip": ("hflip", "vflip"),
    "grayscale": (),
    "autocontrast": (),
    "erasing": ("erase_anchor", "erase_shape"),
    "resized_crop": ("crop_start", "crop_end"),
    "cutmix": ("paste_ids", "paste_anchors", "paste_shapes"),
}
GATED = ("color_jitter", "rotation", "grayscale", "autocontrast", "resized_crop")


def train_inputs(vsm: VSMConfig) -> tuple[str, ...]:
    """The names the training source yields for these VSM settings, in TRAIN_INPUTS order."""
    used = set(TRAIN_INPUTS[:5])
    for unit, names in _UNIT_INPUTS.items():
        p = getattr(vsm, unit).p
        if p > 0:
            used.update(names)
            if p < 1 and unit in GATED:
                used.add(unit)
    return tuple(k for k in TRAIN_INPUTS if k in used)


def plan_inputs(plan, size: int) -> dict[str, np.ndarray]:
    """The per-batch arrays the training pipeline reads, derived from a BatchPlan."""
    n = len(plan)
    g = plan.gates
    eb = plan.erase_box.astype(np.float32)
    cb = plan.crop_box.astype(np.float32)
    box = plan.cutmix_box.astype(np.int32)
    own = np.arange(n, dtype=np.int32)
    # Every sample pastes itself whole, then its partner's box over it (an empty box: no change).
    paste_ids = np.stack([own, plan.cutmix_perm.astype(np.int32)], axis=1)
    anchors = np.zeros((n, 2, 2), dtype=np.int32)
    anchors[:, 1] = box[:2]
    shapes = np.empty((n, 2, 2), dtype=np.int32)
    shapes[:, 0] = (size, size)
    shapes[:, 1] = box[2:]
    return {
        "color_jitter": g["color_jitter"], "brightness": plan.brightness,
        "contrast": plan.contrast, "saturation": plan.saturation,
        "rotation": g["rotation"], "angle": plan.angle,
        "hflip": g["hflip"].astype(np.int32), "vflip": g["vflip"].astype(np.int32),
        "grayscale": g["grayscale"], "autocontrast": g["autocontrast"],
        "erase_anchor": eb[:, :2].copy(), "erase_shape": eb[:, 2:].copy(),
        "resized_crop": g["resized_crop"], "crop_start": cb[:, :2].copy(),
        "crop_end": (cb[:, :2] + cb[:, 2:]).copy(),
        "paste_ids": paste_ids, "paste_anchors": anchors, "paste_shapes": shapes,
    }


class EpochSource:
    """Batches of one split for a sequence of epochs starting at (start_epoch, start_batch)."""

    def __init__(self, paths, labels, *, batch_size: int, train: bool, vsm: VSMConfig | None,
                 image_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_last: bool = True):
        self.paths = [str(p) for p in paths]
        self._encoded = [np.frombuffer(p.encode("utf-8"), dtype=np.uint8) for p in self.paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.vsm, self.image_size = vsm, image_size
        self.train = train
        self.seed = seed
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.drop_last = drop_last if train else False
        self.per_rank = len(shard(np.arange(len(self.paths)), rank, world))
        self.start_epoch, self.start_batch = 0, 0
        self._cached = (None, None)
        self.names = train_inputs(vsm) if train else EVAL_INPUTS
        self.recent: deque = deque(maxlen=8)  # the last batches' file paths (to name a bad file)

    def __len__(self) -> int:
        """Batches per epoch."""
        return num_batches(self.per_rank, self.batch_size, self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's samples of `epoch`, in order (contiguous: DALI takes no strided arrays)."""
        if self._cached[0] != epoch:
            full = epoch_order(len(self.paths), self.seed, epoch, shuffle=self.train)
            self._cached = (epoch, shard(full, self.rank, self.world))
        return self._cached[1]

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        b = self.batch_size
        return self.order(epoch)[batch * b:(batch + 1) * b]

    def position(self, info) -> tuple[int, int]:
        """(epoch, batch) for DALI's BatchInfo."""
        epoch = self.start_epoch + info.epoch_idx
        batch = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        return epoch, batch

    def files(self, indices: np.ndarray) -> list[np.ndarray]:
        """The batch's paths as UTF-8 byte arrays (what `fn.io.file.read` takes); remembered in
        `recent`, so that a file the pipeline cannot read or decode can be named."""
        self.recent.append([self.paths[i] for i in indices])
        return [self._encoded[i] for i in indices]

    def __call__(self, info):
        epoch, batch = self.position(info)
        if batch >= len(self):
            raise StopIteration
        idx = self.batch_indices(epoch, batch)
        labels = self.labels[idx]
        if not self.train:
            values = {"path": self.files(idx), "labels": labels, "indices": idx}
            return tuple(values[k] for k in self.names)
        plan = make_batch_plan(self.vsm, self.image_size, self.seed, epoch, batch, idx, rank=self.rank)
        values = plan_inputs(plan, self.image_size)
        values.update(path=self.files(idx), labels=labels,
                      partner_labels=labels[plan.cutmix_perm], mix_weight=plan.cutmix_weight,
                      indices=idx)
        return tuple(values[k] for k in self.names)
