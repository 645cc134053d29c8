"""The reference DALI pipeline of issue 9: the VSM's nine units driven by DALI's own random
operators (`fn.random.*`, `fn.batch_permutation`) and read by `fn.readers.file`, with no plan and
no Python source of file bytes. It is what the plan-driven pipeline (dali_erkt/data/pipeline.py)
is measured against: `loader.dali_reference_gpu` / `loader.dali_reference_cpu` in
bench/throughput.py, ratios `dali_vs_reference_gpu` / `_cpu` (plan-driven / reference).

Same work per image as the plan-driven pipeline, not the same pixels: the same decode (mixed on
the GPU, CPU otherwise), resize to the training size in float, the nine units in the paper's
order with the configured probabilities and sizes, gated the same way (a DALI conditional for
0 < p < 1, unconditional for p = 1, left out for p = 0; flips per-sample arguments; erasing a
per-sample box; CutMix per-sample paste lists), and the same normalisation to fp16/fp32 HWC.
Where DALI has an operator of its own for a unit it is used (brightness_contrast, saturation,
rotate, flip, erase, random_resized_crop, multi_paste); autocontrast has none, so it is the same
min/max stretch. Parameters follow the VSM's ranges; erasing and CutMix draw one box each (no
retries), sized as the plan sizes them. Benchmark code, not library code.
"""
from __future__ import annotations

import math

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from dali_erkt.config import VSMConfig, crop_size
from dali_erkt.data.loader import Batch
from dali_erkt.data.pipeline import _decode_resize, _finish, dynamic_executor
from dali_erkt.data.units import autocontrast

READER = "Reader"


def _gated(p: float, unit, x):
    """`unit` on the samples a DALI coin flip selects; p = 1 unconditionally, p = 0 not at all."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return unit(x)
    if fn.random.coin_flip(probability=p, dtype=types.BOOL):
        x = unit(x)
    return x


def _factor(amount: float):
    return fn.random.uniform(range=[max(0.0, 1.0 - amount), 1.0 + amount])


def _box(size: int, area_range, log_ratio_range):
    """(h, w) floats of a random box: area and log aspect ratio uniform, kept inside the image."""
    area = fn.random.uniform(range=[a * size * size for a in area_range])
    aspect = dmath.exp(fn.random.uniform(range=list(log_ratio_range)))
    h = dmath.clamp(dmath.sqrt(area * aspect), 1.0, size - 1.0)
    w = dmath.clamp(dmath.sqrt(area / aspect), 1.0, size - 1.0)
    return h, w


def _anchor(h, w, size: int):
    return fn.stack(fn.random.uniform(range=[0.0, 1.0]) * (size - h),
                    fn.random.uniform(range=[0.0, 1.0]) * (size - w))


def _cutmix(x, p: float, alpha: float, size: int, batch_size: int):
    """Each sample pastes itself whole, then a random partner's box (side sqrt(1 - lambda) of the
    image, lambda ~ Beta(alpha, alpha)); with p < 1 the box is empty where a coin says no."""
    lam = fn.random.beta(alpha=alpha, beta=alpha)
    side = fn.cast(dmath.floor(dmath.sqrt(1.0 - lam) * size), dtype=types.INT32)
    if p < 1.0:
        side = side * fn.cast(fn.random.coin_flip(probability=p), dtype=types.INT32)
    y = fn.cast(fn.random.uniform(range=[0.0, 1.0]) * (size - side), dtype=types.INT32)
    xx = fn.cast(fn.random.uniform(range=[0.0, 1.0]) * (size - side), dtype=types.INT32)
    # The sample's own position in the batch (a constant input) and a random partner.
    own = fn.external_source(source=lambda: [np.int32(i) for i in range(batch_size)], batch=True)
    ids = fn.stack(own, fn.batch_permutation())
    zero = xx * 0
    anchors = fn.stack(fn.stack(zero, zero), fn.stack(y, xx))
    full = zero + size
    shapes = fn.stack(fn.stack(full, full), fn.stack(side, side))
    return fn.multi_paste(x, in_ids=ids, in_anchors=anchors, shapes=shapes, out_anchors=anchors,
                          output_size=[size, size])


def reference_units(x, v: VSMConfig, size: int, mean, batch_size: int):
    """The nine units on float [0, 255] HWC images, every parameter from DALI's random operators."""
    cj = v.color_jitter
    x = _gated(cj.p, lambda t: fn.saturation(fn.brightness_contrast(
        t, brightness=_factor(cj.brightness), contrast=_factor(cj.contrast), contrast_center=128.0),
        saturation=_factor(cj.saturation)), x)
    x = _gated(v.rotation.p, lambda t: fn.rotate(
        t, angle=fn.random.uniform(range=list(v.rotation.degrees)), interp_type=types.INTERP_NN,
        fill_value=0.0, keep_size=True), x)
    if v.hflip.p > 0 or v.vflip.p > 0:
        x = fn.flip(x, horizontal=fn.random.coin_flip(probability=v.hflip.p),
                    vertical=fn.random.coin_flip(probability=v.vflip.p))
    x = _gated(v.grayscale.p, lambda t: fn.saturation(t, saturation=0.0), x)
    x = _gated(v.autocontrast.p, autocontrast, x)
    e = v.erasing
    if e.p > 0:
        h, w = _box(size, e.scale, (math.log(e.ratio[0]), math.log(e.ratio[1])))
        if e.p < 1:  # an empty box erases nothing
            on = fn.cast(fn.random.coin_flip(probability=e.p), dtype=types.FLOAT)
            h, w = h * on, w * on
        x = fn.erase(x, anchor=_anchor(h, w, size), shape=fn.stack(h, w), axis_names="HW",
                     fill_value=[255.0 * m for m in mean])
    rc = v.resized_crop
    crop = crop_size(rc, size)
    x = _gated(rc.p, lambda t: fn.resize(fn.random_resized_crop(
        t, size=[crop, crop], random_area=list(rc.scale), random_aspect_ratio=list(rc.ratio),
        num_attempts=rc.attempts, interp_type=types.INTERP_LINEAR, antialias=True),
        size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True), x)
    if v.cutmix.p > 0:
        x = _cutmix(x, v.cutmix.p, v.cutmix.alpha, size, batch_size)
    return x


