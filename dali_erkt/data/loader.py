"""The loader: a split's epochs as torch batches, fed by the DALI pipeline. It behaves like a
torch `DataLoader`, so other KD code can use it as one:

    from dali_erkt import DaliLoader

    loader = DaliLoader(paths, labels, image_size=256, batch_size=30, device="cuda")
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)      # or loader.set_epoch(epoch); optional, see below
        for images, labels, partner_labels, mix_weight, indices in loader:
            ...                              # images: N x 3 x H x W, channels-last, fp16

Epochs: each new `iter()` starts the next epoch, after a finished epoch or an abandoned one
(`break`); `set_epoch(e)` chooses the epoch explicitly. `state_dict()` / `load_state_dict()`
hold (epoch, batch) for a resume inside an epoch; `len(loader)` counts the batches the next
`iter()` yields (fewer after a mid-epoch start). The DALI pipeline persists across epochs and
prefetches `prefetch` batches while the caller computes; a start anywhere else rebuilds it there.
"""
from __future__ import annotations

import copy
import os
from typing import NamedTuple

import torch

from ..config import VSMConfig, vsm_preset
from ..errors import ConfigError, DataError
from ..runtime import Runtime, resolve_device
from .dataset import why_unreadable
from .pipeline import EVAL_OUTPUTS, OUTPUTS, eval_pipeline, train_pipeline
from .source import EpochSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = {"float16": "float16", "float32": "float32", torch.float16: "float16",
           torch.float32: "float32", "fp16": "float16", "fp32": "float32"}


