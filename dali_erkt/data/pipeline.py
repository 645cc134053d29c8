"""The VSM as one DALI pipeline definition, for `device="gpu"` and `device="cpu"`.

Data flow: file paths and the batch's plan come in through one external source (see
`source.py`); files are read in DALI's threads (`fn.io.file.read`), images are decoded (nvJPEG on the GPU, "mixed"), resized to the training size,
converted to float [0, 255], run through the nine units in the paper's order, and normalised to
fp16 (or fp32) HWC. An NHWC tensor is what PyTorch calls channels-last NCHW: `permute(0, 3, 1, 2)`
gives the model its input without a copy. Without normalisation the output is uint8 HWC.

Gating, per sample, never by blending (blending computes every unit for every sample):
- a unit with 0 < p < 1 runs inside a DALI conditional (`if gate:`), so only the selected
  samples do the work; p = 1 runs unconditionally and p = 0 is left out of the graph;
- flips take per-sample `horizontal`/`vertical` arguments, erasing a per-sample box (an empty
  box erases nothing), CutMix per-sample paste lists (a sample pasting onto itself is unchanged).
All parameters are CPU inputs from the plan; only image data lives on the GPU.

Both functions take plain values; `names` are the source's outputs, in order (`source.names`).
"""
from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from ..config import VSMConfig, crop_size

# torchvision's rgb_to_grayscale weights, so the twin and the pipeline agree.
LUMA = (0.2989, 0.587, 0.114)
OUTPUTS = ("images", "labels", "partner_labels", "mix_weight", "indices")
EVAL_OUTPUTS = ("images", "labels", "indices")

# Each DALI operator is a pass over the whole batch, and on the CPU their costs differ widely
# (classic executor, 256 px float images, per image and operator: an arithmetic operator about
# 0.08 ms, dmath.clamp 0.5, min(max()) 0.15, a 3x3 coord_transform 0.8, a 1x3 one 0.3): the units
# use the cheap ones, with the same arithmetic as torchvision up to float rounding.


def _clamp(x):
    return dmath.min(dmath.max(x, 0.0), 255.0)  # three times cheaper than dmath.clamp on the CPU


def _luma(x):
    """HW1 gray image of an HWC float image (torchvision's weights)."""
    return fn.coord_transform(x, M=list(LUMA))


def color_jitter(x, brightness, contrast, saturation):
    """torchvision's adjust_brightness, _contrast, _saturation, in that order, on [0, 255]."""
    x = dmath.min(x * brightness, 255.0)  # x >= 0 and a factor >= 0: only the upper bound bites
    # torchvision's contrast blends with the mean of the gray image: the luma of the channel means.
    mean = fn.coord_transform(fn.reductions.mean(x, axes=[0, 1], keep_dims=True), M=list(LUMA))
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


def vsm_units(x, inp: dict, v: VSMConfig, size: int, mean, to_device):
    """The nine gated units on float [0, 255] HWC images `x`; `inp` holds the plan's nodes."""
    fill = [255.0 * m for m in mean]  # erased pixels become 0 after normalisation
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
    crop = crop_size(v.resized_crop, size)
    x = _gated(v.resized_crop.p, inp.get("resized_crop"), lambda t: fn.resize(
        fn.resize(t, roi_start=inp["crop_start"], roi_end=inp["crop_end"], roi_relative=False,
                  size=[crop, crop], interp_type=types.INTERP_LINEAR, antialias=True),
        size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True), x)
    if v.cutmix.p > 0:
        x = fn.multi_paste(x, in_ids=inp["paste_ids"], in_anchors=inp["paste_anchors"],
                           shapes=inp["paste_shapes"], out_anchors=inp["paste_anchors"],
                           output_size=[size, size])
    return x


def _decode_resize(encoded, size: int, gpu: bool):
    """Decode file bytes (nvJPEG's "mixed" decoder on the GPU) and resize to size x size, float."""
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True,
                     dtype=types.FLOAT)


def _finish(x, normalize: bool, mean, std, dtype: str):
    """Normalised fp16/fp32 HWC, or (normalize=False) uint8 HWC (DALI's cast rounds to nearest)."""
    if not normalize:
        return fn.cast(_clamp(x), dtype=types.UINT8)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT,
                                    output_layout="HWC", mean=[255.0 * m for m in mean],
                                    std=[255.0 * s for s in std])


def dynamic_executor(gpu: bool) -> bool:
    """DALI's dynamic executor (its default) on the GPU, where the pipeline was measured with it;
    the classic executor on the CPU. On the CPU the dynamic one gave every operator's output fresh
    memory each batch: about 300-600 page faults and 0.6-1.5 ms of kernel time per 256 px image,
    against 0-40 and 0.1 ms with the classic one, which reuses its buffers; and an arithmetic
    operator cost about 0.3 ms per image against 0.08 (2 cores, bench/RESULTS.md). Page faults
    taken by many threads at once contend in the kernel: a likely part of why the CPU pipeline
    did not scale to 16 threads."""
    return gpu


def _external(source, names):
    nodes = fn.external_source(source=source, num_outputs=len(names), batch=True,
                               batch_info=True, parallel=False)
    return dict(zip(names, nodes))


def _to_gpu(node):
    return node.gpu()


def _as_is(node):
    return node


def train_pipeline(source, names, *, vsm: VSMConfig, image_size: int, mean, std, dtype: str,
                   normalize: bool, device_id: int | None, batch_size: int, num_threads: int,
                   prefetch: int):
    """The augmenting pipeline; `device_id=None` builds the CPU variant."""
    gpu = device_id is not None
    to_device = _to_gpu if gpu else _as_is

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id, prefetch_queue_depth=prefetch,
                  exec_dynamic=dynamic_executor(gpu))
    def pipe():
        inp = _external(source, names)
        x = vsm_units(_decode_resize(fn.io.file.read(inp["path"]), image_size, gpu), inp, vsm,
                      image_size, mean, to_device)
        return (_finish(x, normalize, mean, std, dtype),) + tuple(to_device(inp[k]) for k in OUTPUTS[1:])

    return pipe()


def eval_pipeline(source, names, *, image_size: int, mean, std, dtype: str, normalize: bool,
                  device_id: int | None, batch_size: int, num_threads: int, prefetch: int):
    """Decode, resize and normalise only."""
    gpu = device_id is not None
    to_device = _to_gpu if gpu else _as_is

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_dynamic=dynamic_executor(gpu))
    def pipe():
        inp = _external(source, names)
        x = _finish(_decode_resize(fn.io.file.read(inp["path"]), image_size, gpu), normalize, mean,
                    std, dtype)
        return x, to_device(inp["labels"]), to_device(inp["indices"])

    return pipe()
