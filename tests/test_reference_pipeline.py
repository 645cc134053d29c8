"""bench/reference.py: the reference DALI pipeline (DALI's own random operators, fn.readers.file)
that the benchmark measures the plan-driven pipeline against. Its pixels are not the plan's; the
checks are that every unit does its work, gated as configured, on the CPU, and that the GPU
variant's graph is defined (building it needs a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_erkt.config import UNITS, default_config, vsm_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reference as bench_reference  # noqa: E402  (bench/reference.py)

S, B = 32, 8
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        img[:20] = img[:20] // 2  # not flat, not symmetric
        out.append(folder / f"{i:02d}.png")
        Image.fromarray(img).save(out[-1])
    return out


def first_batch(paths, vsm):
    loader = bench_reference.ReferenceDaliLoader(
        paths, list(range(len(paths))), vsm=vsm, image_size=S, batch_size=B, mean=MEAN, std=STD,
        dtype="float32", device_id=None, num_threads=1, seed=1)
    try:
        return next(iter(loader))
    finally:
        loader.close()


def pixels(images):
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (STD, MEAN))
    return images * std + mean


def test_batches_have_the_loader_shape(paths):
    batch = first_batch(paths, vsm_preset("erkt"))
    assert batch.images.shape == (B, 3, S, S) and batch.images.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    labels = batch.labels.tolist()  # the reader's shuffled order: distinct files
    assert batch.labels.dtype == torch.int64
    assert len(set(labels)) == B and set(labels) <= set(range(12))


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_changes_the_images(paths, unit):
    plain = first_batch(paths, vsm_preset("none"))
    vsm = vsm_preset("none")
    getattr(vsm, unit).p = 1.0
    out = first_batch(paths, vsm)
    changed = (out.images - plain.images).abs().flatten(1).amax(1) > 1e-3
    # CutMix may pair a sample with itself; every other unit changes every sample.
    assert changed.any() if unit == "cutmix" else changed.all(), unit


def test_grayscale_gate_selects_some_samples(paths):
    vsm = vsm_preset("none")
    vsm.grayscale.p = 0.5
    x = pixels(first_batch(paths, vsm).images)
    gray = ((x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 0.05)
    assert 0 < int(gray.sum()) < B  # a DALI conditional on a coin flip: some, not all


def test_erasing_fills_with_the_mean_colour(paths):
    vsm = vsm_preset("none")
    vsm.erasing.p = 1.0
    images = first_batch(paths, vsm).images
    assert ((images.abs() < 1e-5).all(dim=1).flatten(1).sum(1) > 0).all()  # 0 after normalising


@pytest.mark.parametrize("preset", ["erkt", "base"])
def test_gpu_graph_is_defined_without_cuda(paths, preset):
    cfg = default_config(preset)
    d = cfg.data
    pipe = bench_reference.reference_pipeline(
        paths, list(range(len(paths))), vsm=cfg.vsm, image_size=d.image_size, mean=d.mean,
        std=d.std, dtype=d.dtype, device_id=0, batch_size=d.batch_size, num_threads=1, prefetch=1)
    assert all(node.device == "gpu" for node in pipe._graph_out)
