"""`models`: parameters, MACs and inference time of a run's own models (a checkpoint, a run
folder, a teacher folder and its ensemble, each at its image size and classes), of the paper's
Table 8 models (the student, each teacher, the ensemble) and of any timm model named.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode`, which counts a convolution or
matmul as 2 FLOPs per multiply-accumulate: its total is halved, giving MACs as the paper and timm
state them ("FLOPs" in the paper). Only convolutions and matmuls count (not BatchNorm, activations
or pooling). Weights are random (nothing is fetched): counts and times do not depend on them.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import CheckpointError, ConfigError
from ..models import TeacherEnsemble, count_parameters, create_model, load_trained
from ..run_state import read_run
from ..runtime import resolve_device

# The paper states EfficientNet-B3's cost at its native 300 px (Table 8's 1.8 G).
PAPER_SIZES = (("efficientnet_b3", 300),)
PAPER_TEACHERS = ("efficientnet_b3", "efficientnet_b0", "resnet50")
PAPER_IMAGES, CPU_IMAGES = 6300, 64  # Table 8 times 6,300 images
MACS_NOTE = ("GMACs: multiply-accumulates (FLOPs as the paper and timm count them) = "
             "torch.utils.flop_counter FLOPs / 2; convolutions and matmuls only")


class RunModel(NamedTuple):
    """A trained model described by the table: what its checkpoint records."""
    path: str  # the checkpoint (last.pt of a run folder)
    role: str  # student | teacher (the run's kind)
    arch: str
    image_size: int
    num_classes: int


class RunGroup(NamedTuple):
    """What one argument names: one run, or a teacher folder's runs (ensemble=True)."""
    source: str
    members: tuple[RunModel, ...]
    ensemble: bool


def _run_model(path: Path) -> RunModel:
    state = read_run(path)
    cfg = state.stored_config()
    return RunModel(str(path), state.kind if state.kind in ("student", "teacher") else "model",
                    state.arch, int(cfg.data.image_size), len(state.classes))


def read_runs(arguments: Sequence[str]) -> list[RunGroup]:
    """Each argument as what it names: a checkpoint file, a run folder (its last.pt), or a
    teacher folder (<arch>/last.pt runs, as `--teachers DIR` reads them: an ensemble)."""
    groups = []
    for arg in arguments:
        p = Path(arg)
        if p.is_file():
            groups.append(RunGroup(arg, (_run_model(p),), False))
        elif (p / "last.pt").is_file():
            groups.append(RunGroup(arg, (_run_model(p / "last.pt"),), False))
        elif p.is_dir():
            found = sorted(d / "last.pt" for d in p.iterdir() if (d / "last.pt").is_file())
            if not found:
                raise ConfigError(f"{arg} holds no last.pt and no <arch>/last.pt runs: give a run "
                                  "folder, a checkpoint or a teacher folder")
            members = tuple(_run_model(f) for f in found)
            if len({m.num_classes for m in members}) > 1:
                raise CheckpointError(f"the runs in {arg} were trained on different numbers of "
                                      "classes: a teacher folder holds runs of one data set")
            groups.append(RunGroup(arg, members, True))
        else:
            raise ConfigError(f"{arg} is not a run folder, checkpoint or teacher folder, nor a timm "
                              "model name")
    return groups


