"""The VSM's nine units, each declared once: `UNIT_TABLE`, one `Unit` record per unit.

A record holds everything about its unit: the stream numbers of its random draws, the draw
function that turns them into the plan's parameters, the pipeline inputs it reads, its DALI
operator, its torchvision twin and its preview text. `plan.py`, `source.py`, `pipeline.py`,
`reference.py` and `commands/preview.py` loop over the table.

Stream numbers are declared with each unit, never derived from its position, so inserting a unit
leaves every other unit's draws, and so its views, as they were. VIEWS_VERSION names the views:
bump it (and the digests in tests/test_views.py) when a change alters any view on purpose; it
keys the teacher cache.

A new unit: its dataclass and VSMConfig field in config.py, its record here (free stream numbers),
and, if it changes the default views, a new VIEWS_VERSION and digests in tests/test_views.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import nvidia.dali.math as dmath
import torch
import torchvision.transforms.v2.functional as F
from nvidia.dali import fn, types
from torchvision.transforms import InterpolationMode

from ..config import crop_size

VIEWS_VERSION = 1  # bump with any change to a view; tests/test_views.py records its digests


@dataclass(frozen=True)
class Unit:
    """One VSM unit; `name` is its VSMConfig field. The callables take the unit's own config.

    Per-sample units (`per_batch=False`): the gate is uniform stream `gate_stream` < p, and
    `draw(cfg, u, size, gate)` gets the rows of `streams` (u[k] is stream streams[k]).
    Per-batch units: `draw(cfg, rng, size, n)` gets a Philox generator keyed by (seed, epoch,
    rank, batch, gate_stream) and returns (the batch's one coin, values).
    Either way `draw` returns the unit's plan arrays, by name (they become BatchPlan attributes).

    `inputs` names the arrays `feed(plan, size)` gives the pipeline; a `conditional` unit with
    0 < p < 1 also gets its gate (input `name`) and `dali` runs inside a DALI conditional on it,
    any other unit's `dali` runs on every sample and reads per-sample inputs that leave the
    image alone where the gate is off. `dali(x, inp, cfg, size, mean, to_device)` works on float
    [0, 255] HWC images. `twin` is torchvision's version on [0, 1] CHW images, run where the gate
    fired: `twin(img, plan, i, cfg, size, mean)` per sample, `twin(images, plan, cfg, size,
    mean)` for a per-batch unit. `describe(plan, j, row_names)`: the preview's text for a sample
    j whose gate fired; `box(plan, j, size)`, where a unit has one, the box the preview outlines
    on that sample's final view ((y, x, h, w) in pixels, or None), drawn as `box_style`
    (matplotlib Rectangle keywords) and named in the grid's title as `box_legend`.
    """
    name: str
    gate_stream: int
    dali: Callable
    twin: Callable
    describe: Callable
    conditional: bool = True
    streams: range = range(0)
    draw: Callable = lambda cfg, u, size, gate: {}
    inputs: tuple[str, ...] = ()
    feed: Callable = lambda plan, size: {}
    per_batch: bool = False
    box: Callable | None = None
    box_style: dict = field(default_factory=dict)
    box_legend: str = ""


# --------------------------------------------------------------------------------------------
# Draws: torchvision's `get_params` rules (ColorJitter, RandomRotation, RandomErasing,
# RandomResizedCrop, v2.CutMix), so the twin replays a plan on identical parameters.
# --------------------------------------------------------------------------------------------

def _factor(u: np.ndarray, amount: float) -> np.ndarray:
    return (1.0 - amount + 2.0 * amount * u).astype(np.float32)


def _boxes(u: np.ndarray, size: int, cfg, erase: bool) -> tuple:
    """torchvision's box search, all attempts at once: the first attempt that fits wins.

    Attempt t reads rows 4t + (0 area, 1 log-ratio, 2 y, 3 x) of u.
    RandomErasing.get_params: h = sqrt(area * aspect), w = sqrt(area / aspect), must fit
    strictly (h < size, w < size). RandomResizedCrop.get_params: w = sqrt(area * aspect),
    h = sqrt(area / aspect), 0 < h, w <= size. Returns (boxes (n, 4) int32, found (n,) bool).
    """
    s = 4 * np.arange(cfg.attempts)
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


def _draw_jitter(cfg, u, size, gate) -> dict:
    return {"brightness": _factor(u[0], cfg.brightness), "contrast": _factor(u[1], cfg.contrast),
            "saturation": _factor(u[2], cfg.saturation)}


def _draw_angle(cfg, u, size, gate) -> dict:
    lo, hi = cfg.degrees
    return {"angle": (lo + (hi - lo) * u[0]).astype(np.float32)}  # degrees, counter-clockwise


def _draw_erase(cfg, u, size, gate) -> dict:
    """A fired erasing whose attempts found no fitting box leaves the image alone (empty box)."""
    box, _ = _boxes(u, size, cfg, erase=True)
    box[~gate] = 0
    return {"erase_box": box}  # (y, x, h, w) in pixels


def _draw_crop(cfg, u, size, gate) -> dict:
    box, found = _boxes(u, size, cfg, erase=False)
    box[~found] = _crop_fallback(size, cfg.ratio)
    return {"crop_box": box}


def _draw_cutmix(cfg, rng, size, n) -> tuple:
    """One coin, one lambda, one box and one partner permutation per batch; sample i receives a
    box from sample cutmix_perm[i], and its partner's label the weight pasted area / image area."""
    fire = bool(rng.random() < cfg.p) and n > 1
    lam = float(rng.beta(cfg.alpha, cfg.alpha))
    ry, rx = int(rng.integers(size)), int(rng.integers(size))
    perm = rng.permutation(n).astype(np.int64)
    if fire:
        box = np.array(cutmix_box(lam, ry, rx, size), dtype=np.int32)
    else:  # no partner: every sample keeps its own label (drawn anyway, so later draws stay put)
        box = np.zeros(4, dtype=np.int32)
        perm = np.arange(n, dtype=np.int64)
    weight = np.full(n, box[2] * box[3] / float(size * size), dtype=np.float32)
    return fire, {"cutmix_perm": perm, "cutmix_box": box, "cutmix_weight": weight}


# --------------------------------------------------------------------------------------------
# Pipeline inputs: the per-batch arrays each unit's DALI operator reads.
# --------------------------------------------------------------------------------------------

def _feed_jitter(plan, size) -> dict:
    return {"brightness": plan.brightness, "contrast": plan.contrast, "saturation": plan.saturation}


def _feed_flag(name: str) -> Callable:
    return lambda plan, size: {name: plan.gates[name].astype(np.int32)}


def _feed_erase(plan, size) -> dict:
    box = plan.erase_box.astype(np.float32)
    return {"erase_anchor": box[:, :2].copy(), "erase_shape": box[:, 2:].copy()}


def _feed_crop(plan, size) -> dict:
    box = plan.crop_box.astype(np.float32)
    return {"crop_start": box[:, :2].copy(), "crop_end": (box[:, :2] + box[:, 2:]).copy()}


def _feed_cutmix(plan, size) -> dict:
    """Every sample pastes itself whole, then its partner's box over it (an empty box: no change)."""
    n = len(plan)
    box = plan.cutmix_box.astype(np.int32)
    own = np.arange(n, dtype=np.int32)
    anchors = np.zeros((n, 2, 2), dtype=np.int32)
    anchors[:, 1] = box[:2]
    shapes = np.empty((n, 2, 2), dtype=np.int32)
    shapes[:, 0] = (size, size)
    shapes[:, 1] = box[2:]
    return {"paste_ids": np.stack([own, plan.cutmix_perm.astype(np.int32)], axis=1),
            "paste_anchors": anchors, "paste_shapes": shapes}


# --------------------------------------------------------------------------------------------
# DALI operators, on float [0, 255] HWC images.
#
# Each DALI operator is a pass over the whole batch, and on the CPU their costs differ widely
# (classic executor, 256 px float images, per image and operator: an arithmetic operator about
# 0.08 ms, dmath.clamp 0.5, min(max()) 0.15, a 3x3 coord_transform 0.8, a 1x3 one 0.3): the units
# use the cheap ones, with the same arithmetic as torchvision up to float rounding.
# --------------------------------------------------------------------------------------------

# torchvision's rgb_to_grayscale weights, so the twin and the pipeline agree.
LUMA = (0.2989, 0.587, 0.114)


def clamp255(x):
    return dmath.min(dmath.max(x, 0.0), 255.0)  # three times cheaper than dmath.clamp on the CPU


def _luma(x):
    """HW1 gray image of an HWC float image (torchvision's weights)."""
    return fn.coord_transform(x, M=list(LUMA))


def color_jitter(x, brightness, contrast, saturation):
    """torchvision's adjust_brightness, _contrast, _saturation, in that order, on [0, 255]."""
    x = dmath.min(x * brightness, 255.0)  # x >= 0 and a factor >= 0: only the upper bound bites
    # torchvision's contrast blends with the mean of the gray image: the luma of the channel means.
    mean = fn.coord_transform(fn.reductions.mean(x, axes=[0, 1], keep_dims=True), M=list(LUMA))
    x = clamp255(x * contrast + mean * (1.0 - contrast))
    return clamp255(x * saturation + _luma(x) * (1.0 - saturation))


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
    return clamp255((x - lo) * scale)


def _dali_jitter(x, inp, cfg, size, mean, to_device):
    return color_jitter(x, to_device(inp["brightness"]), to_device(inp["contrast"]),
                        to_device(inp["saturation"]))


def _dali_rotate(x, inp, cfg, size, mean, to_device):
    return fn.rotate(x, angle=inp["angle"], interp_type=types.INTERP_NN, fill_value=0.0,
                     keep_size=True)


# One flip per unit: with both on, one pass more than a single fn.flip with both flags (measured
# on the CPU, 256 px, 2 threads: about 0.3 against 0.45 ms per image for both flips).
def _dali_hflip(x, inp, cfg, size, mean, to_device):
    return fn.flip(x, horizontal=inp["hflip"], vertical=0)


def _dali_vflip(x, inp, cfg, size, mean, to_device):
    return fn.flip(x, horizontal=0, vertical=inp["vflip"])


def _dali_erase(x, inp, cfg, size, mean, to_device):
    """Erased pixels get the mean colour: 0 after normalisation."""
    return fn.erase(x, anchor=inp["erase_anchor"], shape=inp["erase_shape"], axis_names="HW",
                    fill_value=[255.0 * m for m in mean])


def _dali_crop(x, inp, cfg, size, mean, to_device):
    crop = crop_size(cfg, size)
    x = fn.resize(x, roi_start=inp["crop_start"], roi_end=inp["crop_end"], roi_relative=False,
                  size=[crop, crop], interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.resize(x, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)


def _dali_cutmix(x, inp, cfg, size, mean, to_device):
    return fn.multi_paste(x, in_ids=inp["paste_ids"], in_anchors=inp["paste_anchors"],
                          shapes=inp["paste_shapes"], out_anchors=inp["paste_anchors"],
                          output_size=[size, size])


# --------------------------------------------------------------------------------------------
# torchvision twins, on [0, 1] CHW float tensors.
# --------------------------------------------------------------------------------------------

def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    return F.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _twin_jitter(img, plan, i, cfg, size, mean):
    img = F.adjust_brightness(img, float(plan.brightness[i]))
    img = F.adjust_contrast(img, float(plan.contrast[i]))
    return F.adjust_saturation(img, float(plan.saturation[i]))


def _twin_rotate(img, plan, i, cfg, size, mean):
    return F.rotate(img, float(plan.angle[i]), interpolation=InterpolationMode.NEAREST, fill=0.0)


def _twin_erase(img, plan, i, cfg, size, mean):
    y, x, h, w = (int(v) for v in plan.erase_box[i])
    if h == 0 or w == 0:
        return img
    return F.erase(img, y, x, h, w, torch.tensor(mean, dtype=img.dtype).view(3, 1, 1))


def _twin_crop(img, plan, i, cfg, size, mean):
    y, x, h, w = (int(v) for v in plan.crop_box[i])
    crop = crop_size(cfg, size)
    img = F.resized_crop(img, y, x, h, w, [crop, crop], interpolation=InterpolationMode.BILINEAR,
                         antialias=True)
    return resize(img, size)


def _twin_cutmix(images, plan, cfg, size, mean):
    y, x, h, w = (int(v) for v in plan.cutmix_box)
    if h == 0 or w == 0:
        return images
    out = images.clone()
    out[:, :, y:y + h, x:x + w] = images[torch.as_tensor(plan.cutmix_perm), :, y:y + h, x:x + w]
    return out


# --------------------------------------------------------------------------------------------
# Preview text of a fired unit.
# --------------------------------------------------------------------------------------------

def _text(s: str) -> Callable:
    return lambda plan, j, row_names: s


def _describe_jitter(plan, j, row_names) -> str:
    return f"jitter b{plan.brightness[j]:.2f} c{plan.contrast[j]:.2f} s{plan.saturation[j]:.2f}"


def _describe_erase(plan, j, row_names) -> str:
    h, w = plan.erase_box[j, 2:]
    return f"erase {w}x{h}" if h and w else "erase (no box fits)"


def _erase_box_shown(plan, j: int, size: int):
    """The erased box in the final view: a resized crop after erasing moves and scales it (None
    where no box fitted or the crop left the erased area out)."""
    y, x, h, w = (float(v) for v in plan.erase_box[j])
    if not (h and w):
        return None
    if plan.gates["resized_crop"][j]:
        cy, cx, ch, cw = (float(v) for v in plan.crop_box[j])
        y0, x0 = max(y, cy), max(x, cx)
        y1, x1 = min(y + h, cy + ch), min(x + w, cx + cw)
        if y1 <= y0 or x1 <= x0:
            return None
        y, x, h, w = (y0 - cy) * size / ch, (x0 - cx) * size / cw, (y1 - y0) * size / ch, (x1 - x0) * size / cw
    return y, x, h, w


def _describe_cutmix(plan, j, row_names) -> str:
    k = int(plan.cutmix_perm[j])
    partner = "self (unchanged)" if k == j else row_names[int(plan.indices[k])]
    return f"cutmix <- {partner} {plan.cutmix_weight[j]:.0%}"


# --------------------------------------------------------------------------------------------
# The table, in pipeline order (the paper's Table 1; the VSMConfig field order).
# Streams: gates 0-15; jitter 16-18; angle 20; erasing 32-95 and crop 96-159 (4 per attempt,
# up to 16 attempts). CutMix's Philox key 9 is a separate key space.
# --------------------------------------------------------------------------------------------

UNIT_TABLE: tuple[Unit, ...] = (
    Unit("color_jitter", gate_stream=0, streams=range(16, 19), draw=_draw_jitter,
         inputs=("brightness", "contrast", "saturation"), feed=_feed_jitter, dali=_dali_jitter,
         twin=_twin_jitter, describe=_describe_jitter),
    Unit("rotation", gate_stream=1, streams=range(20, 21), draw=_draw_angle, inputs=("angle",),
         feed=lambda plan, size: {"angle": plan.angle}, dali=_dali_rotate, twin=_twin_rotate,
         describe=lambda plan, j, row_names: f"rot {plan.angle[j]:+.0f}°"),
    Unit("hflip", gate_stream=2, conditional=False, inputs=("hflip",), feed=_feed_flag("hflip"),
         dali=_dali_hflip, twin=lambda img, *_: F.horizontal_flip(img), describe=_text("flip H")),
    Unit("vflip", gate_stream=3, conditional=False, inputs=("vflip",), feed=_feed_flag("vflip"),
         dali=_dali_vflip, twin=lambda img, *_: F.vertical_flip(img), describe=_text("flip V")),
    Unit("grayscale", gate_stream=4, dali=lambda x, *_: grayscale(x),
         twin=lambda img, *_: F.rgb_to_grayscale(img, num_output_channels=3),
         describe=_text("gray")),
    Unit("autocontrast", gate_stream=5, dali=lambda x, *_: autocontrast(x),
         twin=lambda img, *_: F.autocontrast(img), describe=_text("autocontrast")),
    Unit("erasing", gate_stream=6, conditional=False, streams=range(32, 96), draw=_draw_erase,
         inputs=("erase_anchor", "erase_shape"), feed=_feed_erase, dali=_dali_erase,
         twin=_twin_erase, describe=_describe_erase, box=_erase_box_shown,
         box_style={"ec": "cyan", "lw": 0.8}, box_legend="cyan = erased box"),
    Unit("resized_crop", gate_stream=7, streams=range(96, 160), draw=_draw_crop,
         inputs=("crop_start", "crop_end"), feed=_feed_crop, dali=_dali_crop, twin=_twin_crop,
         describe=lambda plan, j, row_names: f"crop {plan.crop_box[j, 3]}x{plan.crop_box[j, 2]}"),
    Unit("cutmix", gate_stream=9, per_batch=True, conditional=False, draw=_draw_cutmix,
         inputs=("paste_ids", "paste_anchors", "paste_shapes"), feed=_feed_cutmix,
         dali=_dali_cutmix, twin=_twin_cutmix, describe=_describe_cutmix,
         box=lambda plan, j, size: tuple(float(v) for v in plan.cutmix_box),
         box_style={"ec": "yellow", "lw": 1.2, "ls": "--"},
         box_legend="yellow dashed = CutMix box pasted from the named partner"),
)
