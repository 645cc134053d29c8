"""`models`: the paper's Table 8, parameters, MACs and inference time of the student, each teacher,
the ensemble and any timm model named.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode`, which counts a convolution or
matmul as 2 FLOPs per multiply-accumulate: its total is halved, giving MACs as the paper and timm
state them ("FLOPs" in the paper). Only convolutions and matmuls count (not BatchNorm, activations
or pooling). Weights are random (nothing is fetched): counts and times do not depend on them.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from ..models import TeacherEnsemble, count_parameters, create_model
from ..runtime import resolve_device

# The paper states EfficientNet-B3's cost at its native 300 px (Table 8's 1.8 G).
PAPER_SIZES = (("efficientnet_b3", 300),)
PAPER_TEACHERS = ("efficientnet_b3", "efficientnet_b0", "resnet50")
PAPER_IMAGES, CPU_IMAGES = 6300, 64  # Table 8 times 6,300 images
MACS_NOTE = ("GMACs: multiply-accumulates (FLOPs as the paper and timm count them) = "
             "torch.utils.flop_counter FLOPs / 2; convolutions and matmuls only")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward on one image (FlopCounterMode's FLOPs / 2).

    Counted on the meta device (shapes only, no arithmetic); `model` is moved there, so call it
    last. A model that cannot run on meta is counted on the CPU instead.
    """
    model.eval()
    try:
        meta = model.to("meta")
        x = torch.empty(1, 3, image_size, image_size, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta(x)
    except (RuntimeError, NotImplementedError):
        model = model.to_empty(device="cpu")  # values do not change the count
        x = torch.zeros(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return counter.get_total_flops() // 2


@torch.inference_mode()
def time_model(model: nn.Module, image_size: int, device: torch.device, *, images: int,
               batch_size: int, runs: int = 20, warmup: int = 3) -> dict:
    """Batch-1 latency (median of `runs` after `warmup`), and the time for `images` images in
    batches of `batch_size` after one warm-up batch."""
    model = model.eval().to(device)
    one = torch.randn(1, 3, image_size, image_size, device=device)
    for _ in range(warmup):
        model(one)
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        model(one)
        _sync(device)
        times.append(time.perf_counter() - start)
    batch = torch.randn(batch_size, 3, image_size, image_size, device=device)
    model(batch)  # warm-up at the batched shape
    _sync(device)
    start = time.perf_counter()
    left = images
    while left > 0:
        model(batch[:min(left, batch_size)])
        left -= batch_size
    _sync(device)
    seconds = time.perf_counter() - start
    return {"latency_ms": 1000 * statistics.median(times), "images_per_s": images / seconds,
            "seconds_for_n": seconds}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def models_table(archs_extra: Sequence[str] = (), *, image_size: int = 224, device: str = "cpu",
                 images: int | None = None, batch_size: int = 32, student: str = "efficientnet_b0",
                 teachers: Sequence[str] = PAPER_TEACHERS,
                 teacher_weights: Sequence[float] = (0.4, 0.3, 0.3), num_classes: int = 1000,
                 at_sizes: Sequence[tuple[str, int]] = PAPER_SIZES, timing: bool = True,
                 latency_runs: int = 20, warmup: int = 3, note=None) -> dict:
    """Rows (name, role, image_size, params_m, gmacs, latency_ms, images_per_s, seconds_for_n)
    for the student, each teacher, the ensemble, each extra timm name, and each (arch, size) of
    `at_sizes` (by default EfficientNet-B3 at 300 px, the size of the paper's figure); plus
    metadata. Timing fields are None with `timing=False`. `images` (the N timed in batches)
    defaults to the paper's 6,300 on a GPU and to 64 on the CPU."""
    dev = resolve_device(device)
    if images is None:
        images = PAPER_IMAGES if dev.type == "cuda" else CPU_IMAGES
    for name, value in (("image size", image_size), ("images", images), ("batch size", batch_size),
                        ("latency runs", latency_runs), ("number of classes", num_classes)):
        if int(value) < 1:
            raise ConfigError(f"{name} {value} must be at least 1")
    for size in (image_size, *(s for _, s in at_sizes)):
        if int(size) < 16:
            raise ConfigError(f"image size {size} is too small for these CNNs: use 16 or more")
    archs = [student, *teachers, *archs_extra, *(a for a, _ in at_sizes)]
    for arch in archs:
        if not timm.is_model(arch):
            create_model(arch, num_classes)  # raises the one-line error with suggestions
    done: dict[tuple[str, int], dict] = {}  # an arch measured once per size (B0: student, teacher)

    def measure(name: str, role: str, build, size: int, key=None) -> dict:
        if key in done:
            return {**done[key], "name": name, "role": role}
        if note:
            note(f"measuring {name} at {size} px" + (f" on {dev}" if timing else ""))
        model = build()
        row = {"name": name, "role": role, "image_size": size,
               "params_m": count_parameters(model) / 1e6,
               "latency_ms": None, "images_per_s": None, "seconds_for_n": None}
        if timing:
            row.update(time_model(model, size, dev, images=images, batch_size=batch_size,
                                  runs=latency_runs, warmup=warmup))
        row["gmacs"] = count_macs(model.cpu(), size) / 1e9
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if key is not None:
            done[key] = row
        return row

    def one(arch):
        return lambda: create_model(arch, num_classes)

    rows = [measure(student, "student", one(student), image_size, (student, image_size))]
    rows += [measure(t, "teacher", one(t), image_size, (t, image_size)) for t in teachers]
    ensemble = lambda: TeacherEnsemble([create_model(t, num_classes) for t in teachers],
                                       teacher_weights)
    rows.append(measure("ensemble(" + "+".join(teachers) + ")", "ensemble", ensemble, image_size))
    rows += [measure(a, "other", one(a), image_size, (a, image_size)) for a in archs_extra]
    rows += [measure(f"{a} @{s}", "at size", one(a), int(s), (a, int(s))) for a, s in at_sizes]

    notes = [MACS_NOTE]
    teacher_macs = {r["name"]: r["gmacs"] for r in rows if r["role"] == "teacher"}
    resized = {a: next(r["gmacs"] for r in rows if r["name"] == f"{a} @{int(s)}")
               for a, s in at_sizes if a in teacher_macs and int(s) != image_size}
    if resized:
        total = sum(resized.get(t, teacher_macs[t]) for t in teachers)
        sizes = ", ".join(f"{a} at {s} px" for a, s in at_sizes if a in resized)
        paper = tuple(teachers) == PAPER_TEACHERS and image_size == 224
        notes.append(f"ensemble with {sizes}, the others at {image_size} px: {total:.2f} GMACs "
                     f"(sum of its members{'; the paper states 6.3 G' if paper else ''})")
    return {"rows": rows, "device": str(dev), "device_name": _device_name(dev),
            "torch": torch.__version__, "timm": timm.__version__, "image_size": image_size,
            "num_classes": num_classes, "images": images if timing else None,
            "batch_size": batch_size if timing else None,
            "latency_runs": latency_runs if timing else None, "notes": notes}


def parse_at(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """`--at ARCH@SIZE` values as (arch, size) pairs."""
    out = []
    for value in values:
        arch, _, size = value.partition("@")
        if not arch or not size.isdigit():
            raise ConfigError(f"--at {value!r}: write ARCH@SIZE, e.g. efficientnet_b3@300")
        out.append((arch, int(size)))
    return tuple(out)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    """The table as aligned text, with what it was measured on and how."""
    n = result.get("images")
    head = ["model", "role", "px", "params (M)", "GMACs", "latency b1 (ms)", "images/s",
            f"s for {n} images" if n else "s for N images"]
    body = [[r["name"], r["role"], str(r["image_size"]), _cell(r["params_m"], ".2f"),
             _cell(r["gmacs"], ".2f"), _cell(r["latency_ms"], ".1f"),
             _cell(r["images_per_s"], ".1f"), _cell(r["seconds_for_n"], ".2f")]
            for r in result["rows"]]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *map(line, body), ""]
    where = f"device: {result['device']} ({result['device_name']}); torch {result['torch']}, " \
            f"timm {result['timm']}; {result['num_classes']} classes, random weights"
    if n:
        where += (f"; latency: median of {result['latency_runs']} batch-1 runs; throughput: "
                  f"{n} images in batches of {result['batch_size']}, fp32")
    out.append(where)
    out += result["notes"]
    return "\n".join(out)