def split_arguments(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """(paths of runs, timm model names): an argument that exists on disk, or that looks like a
    path (a / or a .pt ending), is a run; anything else is a model name."""
    runs, names = [], []
    for arg in arguments:
        looks = "/" in arg or arg.endswith((".pt", ".pth")) or Path(arg).exists()
        (runs if looks else names).append(arg)
    return runs, names


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


def models_table(archs_extra: Sequence[str] = (), *, runs: Sequence[str] = (), paper: bool = True,
                 image_size: int = 224, device: str = "cpu",
                 images: int | None = None, batch_size: int = 32, student: str = "efficientnet_b0",
                 teachers: Sequence[str] = PAPER_TEACHERS,
                 teacher_weights: Sequence[float] = (0.4, 0.3, 0.3), num_classes: int = 1000,
                 at_sizes: Sequence[tuple[str, int]] | None = None, timing: bool = True,
                 latency_runs: int = 20, warmup: int = 3, note=None) -> dict:
    """Rows (name, role, image_size, num_classes, params_m, gmacs, latency_ms, images_per_s,
    seconds_for_n; `source` for a run's row) for each run of `runs` (see `read_runs`: the run's
    own model at its image size and classes, role student or teacher; a teacher folder adds
    its ensemble), then with `paper` the student, each teacher and the ensemble of the paper's
    Table 8 (random weights, `image_size`, `num_classes`), each extra timm name, and each
    (arch, size) of `at_sizes` (None: EfficientNet-B3 at 300 px, the size of the paper's figure,
    with `paper`, else none); plus metadata. Timing fields are None with `timing=False`. `images` (the N timed in
    batches) defaults to the paper's 6,300 on a GPU and to 64 on the CPU."""
    dev = resolve_device(device)
    if at_sizes is None:
        at_sizes = PAPER_SIZES if paper else ()
    if images is None:
        images = PAPER_IMAGES if dev.type == "cuda" else CPU_IMAGES
    for name, value in (("image size", image_size), ("images", images), ("batch size", batch_size),
                        ("latency runs", latency_runs), ("number of classes", num_classes)):
        if int(value) < 1:
            raise ConfigError(f"{name} {value} must be at least 1")
    for size in (image_size, *(s for _, s in at_sizes)):
        if int(size) < 16:
            raise ConfigError(f"image size {size} is too small for these CNNs: use 16 or more")
    groups = read_runs(runs)  # read and checked before anything is measured
    archs = [*((student, *teachers) if paper else ()), *archs_extra, *(a for a, _ in at_sizes)]
    for arch in archs:
        if not timm.is_model(arch):
            create_model(arch, num_classes)  # raises the one-line error with suggestions
    done: dict[tuple[str, int], dict] = {}  # an arch measured once per size (B0: student, teacher)

    def measure(name: str, role: str, build, size: int, key=None, classes: int = num_classes,
                source: str | None = None) -> dict:
        if key in done:
            return {**done[key], "name": name, "role": role}
        if note:
            note(f"measuring {name} at {size} px" + (f" on {dev}" if timing else ""))
        model = build()
        row = {"name": name, "role": role, "image_size": size, "num_classes": classes,
               **({"source": source} if source is not None else {}),
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

    def trained(path):
        return lambda: load_trained(path)[0]

    notes = [MACS_NOTE]
    rows = []
    for group in groups:
        for m in group.members:
            rows.append(measure(m.arch, m.role, trained(m.path), m.image_size, classes=m.num_classes,
                                source=m.path))
        if group.ensemble:
            size = max(m.image_size for m in group.members)
            if len({m.image_size for m in group.members}) > 1:
                notes.append(f"{group.source}: its runs were trained at different sizes; the "
                             f"ensemble is measured at the largest, {size} px")
            members = group.members
            build = lambda members=members: TeacherEnsemble(
                [load_trained(m.path)[0] for m in members], [1.0] * len(members))
            rows.append(measure("ensemble(" + "+".join(m.arch for m in members) + ")", "ensemble",
                                build, size, classes=members[0].num_classes, source=group.source))
    if groups:
        notes.append("run rows: the run's own model (its weights, image size and classes); an "
                     "ensemble row: its members' sum of parameters and MACs, the latency of its "
                     "forward (every member, then the combination)")
    if paper:
        rows.append(measure(student, "student", one(student), image_size, (student, image_size)))
        rows += [measure(t, "teacher", one(t), image_size, (t, image_size)) for t in teachers]
        ensemble = lambda: TeacherEnsemble([create_model(t, num_classes) for t in teachers],
                                           teacher_weights)
        rows.append(measure("ensemble(" + "+".join(teachers) + ")", "ensemble", ensemble,
                            image_size))
    rows += [measure(a, "other", one(a), image_size, (a, image_size)) for a in archs_extra]
    rows += [measure(f"{a} @{s}", "at size", one(a), int(s), (a, int(s))) for a, s in at_sizes]

    teacher_macs = {r["name"]: r["gmacs"] for r in rows
                    if r["role"] == "teacher" and "source" not in r}
    resized = {a: next(r["gmacs"] for r in rows if r["name"] == f"{a} @{int(s)}")
               for a, s in at_sizes if a in teacher_macs and int(s) != image_size}
    if resized and paper:
        total = sum(resized.get(t, teacher_macs[t]) for t in teachers)
        sizes = ", ".join(f"{a} at {s} px" for a, s in at_sizes if a in resized)
        stated = tuple(teachers) == PAPER_TEACHERS and image_size == 224
        notes.append(f"ensemble with {sizes}, the others at {image_size} px: {total:.2f} GMACs "
                     f"(sum of its members{'; the paper states 6.3 G' if stated else ''})")
    return {"rows": rows, "device": str(dev), "device_name": _device_name(dev),
            "torch": torch.__version__, "timm": timm.__version__, "image_size": image_size,
            "num_classes": num_classes, "runs": [g.source for g in groups], "paper": bool(paper),
            "images": images if timing else None,
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
    sources = any("source" in r for r in result["rows"])
    head = ["model", "role", "px", "classes", "params (M)", "GMACs", "latency b1 (ms)", "images/s",
            f"s for {n} images" if n else "s for N images", *(["from"] if sources else [])]
    body = [[r["name"], r["role"], str(r["image_size"]), str(r["num_classes"]),
             _cell(r["params_m"], ".2f"), _cell(r["gmacs"], ".2f"), _cell(r["latency_ms"], ".1f"),
             _cell(r["images_per_s"], ".1f"), _cell(r["seconds_for_n"], ".2f"),
             *([r.get("source", "-")] if sources else [])]
            for r in result["rows"]]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 or i == 9 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *map(line, body), ""]
    named = any("source" not in r for r in result["rows"])
    weights = ", ".join((["runs with their own weights"] if sources else [])
                        + (["the named models random weights"] if named else []))
    where = f"device: {result['device']} ({result['device_name']}); torch {result['torch']}, " \
            f"timm {result['timm']}; {weights}"
    if n:
        where += (f"; latency: median of {result['latency_runs']} batch-1 runs; throughput: "
                  f"{n} images in batches of {result['batch_size']}, fp32")
    out.append(where)
    out += result["notes"]
    return "\n".join(out)
