"""The VSM as one DALI pipeline definition, for `device="gpu"` and `device="cpu"`.

Data flow: encoded bytes and the batch's plan come in through one external source (see
`source.py`); images are decoded (nvJPEG on the GPU, "mixed"), resized to the training size,
converted to float [0, 255], run through the nine units in the paper's order, and normalised to
fp16 (or fp32) HWC. An NHWC tensor is what PyTorch calls channels-last NCHW: `permute(0, 3, 1, 2)`
gives the model its input without a copy.

Gating, per sample, never by blending (blending computes every unit for every sample):
- a unit with 0 < p < 1 runs inside a DALI conditional (`if gate:`), so only the selected
  samples do the work; p = 1 runs unconditionally and p = 0 is left out of the graph;
- flips take per-sample `horizontal`/`vertical` arguments, erasing a per-sample box (an empty
  box erases nothing), CutMix per-sample paste lists (a sample pasting onto itself is unchanged).
All parameters are CPU inputs from the plan; only image data lives on the GPU.
"""
from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from ..config import Config

# torchvision's rgb_to_grayscale weights, so the twin and the pipeline agree.
LUMA = (0.2989, 0.587, 0.114)

# Names and order of the values the training source yields per batch.
TRAIN_INPUTS = (
    "encoded", "labels", "partner_labels", "mix_weight", "indices",
    "color_jitter", "brightness", "contrast", "saturation",
    "rotation", "angle", "hflip", "vflip", "grayscale", "autocontrast",
    "erase_anchor", "erase_shape", "resized_crop", "crop_start", "crop_end",
    "paste_ids", "paste_anchors", "paste_shapes",
)
EVAL_INPUTS = ("encoded", "labels", "indices")

# Plan values each unit reads. A unit with p = 0 is left out of the graph and p = 1 needs no gate,
# so the source computes only what the configured graph uses.
_UNIT_INPUTS = {
    "color_jitter": ("brightness", "contrast", "saturation"),
    "rotation": ("angle",),
    "hflip": ("hflip", "vflip"),
    "vflip": ("hflip", "vflip"),
    "grayscale": (),
    "autocontrast": (),
    "erasing": ("erase_anchor", "erase_shape"),
    "resized_crop": ("crop_start", "crop_end"),
    "cutmix": ("paste_ids", "paste_anchors", "paste_shapes"),
}
_GATED = {"color_jitter", "rotation", "grayscale", "autocontrast", "resized_crop"}


def train_inputs(cfg: Config) -> tuple[str, ...]:
    """The names the training source yields for this configuration, in TRAIN_INPUTS order."""
    used = set(TRAIN_INPUTS[:5])
    for unit, names in _UNIT_INPUTS.items():
        p = getattr(cfg.vsm, unit).p
        if p > 0:
            used.update(names)
            if p < 1 and unit in _GATED:
                used.add(unit)
    return tuple(k for k in TRAIN_INPUTS if k in used)
OUTPUTS = ("images", "labels", "partner_labels", "mix_weight", "indices")


def _luma(x):
    """HW1 gray image of an HWC float image (torchvision's weights)."""
    g = x[:, :, 0] * LUMA[0] + x[:, :, 1] * LUMA[1] + x[:, :, 2] * LUMA[2]
    return fn.expand_dims(g, axes=[2], new_axis_names="C")


def _clamp(x):
    return dmath.clamp(x, 0.0, 255.0)


def color_jitter(x, brightness, contrast, saturation):
    """torchvision's adjust_brightness, _contrast, _saturation, in that order, on [0, 255]."""
    x = _clamp(x * brightness)
    mean = fn.reductions.mean(_luma(x))  # one scalar per sample, as torchvision's contrast uses
    x = _clamp(x * contrast + mean * (1.0 - contrast))
    return _clamp(x * saturation + _luma(x) * (1.0 - saturation))


def grayscale(x):
    g = _luma(x)
    return fn.cat(g, g, g, axis=2)


def autocontrast(x):
    """Per-channel min/max stretch to [0, 255]; a flat channel stays as it is (torchvision)."""
    lo = fn.reductions.min(x, axes=[0, 1], keep_dims=True)
    hi = fn.reductions.max(x, axes=[0, 1], keep_dims=True)
    flat = fn.cast(hi == lo, dtype=types.FLOAT)
    scale = 255.0 / (hi - lo + flat * 255.0)  # flat channel: scale 1 ...
    lo = lo - lo * flat  # ... and offset 0
    return _clamp((x - lo) * scale)


