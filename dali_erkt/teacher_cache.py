"""The teacher logit cache: the teachers' work done once, replayed view by view.

Every augmented view is a pure function of (split, VSM and data settings, seed, epoch, position),
so the teachers' logits over a whole run are a pure function of those plus the teachers' weights,
the image size and the precision. The cache stores them once; a later run with the same views
(a sweep over `model.teacher_weights`, `model.combine` or the loss, another student, a rerun) reads
them instead of running the teachers.

Layout of a cache folder (no pickles):

    key.json                  what the logits depend on (a run with another key is refused)
    r<rank>-t<k>.f16          teacher k's fp16 logits for this rank's positions, epoch-major:
                              (epochs, positions per epoch, classes), grown an epoch at a time
    r<rank>-test.f16          every teacher's logits on the test split (K, images, classes)
    r<rank>.json              the epochs whose rows are complete (written after the rows)

Each member's logits are stored, not the ensemble's: the combination (weights, `combine`) is
applied at replay. An epoch is marked complete only after all its rows are on disk, so a cache
killed half-way goes on from the last complete epoch and a partial epoch is never read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .config import Config, to_dict
from .data.dataset import Split, split_digests
from .data.plan import num_batches, shard
from .data.units import VIEWS_VERSION
from .errors import ConfigError, DataError
from .io import atomic_write, atomic_write_text, file_sha256, make_folder, writing

ROW_DTYPE = np.float16


def cache_key(cfg: Config, split: Split, teacher_checkpoints, precision: str, device_type: str,
              channels_last: bool, world: int) -> dict:
    """Everything a cached logit depends on (and nothing a sweep may change)."""
    return {
        **split_digests(split),  # split_sha256 (train list and classes), test_sha256
        **config_key(cfg, precision, device_type, channels_last, world),
        "teacher_sha256": [file_sha256(p) for p in teacher_checkpoints],
        "versions": _versions(),
    }


def config_key(cfg: Config, precision: str, device_type: str, channels_last: bool, world: int) -> dict:
    """The part of the cache key that a run's configuration and runtime decide (all but the split,
    the teachers' checkpoints and the code's versions): runs of one split and one set of teacher
    checkpoints can share a cache exactly when these agree (`sweep` names its caches from them)."""
    d = cfg.data
    return {
        "vsm": to_dict(cfg.vsm), "seed": cfg.run.seed, "image_size": d.image_size,
        "batch_size": d.batch_size, "drop_last": d.drop_last, "mean": list(d.mean),
        "std": list(d.std), "dtype": d.dtype,
        "precision": precision, "device": device_type, "channels_last": channels_last,
        "world": world, "teachers": list(cfg.model.teachers),
    }


def _versions() -> dict:
    """The code that makes the views and runs the teachers: the views' own version (bumped with
    any change to a view, units.py), and the libraries' (a new version may round otherwise)."""
    import nvidia.dali
    import timm
    import torch
    return {"views": VIEWS_VERSION, "dali": nvidia.dali.__version__, "torch": torch.__version__,
            "timm": timm.__version__}


CACHE_ADVICE = "free some space, or choose a writable --teacher-cache folder"


