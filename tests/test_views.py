"""Fingerprints of the views: the plan's draws and the CPU pipeline's pixels, hashed.

Whoever changes the views on purpose (a unit's arithmetic, a stream, a default p) bumps
VIEWS_VERSION in dali_erkt/data/units.py, which keys the teacher cache, and records the new
digests here next to the new version. A digest that changes with the version left alone means
the views changed by accident.
"""
from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest

from conftest import write_image_tree
from dali_erkt.config import UNITS, vsm_preset
from dali_erkt.data import plan as plan_module
from dali_erkt.data import units
from dali_erkt.data.loader import DaliLoader
from dali_erkt.data.plan import make_batch_plan

SIZE = 48
# The plan's arrays, by name: the same list before and after any refactor of BatchPlan.
PLAN_ARRAYS = ("indices", "brightness", "contrast", "saturation", "angle", "erase_box", "crop_box",
               "cutmix_perm", "cutmix_box", "cutmix_weight")


def vsm(name: str):
    """A preset; `half`: erkt with every unit's p at 0.5, so every unit fires on some samples."""
    if name != "half":
        return vsm_preset(name)
    v = vsm_preset("erkt")
    for unit in UNITS:
        getattr(v, unit).p = 0.5
    return v


def plan_digest(plan, h) -> None:
    for unit in UNITS:
        h.update(unit.encode() + np.ascontiguousarray(plan.gates[unit]).tobytes())
    for name in PLAN_ARRAYS:
        h.update(name.encode() + np.ascontiguousarray(getattr(plan, name)).tobytes())


def plans_digest(v) -> str:
    """Plans of 64 samples in batches of 16, two epochs, two seeds."""
    h = hashlib.sha256()
    idx = np.arange(64)
    for seed in (0, 5):
        for epoch in (0, 3):
            for b in range(4):
                plan_digest(make_batch_plan(v, SIZE, seed, epoch, b, idx[16 * b:16 * (b + 1)]), h)
    return h.hexdigest()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = write_image_tree(tmp_path_factory.mktemp("views"), {"a": 6, "b": 6}, size=(48, 48),
                            formats=("png",))
    return sorted(str(p) for p in root.rglob("*.png"))


def pixels_digest(paths, v, normalize: bool) -> str:
    """Two epochs of the CPU pipeline (batches of 4): images, labels, partners, mix weights."""
    loader = DaliLoader(paths, [i % 3 for i in range(len(paths))], image_size=SIZE, batch_size=4,
                        device="cpu", vsm=v, dtype="float32", normalize=normalize, num_threads=2,
                        prefetch=1, seed=11)
    h = hashlib.sha256()
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch in loader:
                for t in batch:
                    h.update(t.contiguous().numpy().tobytes())
    finally:
        loader.close()
    return h.hexdigest()


# Computed on the code before the unit table existed (and equal since). Whoever changes the views
# bumps units.VIEWS_VERSION and records the new version and digests here.
PLANS = {
    "erkt": "abb282c3468bf17a8de14352ef2bc922126c3faaca47afa0cc7ad68131aa2526",
    "base": "b3de9d836bd93243c04092e72d587f637547b99714d4ae3392769f4062dd24c3",
    "half": "8bb6d80b6087583bedfc2c6d3f9a223ae193daf3a463cece1f539ff17a568486",
}
PIXELS = {  # (preset, normalised fp32 or uint8)
    ("erkt", True): "a47a25567cbece250cd2ccb6343f3270f13de516356bbb8cdcfe069401f45376",
    ("half", True): "bd1d7e58baced8927be90680d4c87bc94976efc0a747f8e3abd094526e47ae77",
    ("half", False): "8849448bc7c87ce358092b920b40b8a920a63cbcf78dc2ae7d71daf12ae74f01",
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_fingerprint(name):
    assert (units.VIEWS_VERSION, plans_digest(vsm(name))) == (1, PLANS[name])


@pytest.mark.parametrize("key", sorted(PIXELS))
def test_pixel_fingerprint(paths, key):
    name, normalize = key
    assert (units.VIEWS_VERSION, pixels_digest(paths, vsm(name), normalize)) == (1, PIXELS[key])


# --------------------------------------------------------------------------------------------
# The unit table: one record per VSMConfig unit, streams of their own.
# --------------------------------------------------------------------------------------------

def test_table_lists_the_config_units_in_order_with_disjoint_streams():
    assert tuple(u.name for u in units.UNIT_TABLE) == UNITS
    owned = [s for u in units.UNIT_TABLE if not u.per_batch for s in (u.gate_stream, *u.streams)]
    assert len(owned) == len(set(owned))


def test_inserting_a_unit_leaves_every_other_units_draws_alone(monkeypatch):
    """A unit inserted mid-table, with streams of its own, shifts no other unit's draws."""
    v = vsm("half")
    before = [make_batch_plan(v, SIZE, 3, e, b, np.arange(16) + 16 * b)
              for e in (0, 2) for b in range(3)]
    v.dummy = types.SimpleNamespace(p=0.5)
    dummy = units.Unit("dummy", gate_stream=8, streams=range(200, 202),
                       draw=lambda cfg, u, size, gate: {"dummy_value": u[0] + u[1]},
                       dali=None, twin=None, describe=None)
    table = list(units.UNIT_TABLE)
    table.insert(table.index(next(u for u in table if u.name == "hflip")), dummy)
    monkeypatch.setattr(plan_module, "UNIT_TABLE", tuple(table))
    after = [make_batch_plan(v, SIZE, 3, e, b, np.arange(16) + 16 * b)
             for e in (0, 2) for b in range(3)]
    for a, b in zip(before, after):
        assert set(b.gates) == set(a.gates) | {"dummy"} and "dummy_value" in b.values
        assert b.gates["dummy"].any() and not b.gates["dummy"].all()
        for unit in UNITS:
            np.testing.assert_array_equal(a.gates[unit], b.gates[unit])
        for name in PLAN_ARRAYS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