class Batch(NamedTuple):
    """One batch; unpacks like a tuple and keeps its names."""
    images: torch.Tensor  # (N, 3, H, W), channels-last memory; normalised (or uint8 [0, 255])
    labels: torch.Tensor  # int64
    partner_labels: torch.Tensor  # int64: the CutMix partner's label (= labels where none)
    mix_weight: torch.Tensor  # float32: the partner label's weight, the pasted area (0: none)
    indices: torch.Tensor  # int64 dataset indices

    def soft_targets(self, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """(N, num_classes) float32 targets: (1 - w) * own + w * partner, each label smoothed
        (1 - smoothing on the class, smoothing / num_classes spread over all classes)."""
        def smooth(y):
            t = torch.full((y.shape[0], num_classes), smoothing / num_classes,
                           dtype=torch.float32, device=y.device)
            return t.scatter_add_(1, y.view(-1, 1), torch.full_like(t[:, :1], 1.0 - smoothing))
        w = self.mix_weight.float().view(-1, 1)
        return (1.0 - w) * smooth(self.labels) + w * smooth(self.partner_labels)


def device_id_of(device) -> int | None:
    """DALI's device_id for a device (a torch.device or a name, read by `runtime.resolve_device`,
    the one device parser): None runs the CPU pipeline. A bad device is a one-line DataError."""
    try:
        device = resolve_device(device, what="the loader's device")
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    return None if device.type == "cpu" else device.index


class _EpochSampler:
    """`loader.sampler.set_epoch(e)`, as code written for DistributedSampler calls it."""

    def __init__(self, loader: "DaliLoader"):
        self.set_epoch = loader.set_epoch


class DaliLoader:
    """Batches of one split. `train=True`: shuffled, the nine VSM units; otherwise every image
    once, in order, the last batch partial.

    Arguments are plain values: `preset` names the VSM settings (`vsm` gives them whole and wins);
    `cutmix=False` leaves the paste out of the graph (partner_labels == labels, mix_weight == 0);
    `dtype=None` means fp16 on a GPU, fp32 on the CPU; `normalize=False` gives uint8 images;
    `fields=("images", "labels")` yields plain tuples of just those fields.
    """

    def __init__(self, paths, labels, *, image_size: int = 256, batch_size: int = 30,
                 train: bool = True, device="cuda", preset: str = "erkt",
                 vsm: VSMConfig | None = None, cutmix: bool = True, dtype=None,
                 normalize: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 num_threads: int | None = None, prefetch: int = 2, seed: int = 0, rank: int = 0,
                 world: int = 1, fields=None, drop_last: bool = True):
        if len(paths) != len(labels):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels: give one label per path")
        if not len(paths):
            raise DataError("the loader got no images")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside world {world}")
        if fields is not None and not set(fields) <= set(Batch._fields):
            raise DataError(f"fields {tuple(fields)}: choose from {', '.join(Batch._fields)}")
        self.device_id = device_id_of(device)
        self.device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        if dtype is None:
            dtype = "float32" if self.device_id is None else "float16"
        if dtype not in _DTYPES:
            raise DataError(f"dtype {dtype!r}: use float16 or float32")
        vsm = copy.deepcopy(vsm) if vsm is not None else vsm_preset(preset)
        if not cutmix:
            vsm.cutmix.p = 0.0
        self.batch_size = batch_size
        self.train = train
        self.fields = None if fields is None else tuple(fields)
        self.sampler = _EpochSampler(self)
        self._settings = dict(image_size=image_size, mean=tuple(mean), std=tuple(std),
                              dtype=_DTYPES[dtype], normalize=normalize, batch_size=batch_size,
                              num_threads=num_threads or max(1, min(4, os.cpu_count() or 1)),
                              prefetch=prefetch)
        self.source = EpochSource(paths, labels, batch_size=batch_size, train=train,
                                  vsm=vsm if train else None, image_size=image_size, seed=seed,
                                  rank=rank, world=world, drop_last=drop_last)
        self.vsm = vsm
        if len(self.source) == 0:
            raise DataError(f"{self.source.per_rank} training images make no full batch of "
                            f"{batch_size}: lower the batch size")
        self._epoch, self._batch = 0, 0  # the position after the last batch handed out
        # True when the position was set (set_epoch, load_state_dict) or an epoch completed; False
        # after a batch was handed out, so an abandoned epoch is followed by the next one.
        self._exact = True
        self._iterator = None
        self._next = None  # (epoch, batch) the live pipeline produces next

    @classmethod
    def from_config(cls, paths, labels, cfg, *, device, train: bool = True, seed: int | None = None,
                    rank: int = 0, world: int = 1, batch_size: int | None = None) -> "DaliLoader":
        """The loader a run's configuration describes (data and VSM settings). `device`: a
        device, or the run's `Runtime`: its device, and its `dali_threads` where resolved (in
        place of data.num_threads)."""
        d = cfg.data
        threads = d.num_threads
        if isinstance(device, Runtime):
            device, threads = device.device, device.dali_threads or d.num_threads
        return cls(paths, labels, image_size=d.image_size, batch_size=batch_size or d.batch_size,
                   train=train, device=device, vsm=cfg.vsm, dtype=d.dtype, mean=d.mean, std=d.std,
                   num_threads=threads, prefetch=d.prefetch,
                   seed=cfg.run.seed if seed is None else seed, rank=rank, world=world,
                   drop_last=d.drop_last)

    @classmethod
    def from_split(cls, split, part: str, cfg, *, device, train: bool, seed: int | None = None,
                   rank: int = 0, world: int = 1, batch_size: int | None = None) -> "DaliLoader":
        """The loader of one part ("train" or "test") of a `Split`, as `from_config` builds it
        (`device`: a device or the run's `Runtime`). `train` has no default: the train part is
        also evaluated (`evaluate --part train`)."""
        return cls.from_config(split.paths(part), split.labels(part), cfg, device=device,
                               train=train, seed=seed, rank=rank, world=world,
                               batch_size=batch_size)

    # -- position ------------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        return len(self.source)

    def __len__(self) -> int:
        """Batches the next iter() yields: the epoch's, less those before a mid-epoch start."""
        return len(self.source) - (self._batch if self._exact else 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iter() yields `epoch` from batch `start_batch` on."""
        if not 0 <= start_batch < len(self.source):
            raise DataError(f"start_batch {start_batch} is outside the epoch's {len(self.source)} batches")
        if epoch < 0:
            raise DataError(f"epoch {epoch} must be >= 0")
        self._epoch, self._batch, self._exact = int(epoch), int(start_batch), True

    def state_dict(self) -> dict:
        """{"epoch", "batch"}: the position after the last batch handed out (or set); loading
        it into a new loader resumes there."""
        if self._batch >= len(self.source):  # the epoch's last batch was handed out
            return {"epoch": self._epoch + 1, "batch": 0}
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["batch"]))

    # -- iteration -----------------------------------------------------------------------------

    def _build(self, epoch: int, batch: int):
        # Imported here: the plugin loads torch-side DALI pieces only when a loader runs.
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.close()
        self.source.start_epoch, self.source.start_batch = epoch, batch
        s = dict(self._settings, device_id=self.device_id)
        if self.train:
            pipe, names = train_pipeline(self.source, self.source.names, vsm=self.vsm, **s), OUTPUTS
        else:
            pipe, names = eval_pipeline(self.source, self.source.names, **s), EVAL_OUTPUTS
        try:  # the iterator runs the first batches at once (prefetch)
            self._iterator = DALIGenericIterator(pipe, list(names), auto_reset=True,
                                                 last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as exc:
            self._data_error(exc)

    def __iter__(self):
        if not self._exact:  # the last epoch was abandoned part-way: go on with the next one
            self._epoch, self._batch, self._exact = self._epoch + 1, 0, True
        epoch, start = self._epoch, self._batch
        if self._iterator is None or self._next != (epoch, start):
            self._build(epoch, start)
        self._next = None  # until the epoch completes, the live pipeline's position is unknown
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int):
        k = 0
        while True:
            try:
                out = next(self._iterator)
            except StopIteration:
                break
            except RuntimeError as exc:  # DALI's decoders stop the pipeline on a bad file
                self._data_error(exc)
            # Handed out: a later iter() without set_epoch() starts the next epoch.
            k += 1
            self._batch, self._exact = start + k, False
            yield self._wrap(out[0])
        # Complete: the iterator has reset and the pipeline continues with the next epoch.
        self._epoch, self._batch, self._exact = epoch + 1, 0, True
        self._next = (epoch + 1, 0)

    def _data_error(self, exc: Exception):
        """Name the file that stopped the pipeline: the recent batches' files, checked again."""
        recent = [p for batch in self.source.recent for p in batch]
        self.close()
        for path in recent:
            reason = why_unreadable(path)
            if reason is not None:
                raise DataError(f"{path}: {reason}; it was readable when the split was written: "
                                "replace or remove it and write the split again") from None
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith(("Error", "DataError", "Assert"))),
                   lines[-1] if lines else type(exc).__name__)[:200]
        raise DataError(f"the DALI pipeline stopped ({why}) on one of {len(recent)} files read "
                        f"last ({', '.join(recent[:2])}, ...): run `dali-erkt check-data`") from None

    def _wrap(self, d: dict):
        images = d["images"].permute(0, 3, 1, 2)  # NHWC memory = channels-last NCHW, no copy
        labels = d["labels"].long()
        if self.train:
            batch = Batch(images, labels, d["partner_labels"].long(), d["mix_weight"].float(),
                          d["indices"].long())
        else:
            batch = Batch(images, labels, labels, torch.zeros_like(labels, dtype=torch.float32),
                          d["indices"].long())
        if self.fields is None:
            return batch
        return tuple(getattr(batch, f) for f in self.fields)

    def close(self) -> None:
        """Release the pipeline (its threads and memory); the loader can still be iterated."""
        if self._iterator is not None:
            del self._iterator
            self._iterator = None
            self._next = None

    def __enter__(self) -> "DaliLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
