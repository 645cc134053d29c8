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

import copy
from collections import deque

import numpy as np

from ..config import VSMConfig
from .plan import epoch_order, make_batch_plan, num_batches, shard
from .units import UNIT_TABLE

# What every training batch carries; then each unit's gate and inputs (units.py), in table order.
# A unit with p = 0 is left out of the graph and p = 1 needs no gate: the source yields only what
# the configured graph reads.
BASE_INPUTS = ("path", "labels", "partner_labels", "mix_weight", "indices")
EVAL_INPUTS = ("path", "labels", "indices")


def train_inputs(vsm: VSMConfig) -> tuple[str, ...]:
    """The names the training source yields for these VSM settings."""
    names = list(BASE_INPUTS)
    for unit in UNIT_TABLE:
        p = getattr(vsm, unit.name).p
        if p > 0:
            names += ([unit.name] if unit.conditional and p < 1 else []) + list(unit.inputs)
    return tuple(names)


def plan_inputs(plan, size: int) -> dict[str, np.ndarray]:
    """The per-batch arrays the training pipeline reads, derived from a BatchPlan."""
    values = {}
    for unit in UNIT_TABLE:
        values.update(unit.feed(plan, size))
        if unit.conditional:
            values[unit.name] = plan.gates[unit.name]
    return values


class EpochSource:
    """Batches of one split for a sequence of epochs starting at (start_epoch, start_batch)."""

    def __init__(self, paths, labels, *, batch_size: int, train: bool, vsm: VSMConfig | None,
                 image_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_last: bool = True, shuffle: bool | None = None):
        self.paths = [str(p) for p in paths]
        self._encoded = [np.frombuffer(p.encode("utf-8"), dtype=np.uint8) for p in self.paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.vsm, self.image_size = vsm, image_size
        self.train = train
        self.shuffle = train if shuffle is None else bool(shuffle)  # training shuffles by default
        self.seed = seed
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.drop_last = drop_last if train else False
        self.per_rank = len(shard(np.arange(len(self.paths)), rank, world))
        self.start_epoch, self.start_batch = 0, 0
        self._cached = (None, None)
        self.names = train_inputs(vsm) if train else EVAL_INPUTS
        self.recent: deque = deque(maxlen=8)  # the last batches' file paths (to name a bad file)

    def positioned(self, epoch: int, batch: int) -> "EpochSource":
        """A copy that starts at (epoch, batch), with its own order cache and recent files: each
        pipeline gets one, so two pipelines of one loader never share a position. The paths,
        labels and settings are shared, and never written after construction."""
        twin = copy.copy(self)
        twin.start_epoch, twin.start_batch = epoch, batch
        twin._cached = (None, None)
        twin.recent = deque(maxlen=self.recent.maxlen)
        return twin

    def __len__(self) -> int:
        """Batches per epoch."""
        return num_batches(self.per_rank, self.batch_size, self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's samples of `epoch`, in order (contiguous: DALI takes no strided arrays)."""
        if self._cached[0] != epoch:
            full = epoch_order(len(self.paths), self.seed, epoch, shuffle=self.shuffle)
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
