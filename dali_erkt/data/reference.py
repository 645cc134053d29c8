"""The torchvision twin of the VSM: the same plan applied with torchvision's functional ops.

It is the reference the tests compare the DALI pipeline with, and (as `ReferenceLoader`) the
paper-style torchvision DataLoader that the benchmark measures DALI against. Images are float
tensors in [0, 1], CHW; the units' twins (`units.UNIT_TABLE`) run in the table's order with the
plan's parameters.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from ..config import VSMConfig
from .dataset import load_rgb
from .loader import Batch
from .plan import BatchPlan, make_batch_plan
from .source import EpochSource
from .units import UNIT_TABLE, resize


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float [0, 1]."""
    if not rgb.flags.writeable:  # torch.from_numpy warns on read-only arrays (Pillow's)
        rgb = rgb.copy()
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0


def apply_sample(img: torch.Tensor, plan: BatchPlan, i: int, vsm: VSMConfig, image_size: int,
                 mean) -> torch.Tensor:
    """The per-sample units' twins, where sample i's gates fired."""
    for unit in UNIT_TABLE:
        if not unit.per_batch and plan.gates[unit.name][i]:
            img = unit.twin(img, plan, i, getattr(vsm, unit.name), image_size, mean)
    return img


def apply_batch(images: torch.Tensor, plan: BatchPlan, vsm: VSMConfig, image_size: int,
                mean) -> torch.Tensor:
    """The per-batch units' twins (CutMix), where the batch's gate fired."""
    for unit in UNIT_TABLE:
        if unit.per_batch and len(plan) and plan.gates[unit.name][0]:
            images = unit.twin(images, plan, getattr(vsm, unit.name), image_size, mean)
    return images


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    return F.normalize(images, list(mean), list(std))


def apply_plan(images: list[torch.Tensor], plan: BatchPlan, vsm: VSMConfig, image_size: int,
               mean) -> torch.Tensor:
    """The units on a batch of [0, 1] CHW images (already at the training size)."""
    out = torch.stack([apply_sample(img, plan, i, vsm, image_size, mean)
                       for i, img in enumerate(images)])
    return apply_batch(out, plan, vsm, image_size, mean)


# --------------------------------------------------------------------------------------------
# The paper-style loader: torchvision DataLoader with worker processes, same plan as DALI.
# --------------------------------------------------------------------------------------------

class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, source: EpochSource, mean):
        self.source, self.mean = source, mean

    def __len__(self):
        return len(self.source.paths)

    def __getitem__(self, key):
        epoch, batch, pos, idx = key
        src = self.source
        size = src.image_size
        img = resize(to_tensor(load_rgb(src.paths[idx])), size)
        if src.train:
            # A sample's parameters depend only on (seed, epoch, index): a one-sample plan
            # gives the same view as the full batch's plan.
            plan = make_batch_plan(src.vsm, size, src.seed, epoch, batch, np.array([idx]),
                                   rank=src.rank)
            img = apply_sample(img, plan, 0, src.vsm, size, self.mean)
        return img, int(src.labels[idx]), key


class _BatchKeys(torch.utils.data.Sampler):
    def __init__(self, source: EpochSource):
        self.source = source
        self.epoch = 0

    def __len__(self):
        return len(self.source)

    def __iter__(self):
        for b in range(len(self.source)):
            idx = self.source.batch_indices(self.epoch, b)
            yield [(self.epoch, b, p, int(i)) for p, i in enumerate(idx)]


class _Collate:
    """Stacks samples and applies the batch's CutMix; a plain object (not a bound method of the
    loader) so that the DataLoader's workers do not keep the loader alive."""

    def __init__(self, source: EpochSource, mean, std):
        self.source, self.mean, self.std = source, mean, std

    def __call__(self, items):
        src = self.source
        images = torch.stack([it[0] for it in items])
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
        epoch, batch = items[0][2][0], items[0][2][1]
        idx = np.array([it[2][3] for it in items], dtype=np.int64)
        if src.train:
            plan = make_batch_plan(src.vsm, src.image_size, src.seed, epoch, batch, idx,
                                   rank=src.rank)
            images = apply_batch(images, plan, src.vsm, src.image_size, self.mean)
            partner = labels[torch.as_tensor(plan.cutmix_perm)]
            weight = torch.as_tensor(plan.cutmix_weight)
        else:
            partner, weight = labels, torch.zeros(len(labels))
        images = normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        return Batch(images, labels, partner, weight, torch.as_tensor(idx))


class ReferenceLoader:
    """torchvision DataLoader yielding the same `Batch`es as `DaliLoader`: CPU tensors, fp32,
    channels-last (pinned where CUDA is, so copies to the GPU can be asynchronous)."""

    def __init__(self, paths, labels, *, vsm: VSMConfig, image_size: int, batch_size: int, mean,
                 std, train: bool = True, seed: int = 0, workers: int = 2, drop_last: bool = True):
        self.source = EpochSource(paths, labels, batch_size=batch_size, train=train, vsm=vsm,
                                  image_size=image_size, seed=seed, drop_last=drop_last)
        self.sampler = _BatchKeys(self.source)
        self.loader = torch.utils.data.DataLoader(
            _PlanDataset(self.source, mean), batch_sampler=self.sampler, num_workers=workers,
            collate_fn=_Collate(self.source, mean, std), persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available())

    def __len__(self):
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self):
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes now (not at garbage collection)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
