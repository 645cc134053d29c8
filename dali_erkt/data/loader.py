"""The loader: a split's epochs as torch batches, fed by the DALI pipeline. It behaves like a
torch `DataLoader`, so other KD code can use it as one:

    from dali_erkt import DaliLoader

    loader = DaliLoader(paths, labels, image_size=256, batch_size=30, device="cuda", preset="erkt")
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)      # or loader.set_epoch(epoch); optional, see below
        for images, labels, partner_labels, mix_weight, indices in loader:
            ...                              # images: N x 3 x H x W, channels-last, fp32

Epochs: each new `iter()` starts the next epoch, after a finished epoch or an abandoned one
(`break`); `set_epoch(e)` chooses the epoch explicitly. Every `iter()` is independent, as a
DataLoader's: it has its own pipeline and position, so two live iterators, `zip(loader, loader)`
and nested loops each get whole epochs. `state_dict()` / `load_state_dict()` hold (epoch, batch)
of the iterator made last (as torchdata's StatefulDataLoader), for a resume inside an epoch.
`len(loader)` is the epoch's batch count, always; a resumed epoch yields
`len(loader) - state["batch"]` of them. A pipeline that completes an epoch goes on prefetching
the next one and is kept for the next `iter()` that starts there; a start anywhere else builds
a pipeline there.
"""
from __future__ import annotations

import copy
import os
import weakref
from typing import NamedTuple

import numpy as np
import torch

from ..config import VSMConfig, vsm_preset
from ..errors import ConfigError, DataError
from ..runtime import Runtime, process_group, resolve_device
from .dataset import why_unreadable
from .pipeline import EVAL_OUTPUTS, OUTPUTS, eval_pipeline, train_pipeline
from .source import EpochSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The image dtypes, by torch dtype or name. DALI has no bfloat16: a bf16 loader runs the fp32
# pipeline and converts each batch where it lies (on the GPU for a CUDA loader).
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
           "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
           "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_PIPELINE_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def resolve_shard(rank: int | None, world: int | None) -> tuple[int, int]:
    """rank and world as DistributedSampler takes them: explicit values win, None reads the
    process group's. An explicit world other than the group's (world=1: every process reads
    the whole split) makes the default rank 0."""
    group_rank, group_world = process_group()
    world = group_world if world is None else int(world)
    if rank is None:
        rank = group_rank if world == group_world else 0
    rank = int(rank)
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is outside world {world}")
    return rank, world


def class_indices(labels, paths, num_classes: int | None, classes) -> tuple[np.ndarray, list[str]]:
    """The labels as int64 class indices and the class names, checked: every label an integer
    in [0, num_classes). num_classes comes from `num_classes`, else `classes`, else the largest
    label + 1; names from `classes`, else "0", "1", ... The first bad label is named."""
    if classes is not None:
        classes = [str(c) for c in classes]
        if num_classes is not None and int(num_classes) != len(classes):
            raise DataError(f"num_classes={num_classes} but {len(classes)} class names: give one "
                            "name per class")
        num_classes = len(classes)
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise DataError(f"num_classes={num_classes!r}: give the number of classes (>= 1)")
    values = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if values.ndim != 1:
        raise DataError(f"labels of shape {values.shape}: give one class index per path")
    if values.dtype.kind not in "iu":  # numpy made them floats, strings or objects: find the first
        for i, y in enumerate(labels.tolist() if torch.is_tensor(labels) else list(labels)):
            if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)):
                raise DataError(f"label {y!r} of {paths[i]} (index {i}) is not an integer: labels "
                                "are class indices 0 .. num_classes - 1")
    values = values.astype(np.int64)
    negative = values < 0
    if num_classes is None and not negative.any():
        num_classes = int(values.max()) + 1
    bad = negative if num_classes is None else negative | (values >= int(num_classes))
    if bad.any():
        i = int(bad.argmax())
        where = "is negative" if num_classes is None else \
            f"is outside 0 .. {int(num_classes) - 1} ({int(num_classes)} classes)"
        raise DataError(f"label {int(values[i])} of {paths[i]} (index {i}) {where}: labels are "
                        "class indices; give num_classes= or classes= for the full class list")
    return values, classes if classes is not None else [str(k) for k in range(num_classes)]