class TeacherCache:
    """One rank's view of a cache folder."""

    def __init__(self, folder, key: dict, *, teachers: int, positions: int, classes: int,
                 rank: int = 0):
        self.folder = Path(folder)
        self.key, self.rank = key, rank
        self.shape = (teachers, positions, classes)  # one epoch's rows
        make_folder(self.folder, CACHE_ADVICE)
        saved = self.folder / "key.json"
        if saved.exists():
            old = _read_json(saved, dict, "a mapping of the settings the logits depend on")
            for field in sorted(set(old) | set(key)):
                if old.get(field) != key.get(field):
                    raise ConfigError(f"teacher cache {self.folder} was filled with another {field} "
                                      f"({_short(old.get(field))} vs {_short(key.get(field))} now): "
                                      "use another --teacher-cache folder for these settings")
        elif any(self.folder.glob("r*")):  # rows without a key are stale by definition
            raise DataError(f"teacher cache {self.folder} holds logit files but no key.json, so what "
                            "they were computed from is unknown: delete the folder or use another "
                            "--teacher-cache folder")
        elif rank == 0:
            atomic_write_text(saved, json.dumps(key, indent=1) + "\n")
        self._status = self.folder / f"r{rank}.json"
        self._done = self._read_status() if self._status.exists() else set()

    def _read_status(self) -> set:
        """The epochs r<rank>.json marks complete, each checked to be held whole by every row file."""
        status = _read_json(self._status, dict, '{"complete": [epochs]}')
        done = status.get("complete")
        if not isinstance(done, list) or not all(isinstance(e, int) and not isinstance(e, bool)
                                                 and e >= 0 for e in done):
            raise _damaged(self._status, f"'complete' is {_short(done)}, not a list of epochs")
        for k in range(self.shape[0]):
            have = self._file(k).stat().st_size if self._file(k).exists() else 0
            for epoch in done:
                if have < (epoch + 1) * self._epoch_bytes():
                    raise _damaged(self._file(k), f"{self._status.name} marks epoch {epoch + 1} "
                                   f"complete but the file holds {have} bytes, not the "
                                   f"{(epoch + 1) * self._epoch_bytes()} that needs")
        return set(done)

    # -- training rows ----------------------------------------------------------------------

    def _file(self, k: int) -> Path:
        return self.folder / f"r{self.rank}-t{k}.f16"

    def _epoch_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * np.dtype(ROW_DTYPE).itemsize

    def complete(self, epoch: int) -> bool:
        return epoch in self._done

    def read_epoch(self, epoch: int) -> np.ndarray:
        """(teachers, positions, classes) fp16 rows of a complete epoch."""
        if not self.complete(epoch):
            raise DataError(f"teacher cache {self.folder} has no complete epoch {epoch + 1}")
        out = np.empty(self.shape, dtype=ROW_DTYPE)
        for k in range(self.shape[0]):
            rows = np.memmap(self._file(k), dtype=ROW_DTYPE, mode="r", offset=epoch * self._epoch_bytes(),
                             shape=self.shape[1:])
            out[k] = rows
            del rows
            if not np.isfinite(out[k]).all():
                raise _damaged(self._file(k), f"epoch {epoch + 1} holds NaN or infinite logits")
        return out

    def write_epoch(self, epoch: int, rows: np.ndarray) -> None:
        """Store an epoch's rows, then mark it complete (a kill in between leaves it unmarked)."""
        if rows.shape != self.shape:
            raise ValueError(f"rows {rows.shape} do not fit the cache's {self.shape}")
        need = (epoch + 1) * self._epoch_bytes()
        for k in range(self.shape[0]):
            path = self._file(k)
            with writing(path, CACHE_ADVICE):
                with open(path, "ab"):
                    pass
                if os.path.getsize(path) < need:
                    os.truncate(path, need)  # grow by whole epochs (sparse until written)
                out = np.memmap(path, dtype=ROW_DTYPE, mode="r+", offset=epoch * self._epoch_bytes(),
                                shape=self.shape[1:])
                out[:] = rows[k]
                out.flush()
                del out
        self._done.add(epoch)
        atomic_write_text(self._status, json.dumps({"complete": sorted(self._done)}) + "\n")

    # -- the test split ---------------------------------------------------------------------

    def read_test(self) -> np.ndarray | None:
        path = self.folder / f"r{self.rank}-test.f16"
        meta = self.folder / f"r{self.rank}-test.json"
        if not (path.exists() and meta.exists()):
            return None
        shape = _read_json(meta, dict, '{"shape": [teachers, images, classes]}').get("shape")
        k, c = self.shape[0], self.shape[2]
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) for v in shape)
                and shape[0] == k and shape[2] == c and shape[1] > 0):
            raise _damaged(meta, f"'shape' is {_short(shape)}, not [{k}, images, {c}]")
        rows = np.fromfile(path, dtype=ROW_DTYPE)
        if rows.size != shape[0] * shape[1] * shape[2]:
            raise _damaged(path, f"it holds {rows.size} values, not the {shape} {meta.name} names")
        if not np.isfinite(rows).all():
            raise _damaged(path, "it holds NaN or infinite logits")
        return rows.reshape(shape)

    def write_test(self, logits: np.ndarray) -> None:
        atomic_write(self.folder / f"r{self.rank}-test.f16",
                     lambda tmp: logits.astype(ROW_DTYPE).tofile(tmp))
        atomic_write_text(self.folder / f"r{self.rank}-test.json",
                          json.dumps({"shape": list(logits.shape)}) + "\n")


def cache_bytes(epochs: int, positions: int, classes: int, teachers: int) -> int:
    """Bytes of `epochs` epochs of rows (per rank)."""
    return epochs * positions * classes * teachers * np.dtype(ROW_DTYPE).itemsize


def check_space(folder, need: int) -> None:
    """Refuse, in one line, a cache the disk under `folder` cannot hold."""
    folder = Path(folder)
    probe = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ConfigError(f"the teacher cache needs {need / 1e9:.2f} GB but {probe} has "
                          f"{free / 1e9:.2f} GB free: choose another --teacher-cache folder")


def _read_json(path: Path, kind: type, what: str):
    """A JSON file of the cache, or one line naming it and what is wrong."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"not readable JSON ({(str(exc).splitlines() or [''])[0][:60]})") from None
    if not isinstance(value, kind):
        raise _damaged(path, f"it holds a {type(value).__name__}, not {what}")
    return value


def _damaged(path: Path, why: str) -> DataError:
    return DataError(f"teacher cache file {path} is damaged ({why}): delete the cache folder (it is "
                     "filled again) or use another --teacher-cache folder")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def positions_per_epoch(n_train: int, batch_size: int, drop_last: bool, rank: int, world: int) -> int:
    """The training views one rank sees per epoch (its batches times the batch size)."""
    per_rank = len(shard(np.arange(n_train), rank, world))
    return num_batches(per_rank, batch_size, drop_last) * batch_size


def open_cache(folder, cfg: Config, split: Split, teacher_checkpoints, rt, epochs: int, log) -> TeacherCache:
    """The run's cache in `folder`: keyed, sized, and checked against the free disk."""
    key = cache_key(cfg, split, teacher_checkpoints, rt.precision, rt.device.type, rt.channels_last,
                    rt.world)
    positions = positions_per_epoch(len(split.train), cfg.data.batch_size, cfg.data.drop_last,
                                    rt.rank, rt.world)
    k, c = len(cfg.model.teachers), len(split.classes)
    cache = TeacherCache(folder, key, teachers=k, positions=positions, classes=c, rank=rt.rank)
    missing = sum(1 for e in range(epochs) if not cache.complete(e))
    need = cache_bytes(missing, positions, c, k)
    log(f"teacher cache {folder}: {epochs} epochs x {positions} views x {c} classes x {k} teachers "
        f"x 2 bytes = {cache_bytes(epochs, positions, c, k) / 1e6:.1f} MB per process; "
        f"{epochs - missing} epochs there, {need / 1e6:.1f} MB to write")
    check_space(folder, need)
    return cache
