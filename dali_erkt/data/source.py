"""What feeds the pipeline: file bytes in the plan's order, labels, and the plan's parameters.

DALI calls a source with a `BatchInfo` (iteration within the epoch, number of resets so far);
the source turns that into (epoch, batch) and returns the batch, or raises StopIteration at the
end of the epoch. Everything is derived from (seed, epoch, batch), so prefetching, restarting
mid-epoch and sharding over processes all see the same batches.
"""
from __future__ import annotations

import numpy as np

from ..config import Config
from .pipeline import EVAL_INPUTS, plan_inputs, train_inputs
from .plan import epoch_order, make_batch_plan, num_batches, shard


class EpochSource:
    """Batches of one split for a sequence of epochs starting at (start_epoch, start_batch)."""

    def __init__(self, paths, labels, cfg: Config, train: bool, seed: int,
                 rank: int = 0, world: int = 1, batch_size: int | None = None):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cfg = cfg
        self.train = train
        self.seed = seed
        self.rank, self.world = rank, world
        self.batch_size = batch_size or cfg.data.batch_size
        self.drop_last = cfg.data.drop_last if train else False
        self.per_rank = len(shard(np.arange(len(self.paths)), rank, world))
        self.start_epoch, self.start_batch = 0, 0
        self._cached = (None, None)
        self.names = train_inputs(cfg) if train else EVAL_INPUTS

    def __len__(self) -> int:
        return num_batches(self.per_rank, self.batch_size, self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
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

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        return [np.fromfile(self.paths[i], dtype=np.uint8) for i in indices]

    def __call__(self, info):
        epoch, batch = self.position(info)
        if batch >= len(self):
            raise StopIteration
        idx = self.batch_indices(epoch, batch)
        labels = self.labels[idx]
        if not self.train:
            values = {"encoded": self.read(idx), "labels": labels, "indices": idx}
            return tuple(values[k] for k in self.names)
        size = self.cfg.data.image_size
        plan = make_batch_plan(self.cfg.vsm, size, self.seed, epoch, batch, idx, rank=self.rank)
        values = plan_inputs(plan, size)
        values.update(encoded=self.read(idx), labels=labels,
                      partner_labels=labels[plan.cutmix_perm], mix_weight=plan.cutmix_weight,
                      indices=idx)
        return tuple(values[k] for k in self.names)
