"""The augmentation plan: every random choice of the VSM, drawn on the host before DALI runs.

A sample's view is a pure function of (seed, epoch, dataset index): each parameter comes from a
counter-based generator (a splitmix64 hash of the key and a stream number), so the same key gives
the same view on the CPU and the GPU, after a resume, and in a later run, whatever batch the sample
lands in. CutMix is a per-batch choice keyed by (seed, epoch, rank, batch index). DALI's own random
operators cannot do this: their seed only sets an initial state and their draws cannot be read back.

The sampling rules follow torchvision's `get_params` (ColorJitter, RandomRotation,
RandomErasing, RandomResizedCrop, v2.CutMix) so that `reference.py` can replay a plan with
torchvision and the tests can compare the two on identical parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import UNITS, VSMConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit hash with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_key(*parts) -> np.ndarray:
    """Hash integer key parts (scalars or arrays, broadcast together) to uint64."""
    with np.errstate(over="ignore"):
        arrays = np.broadcast_arrays(*[np.atleast_1d(np.asarray(p, dtype=np.int64)) for p in parts])
        h = np.zeros(arrays[0].shape, dtype=np.uint64)
        for a in arrays:
            h = _mix(h ^ (a.astype(np.uint64) + _GOLDEN))
        return h


def draws(seed: int, epoch: int, index: np.ndarray, n_streams: int) -> np.ndarray:
    """Uniform [0, 1) doubles of streams 0..n_streams-1: shape (n_streams, len(index)).

    Hashing (seed, epoch, index) once and each stream on top keeps a batch's plan to one
    vectorised pass (the plan is built on the host for every batch, so it must be cheap).
    """
    base = hash_key(seed, epoch, index)
    streams = np.arange(n_streams, dtype=np.uint64)[:, None] + _GOLDEN
    with np.errstate(over="ignore"):
        h = _mix(base[None, :] ^ streams)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(seed: int, epoch: int, index: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) doubles, one per index, for the given key and stream."""
    h = hash_key(seed, epoch, index, stream)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _generator(*parts) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=int(hash_key(*parts)[0])))


# --------------------------------------------------------------------------------------------
# Sample order per epoch, sharding, batch counts.
# --------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which the n samples are visited in `epoch` (a full permutation when shuffled)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return _generator(seed, epoch, -1).permutation(n).astype(np.int64)


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of an epoch: the order padded (by wrapping) to a multiple of `world`,
    then every world-th sample from `rank` on, as a contiguous array (DALI refuses strided data)."""
    if world == 1:
        return order
    pad = (-len(order)) % world
    if pad:
        order = np.concatenate([order, order[:pad]])
    return np.ascontiguousarray(order[rank::world])


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


# --------------------------------------------------------------------------------------------
# The plan of one batch.
# --------------------------------------------------------------------------------------------

@dataclass
class BatchPlan:
    """All parameters of one batch; arrays have one row per sample, in batch order.

    Boxes are (y, x, h, w) in pixels of the image_size x image_size image. Gates are the units'
    coin flips; a fired erasing whose ten attempts found no fitting box leaves the image alone
    (as torchvision does) and has an empty box.
    """
    epoch: int
    batch: int
    indices: np.ndarray  # int64 dataset indices
    gates: dict  # unit name -> bool array (cutmix: the batch's one flip, repeated)
    brightness: np.ndarray  # float32 factors
    contrast: np.ndarray
    saturation: np.ndarray
    angle: np.ndarray  # float32 degrees, counter-clockwise
    erase_box: np.ndarray  # int32 (B, 4)
    crop_box: np.ndarray  # int32 (B, 4)
    cutmix_perm: np.ndarray  # int64: sample i receives a box from sample cutmix_perm[i]
    cutmix_box: np.ndarray  # int32 (4,), the same box for the whole batch
    cutmix_weight: np.ndarray  # float32: the partner label's weight (pasted area / image area)

    def __len__(self) -> int:
        return len(self.indices)


# Stream numbers: one per drawn quantity, so adding a unit never shifts another's draws.
_S_GATE = 0  # + unit position (0..8)
_S_JITTER = 16  # + 0 brightness, 1 contrast, 2 saturation
_S_ANGLE = 20
_S_ERASE = 32  # + 4 * attempt + (0 area, 1 log-ratio, 2 y, 3 x); up to 16 attempts
_S_CROP = 96  # likewise


def _factor(u: np.ndarray, amount: float) -> np.ndarray:
    return (1.0 - amount + 2.0 * amount * u).astype(np.float32)


def _boxes(u: np.ndarray, size: int, cfg, first_stream: int, erase: bool) -> tuple:
    """torchvision's box search, all attempts at once: the first attempt that fits wins.

    RandomErasing.get_params: h = sqrt(area * aspect), w = sqrt(area / aspect), must fit
    strictly (h < size, w < size). RandomResizedCrop.get_params: w = sqrt(area * aspect),
    h = sqrt(area / aspect), 0 < h, w <= size. Returns (boxes (n, 4) int32, found (n,) bool).
    """
    t = np.arange(cfg.attempts)
    s = first_stream + 4 * t
    area = size * size * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[s])
    lo, hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[s + 1])
    long_ = np.round(np.sqrt(area * aspect)).astype(np.int64)
    short = np.round(np.sqrt(area / aspect)).astype(np.int64)
    h, w = (long_, short) if erase else (short, long_)
    if erase:
        ok = (h > 0) & (w > 0) & (h < size) & (w < size)
    else:
        ok = (h > 0) & (w > 0) & (h <= size) & (w <= size)
    y = np.floor(u[s + 2] * (size - h + 1)).astype(np.int64)
    x = np.floor(u[s + 3] * (size - w + 1)).astype(np.int64)
    first = ok.argmax(axis=0)
    cols = np.arange(u.shape[1])
    found = ok[first, cols]
    box = np.stack([y[first, cols], x[first, cols], h[first, cols], w[first, cols]], axis=1)
    box[~found] = 0
    return box.astype(np.int32), found


def _crop_fallback(size: int, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's centre crop when no attempt fits (square image)."""
    if ratio[0] > 1.0:
        h, w = int(round(size / ratio[0])), size
    elif ratio[1] < 1.0:
        h, w = size, int(round(size * ratio[1]))
    else:
        h, w = size, size
    return (size - h) // 2, (size - w) // 2, h, w