class LoaderDataset:
    """`loader.dataset`: the loader's images listed as torchvision's ImageFolder lists them:
    `len` (every image, all ranks), `classes`, `class_to_idx`, `targets`, `samples` (path,
    class index). `dataset[i]` is `samples[i]`: the pixels come from iterating the loader."""

    def __init__(self, paths: list[str], targets: np.ndarray, classes: list[str]):
        self.targets = targets.tolist()
        self.samples = list(zip(paths, self.targets))
        self.classes = list(classes)
        self.class_to_idx = {name: k for k, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.samples[i]


class LoaderSampler:
    """`loader.sampler`, as DistributedSampler: `set_epoch(e)`, `len` (this rank's samples per
    epoch, the split padded by wrapping to a multiple of the world), `epoch`, `rank`,
    `num_replicas`, `shuffle`; iterating gives the next epoch's sample indices of this rank."""

    def __init__(self, loader: "DaliLoader"):
        self._loader = loader
        self.rank, self.num_replicas = loader.source.rank, loader.source.world
        self.shuffle = loader.source.shuffle

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iter() of the loader yields."""
        return self._loader._start()[0]

    def __len__(self) -> int:
        return self._loader.source.per_rank

    def __iter__(self):
        return iter(self._loader.source.order(self.epoch).tolist())


class LoaderBatchSampler:
    """`loader.batch_sampler`, as torch's BatchSampler: `sampler`, `batch_size`, `drop_last`,
    `len` (batches per epoch); iterating gives the next epoch's batches as index lists."""

    def __init__(self, loader: "DaliLoader", sampler: LoaderSampler):
        self._loader, self.sampler = loader, sampler
        self.batch_size, self.drop_last = loader.batch_size, loader.drop_last

    def __len__(self) -> int:
        return len(self._loader.source)

    def __iter__(self):
        source, epoch = self._loader.source, self.sampler.epoch
        return iter([source.batch_indices(epoch, b).tolist() for b in range(len(source))])


class _Pipeline:
    """A DALI iterator, the source copy it reads, and the (epoch, batch) it yields next."""

    def __init__(self, dali, source: EpochSource, position: tuple[int, int]):
        self.dali, self.source, self.next = dali, source, position


class _Iterator:
    """One `iter(loader)`: its own pipeline and position; the pipeline is freed with it (at the
    end of its epoch kept by the loader for the next iter() that starts where it goes on)."""

    def __init__(self, loader: "DaliLoader", epoch: int, start: int, pipe: _Pipeline):
        self._loader, self.epoch, self.start, self._pipe, self._taken = loader, epoch, start, pipe, 0

    def __iter__(self) -> "_Iterator":
        return self

    def __next__(self):
        pipe = self._pipe
        if pipe is None:
            raise StopIteration
        try:
            out = next(pipe.dali)
        except StopIteration:
            self._pipe = None
            pipe.next = (self.epoch + 1, 0)  # auto_reset: the pipeline goes on with the next epoch
            self._loader._finished(self, pipe)
            raise
        except RuntimeError as exc:  # DALI's decoders stop the pipeline on a bad file
            self._pipe = None
            self._loader._data_error(exc, pipe.source)
        self._taken += 1
        self._loader._handed_out(self)
        return self._loader._wrap(out[0])

    def close(self) -> None:
        """Free the pipeline; the iterator yields nothing more."""
        self._pipe = None


class DaliLoader:
    """Batches of one split. `train=True`: shuffled, augmented by `preset`; otherwise every image
    once, in order, the last batch partial.

    Arguments are plain values: `preset` names the VSM settings ("none": resize and normalise
    only, the default; "erkt": the paper's full VSM, the engine's default; "base": its ablation
    baseline), `vsm` gives them whole and wins; `cutmix=False` leaves the paste out of the graph
    (partner_labels == labels, mix_weight == 0); `dtype` float32 (default), float16 or bfloat16;
    `normalize=False` gives uint8 images; `fields=("images", "labels")` yields plain tuples of
    just those fields. DataLoader's keywords: `shuffle` (None: as `train`), `num_workers` (the
    DALI threads, like `num_threads`; 0 means 1), `pin_memory` (accepted, no effect), `drop_last`
    (training only). `rank` / `world` default to the process group's. Labels are checked against
    `num_classes` / `classes` (both optional).
    """

    def __init__(self, paths, labels, *, image_size: int = 256, batch_size: int = 30,
                 train: bool = True, shuffle: bool | None = None, device="cuda",
                 preset: str = "none", vsm: VSMConfig | None = None, cutmix: bool = True,
                 dtype=torch.float32, normalize: bool = True, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, num_threads: int | None = None, num_workers: int | None = None,
                 pin_memory: bool = False, prefetch: int = 2, seed: int = 0,
                 rank: int | None = None, world: int | None = None, fields=None,
                 drop_last: bool = True, num_classes: int | None = None, classes=None):
        if len(paths) != len(labels):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels: give one label per path")
        if not len(paths):
            raise DataError("the loader got no images")
        paths = [str(p) for p in paths]
        targets, class_names = class_indices(labels, paths, num_classes, classes)
        rank, world = resolve_shard(rank, world)
        if fields is not None and not set(fields) <= set(Batch._fields):
            raise DataError(f"fields {tuple(fields)}: choose from {', '.join(Batch._fields)}")
        self.device_id = device_id_of(device)
        self.device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        try:
            self.dtype = _TORCH_DTYPE[_DTYPES[torch.float32 if dtype is None else dtype]]
        except (KeyError, TypeError):
            raise DataError(f"dtype {dtype!r}: use torch.float32, torch.float16 or torch.bfloat16") from None
        vsm = copy.deepcopy(vsm) if vsm is not None else vsm_preset(preset)
        if not cutmix:
            vsm.cutmix.p = 0.0
        self.fields = None if fields is None else tuple(fields)
        _refuse_dropped_mix_fields(self.fields, vsm.cutmix.p if train else 0.0)
        self.num_workers = _threads(num_threads, num_workers)
        self.pin_memory = bool(pin_memory)  # no effect: see the class docstring and the README
        self.batch_size = batch_size
        self.train = train
        dtype_name = _DTYPES[self.dtype]
        self._convert = self.dtype if _PIPELINE_DTYPE[dtype_name] != dtype_name else None
        self._settings = dict(image_size=image_size, mean=tuple(mean), std=tuple(std),
                              dtype=_PIPELINE_DTYPE[dtype_name], normalize=normalize,
                              batch_size=batch_size, num_threads=self.num_workers, prefetch=prefetch)
        self.source = EpochSource(paths, targets, batch_size=batch_size, train=train,
                                  vsm=vsm if train else None, image_size=image_size, seed=seed,
                                  rank=rank, world=world, drop_last=drop_last, shuffle=shuffle)
        self.vsm = vsm
        if len(self.source) == 0:
            raise DataError(f"{self.source.per_rank} training images make no full batch of "
                            f"{batch_size}: lower the batch size")
        self.drop_last = self.source.drop_last
        self.dataset = LoaderDataset(paths, targets, class_names)
        self.sampler = LoaderSampler(self)
        self.batch_sampler = LoaderBatchSampler(self, self.sampler)
        self.from_split_file = False  # set by from_split: errors then point at the split
        self._epoch, self._batch = 0, 0  # the position after the last batch handed out
        # True when the position was set (set_epoch, load_state_dict) or an epoch completed; False
        # after a batch was handed out, so an abandoned epoch is followed by the next one.
        self._exact = True
        self._latest = None  # a weak reference to the iterator that moves the position
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._idle: _Pipeline | None = None  # a pipeline that completed an epoch, kept for reuse

    @classmethod
    def from_config(cls, paths, labels, cfg, *, device, train: bool = True, seed: int | None = None,
                    rank: int = 0, world: int = 1, batch_size: int | None = None,
                    classes=None) -> "DaliLoader":
        """The loader a run's configuration describes: its VSM settings, data.dtype and the
        rank / world given (0 / 1 by default: the whole split, as the engine evaluates), all
        passed explicitly. `device`: a device, or the run's `Runtime`: its device, and its
        `dali_threads` where resolved (in place of data.num_threads)."""
        d = cfg.data
        threads = d.num_threads
        if isinstance(device, Runtime):
            device, threads = device.device, device.dali_threads or d.num_threads
        return cls(paths, labels, image_size=d.image_size, batch_size=batch_size or d.batch_size,
                   train=train, device=device, vsm=cfg.vsm, dtype=d.dtype, mean=d.mean, std=d.std,
                   num_threads=threads, prefetch=d.prefetch,
                   seed=cfg.run.seed if seed is None else seed, rank=rank, world=world,
                   drop_last=d.drop_last, classes=classes)

    @classmethod
    def from_split(cls, split, part: str, cfg, *, device, train: bool, seed: int | None = None,
                   rank: int = 0, world: int = 1, batch_size: int | None = None) -> "DaliLoader":
        """The loader of one part ("train" or "test") of a `Split`, as `from_config` builds it
        (`device`: a device or the run's `Runtime`), with the split's class names. `train` has
        no default: the train part is also evaluated (`evaluate --part train`)."""
        loader = cls.from_config(split.paths(part), split.labels(part), cfg, device=device,
                                 train=train, seed=seed, rank=rank, world=world,
                                 batch_size=batch_size, classes=split.classes)
        loader.from_split_file = True
        return loader

    # -- position ------------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        return len(self.source)

    def __len__(self) -> int:
        """Batches per epoch, also during a resumed epoch (which yields len - state["batch"])."""
        return len(self.source)

    def _start(self) -> tuple[int, int]:
        """(epoch, batch) the next iter() starts at."""
        return (self._epoch, self._batch) if self._exact else (self._epoch + 1, 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iter() yields `epoch` from batch `start_batch` on. Iterators made before go
        on with their own epochs and no longer move the loader's position."""
        if not 0 <= start_batch < len(self.source):
            raise DataError(f"start_batch {start_batch} is outside the epoch's {len(self.source)} batches")
        if epoch < 0:
            raise DataError(f"epoch {epoch} must be >= 0")
        self._epoch, self._batch, self._exact = int(epoch), int(start_batch), True
        self._latest = None

    def state_dict(self) -> dict:
        """{"epoch", "batch"}: the position after the last batch handed out by the iterator made
        last (or the position set); loading it into a new loader resumes there."""
        if self._batch >= len(self.source):  # the epoch's last batch was handed out
            return {"epoch": self._epoch + 1, "batch": 0}
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["batch"]))

    # -- iteration -----------------------------------------------------------------------------

    def _build(self, epoch: int, batch: int) -> _Pipeline:
        # Imported here: the plugin loads torch-side DALI pieces only when a loader runs.
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        source = self.source.positioned(epoch, batch)
        s = dict(self._settings, device_id=self.device_id)
        if self.train:
            pipe, names = train_pipeline(source, source.names, vsm=self.vsm, **s), OUTPUTS
        else:
            pipe, names = eval_pipeline(source, source.names, **s), EVAL_OUTPUTS
        try:  # the iterator runs the first batches at once (prefetch)
            dali = DALIGenericIterator(pipe, list(names), auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as exc:
            self._data_error(exc, source)
        return _Pipeline(dali, source, (epoch, batch))

    def __iter__(self) -> _Iterator:
        epoch, start = self._start()
        self._epoch, self._batch, self._exact = epoch, start, True
        pipe, self._idle = self._idle, None
        if pipe is None or pipe.next != (epoch, start):
            del pipe  # a kept pipeline that goes on elsewhere is freed before the new one is built
            pipe = self._build(epoch, start)
        it = _Iterator(self, epoch, start, pipe)
        self._live.add(it)
        self._latest = weakref.ref(it)
        return it

    def _is_latest(self, it: _Iterator) -> bool:
        return self._latest is not None and self._latest() is it

    def _handed_out(self, it: _Iterator) -> None:
        """A batch was handed out: a later iter() without set_epoch() starts the next epoch."""
        if self._is_latest(it):
            self._batch, self._exact = it.start + it._taken, False

    def _finished(self, it: _Iterator, pipe: _Pipeline) -> None:
        """`it` completed its epoch: its pipeline is kept if the next iter() starts where it
        goes on, else freed."""
        if self._is_latest(it):
            self._epoch, self._batch, self._exact = it.epoch + 1, 0, True
        if pipe.next == self._start():
            self._idle = pipe

    def _data_error(self, exc: Exception, source: EpochSource):
        """Name the file that stopped the pipeline: the recent batches' files, checked again."""
        recent = [p for batch in source.recent for p in batch]
        for path in recent:
            reason = why_unreadable(path)
            if reason is not None:
                if self.from_split_file:
                    raise DataError(f"{path}: {reason}; it was readable when the split was written: "
                                    "replace or remove it and write the split again") from None
                raise DataError(f"{path}: {reason}: replace it, or leave it out of the paths "
                                "given to the loader") from None
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith(("Error", "DataError", "Assert"))),
                   lines[-1] if lines else type(exc).__name__)[:200]
        raise DataError(f"the DALI pipeline stopped ({why}) on one of {len(recent)} files read "
                        f"last ({', '.join(recent[:2])}, ...): run `dali-erkt check-data` on "
                        "their folder") from None

    def _wrap(self, d: dict):
        images = d["images"].permute(0, 3, 1, 2)  # NHWC memory = channels-last NCHW, no copy
        if self._convert is not None:  # bfloat16: converted where the batch lies, layout kept
            images = images.to(self._convert)
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
        """Release every pipeline (threads and memory) and end the live iterators; the loader can
        still be iterated, from where it stands."""
        for it in list(self._live):
            it.close()
        self._idle = None

    def __enter__(self) -> "DaliLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _refuse_dropped_mix_fields(fields, cutmix_p: float) -> None:
    """CutMix gives each sample part of another image: its target is labels mixed with
    partner_labels by mix_weight. Fields that keep `labels` but drop either would train on wrong
    targets without a word; fields without labels (images and indices, for pure KD) are fine."""
    if fields is None or cutmix_p <= 0 or "labels" not in fields:
        return
    dropped = [f for f in ("partner_labels", "mix_weight") if f not in fields]
    if dropped:
        raise DataError(f"fields {fields} drop {' and '.join(dropped)}, but CutMix (p = {cutmix_p:g}) "
                        "pastes another image into training samples, so labels alone are wrong "
                        "targets: pass cutmix=False, or keep partner_labels and mix_weight")


def _threads(num_threads: int | None, num_workers: int | None) -> int:
    """The DALI threads: `num_threads`, or DataLoader's `num_workers` (0, DataLoader's
    main-process loading, is one thread), else up to 4 of the cores."""
    if num_threads is not None and num_workers is not None and max(1, num_workers) != num_threads:
        raise DataError(f"num_threads={num_threads} and num_workers={num_workers} both set the "
                        "DALI threads: give one")
    if num_threads is not None:
        return int(num_threads)
    if num_workers is not None:
        return max(1, int(num_workers))
    return max(1, min(4, os.cpu_count() or 1))