def _gated(p: float, gate, unit, x):
    """Run `unit` on the samples whose gate is set; p = 1 and p = 0 need no conditional."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return unit(x)
    if gate:
        x = unit(x)
    return x


def vsm(x, inp: dict, cfg: Config, to_device):
    """The nine gated units on float [0, 255] HWC images `x`; `inp` holds the plan's nodes."""
    v, size = cfg.vsm, cfg.data.image_size
    fill = [255.0 * m for m in cfg.data.mean]  # erased pixels become 0 after normalisation
    x = _gated(v.color_jitter.p, inp.get("color_jitter"), lambda t: color_jitter(
        t, to_device(inp["brightness"]), to_device(inp["contrast"]), to_device(inp["saturation"])), x)
    x = _gated(v.rotation.p, inp.get("rotation"), lambda t: fn.rotate(
        t, angle=inp["angle"], interp_type=types.INTERP_NN, fill_value=0.0, keep_size=True), x)
    if v.hflip.p > 0 or v.vflip.p > 0:
        x = fn.flip(x, horizontal=inp["hflip"], vertical=inp["vflip"])
    x = _gated(v.grayscale.p, inp.get("grayscale"), grayscale, x)
    x = _gated(v.autocontrast.p, inp.get("autocontrast"), autocontrast, x)
    if v.erasing.p > 0:
        x = fn.erase(x, anchor=inp["erase_anchor"], shape=inp["erase_shape"], axis_names="HW",
                     fill_value=fill)
    crop = v.resized_crop.size
    x = _gated(v.resized_crop.p, inp.get("resized_crop"), lambda t: fn.resize(
        fn.resize(t, roi_start=inp["crop_start"], roi_end=inp["crop_end"], roi_relative=False,
                  size=[crop, crop], interp_type=types.INTERP_LINEAR, antialias=True),
        size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True), x)
    if v.cutmix.p > 0:
        x = fn.multi_paste(x, in_ids=inp["paste_ids"], in_anchors=inp["paste_anchors"],
                           shapes=inp["paste_shapes"], out_anchors=inp["paste_anchors"],
                           output_size=[size, size])
    return x


def _decode_resize(encoded, cfg: Config, gpu: bool):
    size = cfg.data.image_size
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True,
                     dtype=types.FLOAT)


def _normalize(x, cfg: Config):
    dtype = types.FLOAT16 if cfg.data.dtype == "float16" else types.FLOAT
    return fn.crop_mirror_normalize(x, dtype=dtype, output_layout="HWC",
                                    mean=[255.0 * m for m in cfg.data.mean],
                                    std=[255.0 * s for s in cfg.data.std])


def _pipeline_kwargs(cfg: Config, device_id, batch_size: int | None):
    return dict(batch_size=batch_size or cfg.data.batch_size, num_threads=cfg.data.num_threads,
                device_id=device_id, prefetch_queue_depth=cfg.data.prefetch,
                exec_dynamic=True)


def train_pipeline(source, cfg: Config, device_id: int | None, batch_size: int | None = None):
    """The augmenting pipeline; `device_id=None` builds the CPU variant."""
    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True, **_pipeline_kwargs(cfg, device_id, batch_size))
    def pipe():
        names = train_inputs(cfg)
        nodes = fn.external_source(source=source, num_outputs=len(names), batch=True,
                                   batch_info=True, parallel=False)
        inp = dict(zip(names, nodes))
        to_device = (lambda n: n.gpu()) if gpu else (lambda n: n)
        x = vsm(_decode_resize(inp["encoded"], cfg, gpu), inp, cfg, to_device)
        return (_normalize(x, cfg),) + tuple(to_device(inp[k]) for k in OUTPUTS[1:])

    return pipe()


def eval_pipeline(source, cfg: Config, device_id: int | None, batch_size: int | None = None):
    """Decode, resize and normalise only."""
    gpu = device_id is not None

    @pipeline_def(**_pipeline_kwargs(cfg, device_id, batch_size))
    def pipe():
        nodes = fn.external_source(source=source, num_outputs=len(EVAL_INPUTS), batch=True,
                                   batch_info=True, parallel=False)
        inp = dict(zip(EVAL_INPUTS, nodes))
        x = _normalize(_decode_resize(inp["encoded"], cfg, gpu), cfg)
        labels = inp["labels"].gpu() if gpu else inp["labels"]
        indices = inp["indices"].gpu() if gpu else inp["indices"]
        return x, labels, indices

    return pipe()


def plan_inputs(plan, size: int) -> dict[str, np.ndarray]:
    """The per-batch arrays the training pipeline reads, derived from a BatchPlan."""
    n = len(plan)
    g = plan.gates
    eb = plan.erase_box.astype(np.float32)
    cb = plan.crop_box.astype(np.float32)
    box = plan.cutmix_box.astype(np.int32)
    own = np.arange(n, dtype=np.int32)
    # Every sample pastes itself whole, then its partner's box over it (an empty box: no change).
    paste_ids = np.stack([own, plan.cutmix_perm.astype(np.int32)], axis=1)
    anchors = np.zeros((n, 2, 2), dtype=np.int32)
    anchors[:, 1] = box[:2]
    shapes = np.empty((n, 2, 2), dtype=np.int32)
    shapes[:, 0] = (size, size)
    shapes[:, 1] = box[2:]
    return {
        "color_jitter": g["color_jitter"], "brightness": plan.brightness,
        "contrast": plan.contrast, "saturation": plan.saturation,
        "rotation": g["rotation"], "angle": plan.angle,
        "hflip": g["hflip"].astype(np.int32), "vflip": g["vflip"].astype(np.int32),
        "grayscale": g["grayscale"], "autocontrast": g["autocontrast"],
        "erase_anchor": eb[:, :2].copy(), "erase_shape": eb[:, 2:].copy(),
        "resized_crop": g["resized_crop"], "crop_start": cb[:, :2].copy(),
        "crop_end": (cb[:, :2] + cb[:, 2:]).copy(),
        "paste_ids": paste_ids, "paste_anchors": anchors, "paste_shapes": shapes,
    }