def cutmix_box(lam: float, ry: int, rx: int, size: int) -> tuple[int, int, int, int]:
    """torchvision v2.CutMix's box for lambda and centre (ry, rx), clipped to the image."""
    r = 0.5 * math.sqrt(1.0 - lam)
    half = int(r * size)
    y1, x1 = max(ry - half, 0), max(rx - half, 0)
    y2, x2 = min(ry + half, size), min(rx + half, size)
    return y1, x1, y2 - y1, x2 - x1


def make_batch_plan(vsm: VSMConfig, image_size: int, seed: int, epoch: int, batch: int,
                    indices: np.ndarray, rank: int = 0) -> BatchPlan:
    """The plan of one batch of dataset `indices` (in batch order)."""
    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx)
    u = draws(seed, epoch, idx, _S_CROP + 4 * max(vsm.resized_crop.attempts, 1))
    gates = {unit: u[_S_GATE + k] < getattr(vsm, unit).p for k, unit in enumerate(UNITS[:-1])}

    cj = vsm.color_jitter
    rot = vsm.rotation
    angle = rot.degrees[0] + (rot.degrees[1] - rot.degrees[0]) * u[_S_ANGLE]

    erase, _ = _boxes(u, image_size, vsm.erasing, _S_ERASE, erase=True)
    erase[~gates["erasing"]] = 0
    crop, found = _boxes(u, image_size, vsm.resized_crop, _S_CROP, erase=False)
    crop[~found] = _crop_fallback(image_size, vsm.resized_crop.ratio)

    # CutMix: one coin, one lambda, one box and one partner permutation per batch.
    g = _generator(seed, epoch, rank, batch, 9)
    fire = bool(g.random() < vsm.cutmix.p) and n > 1
    lam = float(g.beta(vsm.cutmix.alpha, vsm.cutmix.alpha))
    ry, rx = int(g.integers(image_size)), int(g.integers(image_size))
    perm = g.permutation(n).astype(np.int64)
    if fire:
        box = np.array(cutmix_box(lam, ry, rx, image_size), dtype=np.int32)
    else:  # no partner: every sample keeps its own label (drawn anyway, so later draws stay put)
        box = np.zeros(4, dtype=np.int32)
        perm = np.arange(n, dtype=np.int64)
    weight = np.full(n, box[2] * box[3] / float(image_size * image_size), dtype=np.float32)
    gates["cutmix"] = np.full(n, fire)

    return BatchPlan(
        epoch=epoch, batch=batch, indices=idx, gates=gates,
        brightness=_factor(u[_S_JITTER], cj.brightness),
        contrast=_factor(u[_S_JITTER + 1], cj.contrast),
        saturation=_factor(u[_S_JITTER + 2], cj.saturation),
        angle=angle.astype(np.float32), erase_box=erase, crop_box=crop,
        cutmix_perm=perm, cutmix_box=box, cutmix_weight=weight,
    )