def reference_pipeline(paths, labels, *, vsm: VSMConfig, image_size: int, mean, std, dtype: str,
                       device_id: int | None, batch_size: int, num_threads: int, prefetch: int,
                       seed: int = 0):
    """The reference training pipeline; `device_id=None` builds the CPU variant."""
    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id, prefetch_queue_depth=prefetch, seed=seed,
                  exec_dynamic=dynamic_executor(gpu))
    def pipe():
        encoded, label = fn.readers.file(files=[str(p) for p in paths], labels=list(labels),
                                         shuffle_after_epoch=True, seed=seed, name=READER)
        x = reference_units(_decode_resize(encoded, image_size, gpu), vsm, image_size, mean,
                            batch_size)
        return _finish(x, True, mean, std, dtype), label.gpu() if gpu else label

    return pipe()


class ReferenceDaliLoader:
    """The reference pipeline behind the loader interface the benchmark times: `Batch`es (images
    channels-last; labels; no CutMix partners), `set_epoch` (the reader keeps its own epochs),
    `close`."""

    def __init__(self, paths, labels, *, vsm: VSMConfig, image_size: int, batch_size: int, mean,
                 std, dtype: str, device_id: int | None, num_threads: int, prefetch: int = 2,
                 seed: int = 0):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        pipe = reference_pipeline(paths, labels, vsm=vsm, image_size=image_size, mean=mean,
                                  std=std, dtype=dtype, device_id=device_id, batch_size=batch_size,
                                  num_threads=num_threads, prefetch=prefetch, seed=seed)
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                             auto_reset=True,
                                             last_batch_policy=LastBatchPolicy.DROP)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        import torch
        for out in self._iterator:
            d = out[0]
            labels = d["labels"].view(-1).long()
            zeros = torch.zeros_like(labels)
            yield Batch(d["images"].permute(0, 3, 1, 2), labels, labels, zeros.float(), zeros)

    def close(self) -> None:
        self._iterator = None


def make_loader(kind: str, *, cfg, paths, labels, batch_size: int, threads: int, workers: int,
                device):
    """One of the loaders the benchmark compares, on the run's configuration: "dali" (the
    plan-driven DaliLoader), "reference" (the pipeline above) on `device` (a CUDA device or
    "cpu"), or "torchvision" (the twin's DataLoader with `workers` processes)."""
    import dataclasses

    from dali_erkt.data.loader import DaliLoader, device_id_of
    from dali_erkt.data.reference import ReferenceLoader
    d = cfg.data
    if kind == "dali":
        data = dataclasses.replace(d, num_threads=threads)
        return DaliLoader.from_config(paths, labels, dataclasses.replace(cfg, data=data),
                                      device=device, train=True, seed=0, batch_size=batch_size)
    if kind == "reference":
        return ReferenceDaliLoader(paths, labels, vsm=cfg.vsm, image_size=d.image_size,
                                   batch_size=batch_size, mean=d.mean, std=d.std, dtype=d.dtype,
                                   device_id=device_id_of(device), num_threads=threads,
                                   prefetch=d.prefetch)
    return ReferenceLoader(paths, labels, vsm=cfg.vsm, image_size=d.image_size,
                           batch_size=batch_size, mean=d.mean, std=d.std, seed=0, workers=workers,
                           drop_last=d.drop_last)
