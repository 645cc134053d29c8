"""The VSM as one DALI pipeline definition, for `device="gpu"` and `device="cpu"`.

Data flow: file paths and the batch's plan come in through one external source (see
`source.py`); files are read in DALI's threads (`fn.io.file.read`), images are decoded (nvJPEG
on the GPU, "mixed"), resized to the training size, converted to float [0, 255], run through the
units of `units.UNIT_TABLE` in its order (the paper's), and normalised to fp16 (or fp32) HWC.
An NHWC tensor is what PyTorch calls channels-last NCHW: `permute(0, 3, 1, 2)` gives the model
its input without a copy. Without normalisation the output is uint8 HWC.

Gating, per sample, never by blending (blending computes every unit for every sample):
- a conditional unit with 0 < p < 1 runs inside a DALI conditional (`if gate:`), so only the selected
  samples do the work; p = 1 runs unconditionally and p = 0 is left out of the graph;
- the other units read per-sample inputs: a flip flag, an erasing box (an empty box erases
  nothing), CutMix paste lists (a sample pasting onto itself is unchanged).
All parameters are CPU inputs from the plan; only image data lives on the GPU.

Both functions take plain values; `names` are the source's outputs, in order (`source.names`).
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from ..config import VSMConfig
from .units import UNIT_TABLE, clamp255

OUTPUTS = ("images", "labels", "partner_labels", "mix_weight", "indices")
EVAL_OUTPUTS = ("images", "labels", "indices")


def _gated(p: float, gate, unit, x):
    """Run `unit` on the samples whose gate is set; p = 1 and p = 0 need no conditional, and a
    unit without a gate (None) runs on every sample."""
    if p <= 0.0:
        return x
    if p >= 1.0 or gate is None:
        return unit(x)
    if gate:
        x = unit(x)
    return x


def vsm_units(x, inp: dict, v: VSMConfig, size: int, mean, to_device):
    """The units on float [0, 255] HWC images `x`; `inp` holds the plan's nodes."""
    for unit in UNIT_TABLE:
        cfg = getattr(v, unit.name)
        gate = inp.get(unit.name) if unit.conditional else None
        x = _gated(cfg.p, gate, lambda t: unit.dali(t, inp, cfg, size, mean, to_device), x)
    return x


def _decode_resize(encoded, size: int, gpu: bool):
    """Decode file bytes (nvJPEG's "mixed" decoder on the GPU) and resize to size x size, float."""
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True,
                     dtype=types.FLOAT)


def _finish(x, normalize: bool, mean, std, dtype: str):
    """Normalised fp16/fp32 HWC, or (normalize=False) uint8 HWC (DALI's cast rounds to nearest)."""
    if not normalize:
        return fn.cast(clamp255(x), dtype=types.UINT8)
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
