"""The loader: a split's epochs as torch tensors on the pipeline's device.

Usable on its own by other KD code:

    loader = DaliLoader(paths, labels, cfg, device="cuda:0", train=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch(images, labels, partner_labels, mix_weight, indices)
            ...                       # images: N x 3 x H x W, channels-last, fp16

The DALI pipeline persists across epochs and prefetches (`cfg.data.prefetch` batches) while the
caller computes; asking for an epoch out of sequence, or for a start inside an epoch (resume),
rebuilds it at that position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from .dataset import DataError
from .pipeline import OUTPUTS, eval_pipeline, train_pipeline
from .source import EpochSource


@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, H, W), channels-last memory, normalised
    labels: torch.Tensor  # int64
    partner_labels: torch.Tensor  # int64: label of the CutMix partner (= labels in evaluation)
    mix_weight: torch.Tensor  # float32: weight of the partner label (0 in evaluation)
    indices: torch.Tensor  # int64 dataset indices

    def __len__(self) -> int:
        return self.labels.shape[0]

    def pin_memory(self) -> "Batch":
        """Called by torch's DataLoader (pin_memory=True) for the torchvision reference loader."""
        return Batch(*(t.pin_memory() for t in (self.images, self.labels, self.partner_labels,
                                                  self.mix_weight, self.indices)))


def device_id_of(device) -> int | None:
    """DALI's device_id for a torch device: None runs the CPU pipeline."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise DataError(f"the DALI loader runs on cpu or cuda devices, not {device.type}")
    return device.index if device.index is not None else torch.cuda.current_device()


class DaliLoader:
    """Batches of one split. `train=True`: shuffled, the nine VSM units; otherwise plain order."""

    def __init__(self, paths, labels, cfg: Config, device="cpu", train: bool = True,
                 seed: int = 0, rank: int = 0, world: int = 1, batch_size: int | None = None):
        if len(paths) != len(labels):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels")
        if not len(paths):
            raise DataError("the split has no images")
        self.cfg = cfg
        self.train = train
        self.device_id = device_id_of(device)
        self.source = EpochSource(paths, labels, cfg, train, seed, rank, world, batch_size)
        if len(self.source) == 0:
            raise DataError(f"{self.source.per_rank} training images make no full batch of "
                            f"{self.source.batch_size}: lower data.batch_size")
        self._epoch, self._start = 0, 0
        self._iterator = None
        self._next = None  # (epoch, batch) the live pipeline produces next

    def __len__(self) -> int:
        """Batches per epoch (from the start of the epoch)."""
        return len(self.source)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch < len(self):
            raise DataError(f"start_batch {start_batch} is outside the epoch's {len(self)} batches")
        self._epoch, self._start = epoch, start_batch

    def plan_position(self) -> tuple[int, int]:
        return self._epoch, self._start

    def _build(self):
        # Import here: the plugin imports torch-side DALI pieces only when a loader is used.
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.close()
        self.source.start_epoch, self.source.start_batch = self._epoch, self._start
        make = train_pipeline if self.train else eval_pipeline
        pipe = make(self.source, self.cfg, self.device_id, self.source.batch_size)
        names = OUTPUTS if self.train else ("images", "labels", "indices")
        self._iterator = DALIGenericIterator(pipe, list(names), auto_reset=True,
                                             last_batch_policy=LastBatchPolicy.PARTIAL)

    def __iter__(self):
        if self._iterator is None or self._next != (self._epoch, self._start):
            self._build()
        epoch = self._epoch
        self._next = None  # a caller who stops early leaves the pipeline mid-epoch: rebuild next time
        for out in self._iterator:
            d = out[0]
            images = d["images"].permute(0, 3, 1, 2)  # NHWC memory = channels-last NCHW, no copy
            labels = d["labels"].long()
            if self.train:
                batch = Batch(images, labels, d["partner_labels"].long(),
                              d["mix_weight"].float(), d["indices"].long())
            else:
                batch = Batch(images, labels, labels, torch.zeros_like(labels, dtype=torch.float32),
                              d["indices"].long())
            yield batch
        # The pipeline has been reset by the iterator and continues with the next epoch.
        self._epoch, self._start = epoch + 1, 0
        self._next = (self._epoch, 0)

    def close(self) -> None:
        if self._iterator is not None:
            del self._iterator
            self._iterator = None
            self._next = None
