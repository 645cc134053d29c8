"""The augmentation plan: every random choice of the VSM, drawn on the host before DALI runs.

A sample's view is a pure function of (seed, epoch, dataset index): each parameter comes from a
counter-based generator (a splitmix64 hash of the key and a stream number), so the same key gives
the same view on the CPU and the GPU, after a resume, and in a later run, whatever batch the sample
lands in. CutMix is a per-batch choice keyed by (seed, epoch, rank, batch index). DALI's own random
operators cannot do this: their seed only sets an initial state and their draws cannot be read back.

Each unit's stream numbers and draw function are declared in `units.py` (UNIT_TABLE): this
module hashes keys, orders and shards samples, and assembles a batch's plan from the units' draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import VSMConfig
from .units import UNIT_TABLE

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


def draws(key: np.ndarray, streams) -> np.ndarray:
    """Uniform [0, 1) doubles of the given stream numbers for hashed keys (`hash_key(seed, epoch,
    index)`): shape (len(streams), len(key)).

    Hashing (seed, epoch, index) once and each stream on top keeps a batch's plan to a few
    vectorised passes (the plan is built on the host for every batch, so it must be cheap).
    """
    streams = np.asarray(streams, dtype=np.uint64).reshape(-1, 1) + _GOLDEN
    with np.errstate(over="ignore"):
        h = _mix(key[None, :] ^ streams)
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

    Gates are the units' coin flips (a per-batch unit's one flip, repeated). `values` holds the
    arrays the units' draws return, read as attributes: plan.brightness, contrast, saturation
    (color_jitter), angle (rotation), erase_box (erasing), crop_box (resized_crop), cutmix_perm,
    cutmix_box, cutmix_weight (cutmix). Boxes are (y, x, h, w) in pixels.
    """
    epoch: int
    batch: int
    indices: np.ndarray  # int64 dataset indices
    gates: dict  # unit name -> bool array
    values: dict  # array name -> array, from the units' draws

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def make_batch_plan(vsm: VSMConfig, image_size: int, seed: int, epoch: int, batch: int,
                    indices: np.ndarray, rank: int = 0) -> BatchPlan:
    """The plan of one batch of dataset `indices` (in batch order)."""
    idx = np.asarray(indices, dtype=np.int64)
    # Every per-sample unit's streams in one pass: its gate stream, then its parameter streams.
    streams = [(unit.gate_stream, *unit.streams) for unit in UNIT_TABLE if not unit.per_batch]
    u = draws(hash_key(seed, epoch, idx), [s for own in streams for s in own])
    gates, values, row = {}, {}, 0
    for unit in UNIT_TABLE:
        cfg = getattr(vsm, unit.name)
        if unit.per_batch:
            fire, drawn = unit.draw(cfg, _generator(seed, epoch, rank, batch, unit.gate_stream),
                                    image_size, len(idx))
            gates[unit.name] = np.full(len(idx), fire)
        else:
            gates[unit.name] = u[row] < cfg.p
            drawn = unit.draw(cfg, u[row + 1:row + 1 + len(unit.streams)], image_size,
                              gates[unit.name])
            row += 1 + len(unit.streams)
        values.update(drawn)
    return BatchPlan(epoch=epoch, batch=batch, indices=idx, gates=gates, values=values)
