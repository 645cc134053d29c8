#!/usr/bin/env python
"""Throughput of the ERKT distillation loop and its parts, in one run, on one card, on one data set.

    python bench/throughput.py                       # auto device, batch 30 (8 on the CPU)
    python bench/throughput.py --batch 30,128 --json --out bench.json
    python bench/throughput.py --device cpu --data /path/to/dataset --batch 8 --iters 2

Figures (images/s, each with the number of images timed), per batch size:

    loader.dali_gpu / loader.dali_cpu / loader.torchvision     the loader alone
    teacher.fp32_nchw_eager / teacher.amp_cl_eager / teacher.compiled
    student.step                                               autocast, channels-last, fused AdamW
    distill.synthetic      the fast step on a fixed device-resident batch: the ceiling
    distill.paper_style    torchvision DataLoader + fp32 NCHW eager models: the paper's loop
    distill.dali           DaliLoader + the fast step: what `dali-erkt distill` runs
    distill.torchvision_fast                                   torchvision loader + the fast step

plus the ratios dali_vs_ceiling and dali_vs_paper, peak GPU memory around distill.dali, and the
DIST kernel timing. A figure that needs a GPU is null on the CPU, with the reason in `notes`.
Progress goes to stderr; stdout gets only the table, or with --json exactly one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import itertools
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

FIGURES = (
    ("loader.dali_gpu", "loader: DALI, GPU decode + ops"),
    ("loader.dali_cpu", "loader: DALI, CPU only"),
    ("loader.torchvision", "loader: torchvision DataLoader"),
    ("teacher.fp32_nchw_eager", "teacher fwd: fp32 NCHW eager"),
    ("teacher.amp_cl_eager", "teacher fwd: autocast CL eager"),
    ("teacher.compiled", "teacher fwd: compiled"),
    ("student.step", "student step: autocast CL"),
    ("distill.synthetic", "distill: synthetic input (ceiling)"),
    ("distill.paper_style", "distill: paper-style loop"),
    ("distill.dali", "distill: DALI + fast step"),
    ("distill.torchvision_fast", "distill: torchvision + fast step"),
)
FIGURE_NAMES = tuple(name for name, _ in FIGURES)
RATIOS = ("dali_vs_ceiling", "dali_vs_paper")
MEMORY = ("memory.torch_peak_gib", "memory.torch_peak_reserved_gib", "memory.device_used_gib",
          "memory.device_total_gib")
# The claims for a GPU run: (ratio or memory key, bound, batch sizes it applies to or None).
TARGETS = (
    ("dali_vs_ceiling >= 0.95", "dali_vs_ceiling", 0.95, None),
    ("dali_vs_paper >= 3.0", "dali_vs_paper", 3.0, (30,)),
    ("dali_vs_paper >= 2.5", "dali_vs_paper", 2.5, (128,)),
    ("memory.device_used_gib < 5.0", "memory.device_used_gib", 5.0, (30,)),
)
GIB = 1024 ** 3


class Skip(Exception):
    """A figure that cannot be measured here; the message says why (it goes into `notes`)."""


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default=None,
                   help="batch size, or a comma list (30,128) measured side by side "
                        "(default 30 on a GPU, 8 on the CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data", default=None,
                   help="folder-per-class dataset (default: generated scenes in a temp folder)")
    p.add_argument("--image-size", type=int, default=None, help="default 256 on a GPU, 64 on the CPU")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations per figure (default 20 on a GPU, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations before each figure (default 5 on a GPU, 1 on the CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="torchvision DataLoader workers (default min(16, CPU count))")
    p.add_argument("--threads", type=int, default=None,
                   help="DALI threads (default: data.num_threads for the GPU pipeline, "
                        "--workers for the CPU one, so it gets the torchvision loader's cores)")
    p.add_argument("--preset", default="erkt", help="VSM preset: erkt | base | none")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (model.teachers=resnet18 "
                        "--set model.teacher_weights=1 for a quick run)")
    p.add_argument("--no-compile", action="store_true", help="run the fast step eager")
    p.add_argument("--compile-cpu", action="store_true",
                   help="torch.compile on the CPU too (slow to compile; off by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    return p.parse_args(argv)


def parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--batch {text!r}: give a size or a comma list such as 30,128") from None
    if not sizes or any(b < 1 for b in sizes):
        raise SystemExit(f"--batch {text!r}: sizes must be positive integers")
    return list(dict.fromkeys(sizes))  # unique, in the order given


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the whole device: DALI's streams included


def measure(step, batch: int, warmup: int, iters: int, device: torch.device) -> dict:
    """Run `step` warmup times untimed, then iters times timed with one sync at the end.

    The first warm-up call is timed alone (with a sync) since that is where torch.compile works.
    """
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        if i == 0:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": round(batch * iters / seconds, 2), "images": batch * iters,
            "seconds": round(seconds, 4), "first_call_s": None if first is None else round(first, 3)}


def stream(loader):
    """A loader's batches across epochs, without rebuilding it between them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def close_loader(loader) -> None:
    """Stop a loader's workers now rather than at garbage collection."""
    if hasattr(loader, "close"):
        loader.close()


def to_device(batch, device: torch.device):
    """A CPU Batch on the device; non_blocking, as a training loop would move it."""
    if batch.images.device == device:
        return batch
    from dali_erkt.data.loader import Batch
    return Batch(*(t.to(device, non_blocking=True) for t in (
        batch.images, batch.labels, batch.partner_labels, batch.mix_weight, batch.indices)))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, device: torch.device, paths, labels, classes, dataset_meta):
        from dali_erkt.config import apply_overrides, default_config
        from dali_erkt.engine import use_compile
        from dali_erkt.models import build_ensemble, create_model
        from dali_erkt.precision import choose_precision

        self.args, self.device = args, device
        self.gpu = device.type == "cuda"
        self.paths, self.labels, self.classes = paths, labels, classes
        self.dataset_meta = dataset_meta
        cfg = default_config(args.preset)
        apply_overrides(cfg, args.overrides)
        cfg.data.image_size = args.image_size
        cfg.run.device = str(device)
        if args.no_compile:
            cfg.run.compile = "off"
        elif not self.gpu:
            cfg.run.compile = "on" if args.compile_cpu else "off"
        self.cfg = cfg.validate()
        self.compiled = use_compile(cfg, device)
        self.precision = choose_precision(device, cfg.run.precision)
        self.gpu_threads = args.threads or cfg.data.num_threads
        self.cpu_threads = args.threads or args.workers
        # Loader-fed loops: a DataLoader starts with a burst of workers x prefetch_factor (2)
        # batches made in parallel; warming up past it keeps the burst out of the timed part.
        self.tv_warmup = max(args.warmup, 2 * args.workers)
        self.tv_iters = max(args.iters, 2 * args.workers)
        self.notes: dict[str, str] = {}

        torch.manual_seed(0)
        n = len(classes)
        self.teacher = build_ensemble(cfg.model.teachers, None, cfg.model.teacher_weights,
                                      cfg.model.combine, n).to(device)
        self.student = create_model(cfg.model.student, n).to(device)

    # -- bookkeeping ----------------------------------------------------------------------

    def note(self, key: str, text: str) -> None:
        old = self.notes.get(key)
        if old is None:
            self.notes[key] = text
        elif text not in old:
            self.notes[key] = f"{old}; {text}"

    def figure(self, res: dict, name: str, batch: int, fn) -> None:
        log(f"[batch {batch}] {name} ...")
        try:
            res[name] = fn()
            log(f"[batch {batch}] {name}: {res[name]['images_per_s']:,.1f} images/s")
        except Skip as why:
            res[name] = None
            self.note(name, str(why))
        except Exception as exc:  # one failing figure must not lose the others: null + the reason
            res[name] = None
            msg = (str(exc).strip().splitlines() or [""])[0][:300]
            self.note(name, f"failed at batch {batch}: {type(exc).__name__}: {msg}")
            traceback.print_exc(file=sys.stderr)
            self.free()

    def free(self) -> None:
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()
            with contextlib.suppress(Exception):
                import nvidia.dali.backend as dali_backend
                dali_backend.ReleaseUnusedMemory()  # DALI keeps its own pool otherwise

    def batch_cfg(self, batch: int):
        cfg = copy.deepcopy(self.cfg)
        cfg.data.batch_size = batch
        return cfg

    def set_format(self, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.teacher.to(memory_format=fmt)
        self.student.to(memory_format=fmt)

    def synthetic_batch(self, batch: int, dtype: torch.dtype, channels_last: bool):
        """A fixed batch shaped like DaliLoader's: normalised images, labels, CutMix partners."""
        from dali_erkt.data.loader import Batch
        g = torch.Generator(device="cpu").manual_seed(batch)
        s = self.args.image_size
        images = torch.randn(batch, 3, s, s, generator=g).to(self.device, dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, len(self.classes), (batch,), generator=g)
        partner = labels[torch.randperm(batch, generator=g)]
        return Batch(images, labels.to(self.device), partner.to(self.device),
                     torch.rand(batch, generator=g).to(self.device),
                     torch.arange(batch).to(self.device))

    def optimizer(self, fused: bool):
        from dali_erkt.engine import make_optimizer
        # fused=False stands for the paper's default (foreach) AdamW: build it as on the CPU.
        return make_optimizer(self.student, self.cfg, self.device if fused else "cpu")

    # -- loaders ----------------------------------------------------------------------------

    def dali(self, cfg, on_gpu: bool):
        from dali_erkt.data.loader import DaliLoader
        cfg = copy.deepcopy(cfg)
        cfg.data.num_threads = self.gpu_threads if on_gpu else self.cpu_threads
        return DaliLoader(self.paths, self.labels, cfg, self.device if on_gpu else "cpu",
                          train=True, seed=0)

    def torchvision(self, cfg):
        from dali_erkt.data.reference import ReferenceLoader
        return ReferenceLoader(self.paths, self.labels, cfg, train=True, seed=0,
                               workers=self.args.workers)

    def time_loader(self, loader, batch: int, warmup: int, iters: int, step_fn=None,
                    before_close=None) -> dict:
        """Iterate `loader` (touching each batch, or feeding it to step_fn) and time it."""
        batches = stream(loader)

        def step():
            b = to_device(next(batches), self.device)  # DALI on the GPU: already there
            if step_fn is not None:
                step_fn(b)

        try:
            out = measure(step, batch, warmup, iters, self.device)
            if before_close is not None:
                before_close()
            return out
        finally:
            batches.close()
            close_loader(loader)
            del loader
            self.free()

    # -- one batch size ---------------------------------------------------------------------

    def run_batch(self, batch: int) -> dict:
        from dali_erkt.engine import compile_models, input_dtype, make_train_step
        from dali_erkt.precision import autocast_context, make_grad_scaler
        from dali_erkt.kernels import benchmark_dist

        a, dev, cfg = self.args, self.device, self.batch_cfg(batch)
        res: dict = {}
        extra = {"compile_seconds": {"distill_step": None}}
        fig = lambda name, fn: self.figure(res, name, batch, fn)  # noqa: E731

        # 1. Loaders alone.
        def dali_gpu():
            if not self.gpu:
                raise Skip("needs a CUDA device (DALI's mixed decoder and GPU operators)")
            return self.time_loader(self.dali(cfg, True), batch, a.warmup, a.iters)

        fig("loader.dali_gpu", dali_gpu)
        fig("loader.dali_cpu",
            lambda: self.time_loader(self.dali(cfg, False), batch, a.warmup, self.tv_iters))
        fig("loader.torchvision",
            lambda: self.time_loader(self.torchvision(cfg), batch, self.tv_warmup, self.tv_iters))

        # 2. The paper's set-up: fp32, NCHW, eager.
        torch._dynamo.reset()  # drop graphs compiled for another batch size or memory format
        self.set_format(channels_last=False)
        x32 = torch.randn(batch, 3, a.image_size, a.image_size, device=dev)
        fig("teacher.fp32_nchw_eager",
            lambda: measure(lambda: self.teacher(x32), batch, a.warmup, a.iters, dev))
        del x32

        def paper_style():
            # The paper's optimizer is the default (foreach) AdamW; no autocast, so no scaler.
            step = make_train_step(self.student, self.teacher, self.optimizer(fused=False),
                                   make_grad_scaler(dev, "fp32"), cfg, dev, "fp32")

            def nchw_step(b):  # the reference loader collates channels-last; NCHW as the paper
                b.images = b.images.contiguous()
                step(b)

            return self.time_loader(self.torchvision(cfg), batch, self.tv_warmup, self.tv_iters,
                                    nchw_step)

        fig("distill.paper_style", paper_style)
        self.free()

        # 3. Autocast + channels-last, eager.
        self.set_format(channels_last=cfg.run.channels_last)
        fixed = self.synthetic_batch(batch, input_dtype(self.precision), cfg.run.channels_last)

        def teacher_amp():
            def fwd():
                with autocast_context(dev, self.precision):
                    self.teacher(fixed.images)
            return measure(fwd, batch, a.warmup, a.iters, dev)

        fig("teacher.amp_cl_eager", teacher_amp)

        def student_step():
            step = make_train_step(self.student, None, self.optimizer(fused=self.gpu),
                                   make_grad_scaler(dev, self.precision), cfg, dev, self.precision)
            return measure(lambda: step(fixed), batch, a.warmup, a.iters, dev)

        fig("student.step", student_step)

        # 4. The fast step as `dali-erkt distill` runs it: compiled where enabled.
        torch._dynamo.reset()
        student_c, teacher_c = compile_models(self.student, self.teacher, cfg, dev)
        # reduce-overhead records CUDA graphs on the 2nd/3rd call: keep those out of the timing.
        warm_c = max(a.warmup, 3) if self.compiled else a.warmup

        def fast_step():
            return make_train_step(student_c, teacher_c, self.optimizer(fused=self.gpu),
                                   make_grad_scaler(dev, self.precision), cfg, dev, self.precision)

        def synthetic():
            step = fast_step()
            out = measure(lambda: step(fixed), batch, warm_c, a.iters, dev)
            if self.compiled:  # the first call compiles the teacher and the student's fwd + bwd
                extra["compile_seconds"]["distill_step"] = out["first_call_s"]
            return out

        fig("distill.synthetic", synthetic)
        if not self.compiled:
            self.note("distill.synthetic", "fast step runs eager (not compiled)" +
                      ("" if self.gpu else f"; precision {self.precision} on the CPU"))

        # Right after the ceiling, before any other compiled call: the memory then holds what
        # `dali-erkt distill` holds (models, optimizer, the step's CUDA graphs, DALI's pools).
        memory = {k: None for k in MEMORY}

        def dali_loop():
            step = fast_step()
            if not self.gpu:
                return self.time_loader(self.dali(cfg, False), batch, warm_c, a.iters, step)
            self.free()
            torch.cuda.reset_peak_memory_stats(dev)
            return self.time_loader(self.dali(cfg, True), batch, warm_c, a.iters, step,
                                    before_close=lambda: self._read_memory(memory))

        fig("distill.dali", dali_loop)
        if not self.gpu:
            self.note("memory", "GPU memory needs a CUDA device")

        def teacher_compiled():
            if not self.compiled:
                raise Skip("--no-compile given" if a.no_compile else
                           "compiling on the CPU is slow: pass --compile-cpu to measure it")

            def fwd():
                with autocast_context(dev, self.precision):
                    teacher_c(fixed.images)
            # Compiled already inside the step (same guards); warm-up records its own graphs.
            return measure(fwd, batch, warm_c, a.iters, dev)

        fig("teacher.compiled", teacher_compiled)

        fig("distill.torchvision_fast",
            lambda: self.time_loader(self.torchvision(cfg), batch, max(self.tv_warmup, warm_c),
                                     self.tv_iters, fast_step()))
        del student_c, teacher_c, fixed
        torch._dynamo.reset()
        self.free()

        # 5. The DIST loss kernel (its own timing: CUDA events; nothing timed on the CPU).
        try:
            kern = benchmark_dist(batch, len(self.classes), dev, iters=max(100, a.iters))
        except Exception as exc:
            kern = None
            self.note("kernels.dist", f"failed at batch {batch}: {type(exc).__name__}: {exc}")

        ratios = {"dali_vs_ceiling": ratio(res.get("distill.dali"), res.get("distill.synthetic")),
                  "dali_vs_paper": ratio(res.get("distill.dali"), res.get("distill.paper_style"))}
        res = {name: res.get(name) for name in FIGURE_NAMES}  # the table's order
        return {"figures": res, "ratios": ratios, "memory": memory, "kernels.dist": kern,
                "targets": self.targets(batch, ratios, memory), **extra}

    def _read_memory(self, memory: dict) -> None:
        """Read after the loop's final sync, while the pipeline and the step's buffers are alive
        (caching pools do not shrink, so this is their peak)."""
        dev = self.device
        free, total = torch.cuda.mem_get_info(dev)  # total - free: torch, DALI, CUDA context
        memory["memory.device_used_gib"] = round((total - free) / GIB, 3)
        memory["memory.device_total_gib"] = round(total / GIB, 3)
        memory["memory.torch_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 3)
        memory["memory.torch_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GIB, 3)

    def targets(self, batch: int, ratios: dict, memory: dict) -> dict:
        """The issue's GPU claims checked on this run: True/False, or None where not applicable."""
        values = {**ratios, **memory}
        out = {}
        for label, key, bound, sizes in TARGETS:
            if sizes is not None and batch not in sizes:
                continue
            v = values.get(key)
            if v is None or not self.gpu:
                out[label] = None
            else:
                out[label] = bool(v < bound) if key.startswith("memory") else bool(v >= bound)
        return out


def ratio(a, b):
    if not a or not b or not b.get("images_per_s"):
        return None
    return round(a["images_per_s"] / b["images_per_s"], 4)


# --------------------------------------------------------------------------------------------
# Data set, metadata, output
# --------------------------------------------------------------------------------------------

def load_dataset(args, device: torch.device, tmp: Path):
    """(absolute paths, labels, classes, metadata); generates scenes when --data is not given."""
    from dali_erkt.data.dataset import scan
    from dali_erkt.synthetic import make_scenes

    if args.data:
        root = Path(args.data).resolve()
        meta = {"path": str(root), "generated": False}
    else:
        # Sized for the device: enough distinct files to look like a data set, quick to render
        # (about 30 ms per 256 px scene).
        classes, per_class = (8, 40) if device.type == "cuda" else (4, 16)
        root = tmp / "scenes"
        log(f"generating {classes} x {per_class} scenes at {args.image_size} px in {root} ...")
        make_scenes(root, classes=classes, per_class=per_class, size=args.image_size, seed=0)
        meta = {"path": None, "generated": f"dali_erkt.synthetic.make_scenes({classes} classes x "
                                          f"{per_class}, {args.image_size} px, jpg)"}
    classes, samples = scan(root)
    paths = [str(root / p) for p, _ in samples]
    labels = [label for _, label in samples]
    meta.update(classes=len(classes), images=len(paths))
    return paths, labels, classes, meta


def cover_run(paths, labels, batches, args):
    """Repeat the file list so that one epoch covers the longest timed figure: epoch ends (DALI
    drains and restarts its prefetch queue; DataLoader workers restart) stay out of the timing,
    as they are rare in a real epoch of thousands of images."""
    per_loader = max(args.warmup, 3, 2 * args.workers) + max(args.iters, 2 * args.workers) + 4
    need = per_loader * max(batches)
    reps = max(1, math.ceil(need / len(paths)))
    return paths * reps, labels * reps, len(paths) * reps


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def metadata(args, device, bench: Bench | None, batches, dataset_meta) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name, module in (("torchvision", "torchvision"), ("timm", "timm"), ("dali", "nvidia.dali")):
        try:
            versions[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            versions[name] = None
    gpu = device.type == "cuda"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if gpu else cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "batches": batches,
        "image_size": args.image_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "workers": args.workers,
        "dataset": dataset_meta,
    }
    if bench is not None:
        cfg = bench.cfg
        meta.update({
            "loader_fed_iters": bench.tv_iters, "loader_fed_warmup": bench.tv_warmup,
            "dali_threads": {"gpu": bench.gpu_threads, "cpu": bench.cpu_threads},
            "precision": bench.precision,
            "compile": cfg.run.compile_mode if bench.compiled else "off",
            "channels_last": cfg.run.channels_last,
            "preset": cfg.preset,
            "teachers": list(cfg.model.teachers), "student": cfg.model.student,
        })
    return meta


def fmt_rate(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(report: dict) -> str:
    meta, batches = report["meta"], report["meta"]["batches"]
    cols = [f"batch {b}" for b in batches]
    width = 36
    lines = [
        f"dali-erkt throughput | {meta['card']} ({meta['device']}) | torch {meta['versions']['torch']}"
        f" | DALI {meta['versions'].get('dali')} | {meta['image_size']} px | "
        f"{meta.get('precision', '?')} | compile {meta.get('compile', '?')}",
        f"data: {meta['dataset'].get('path') or meta['dataset'].get('generated')} "
        f"({meta['dataset']['classes']} classes, {meta['dataset']['images']} images)",
        "",
        f"{'images/s':<{width}}" + "".join(f"{c:>14}" for c in cols),
    ]
    res = report["results"]
    for name, label in FIGURES:
        row = [fmt_rate((res[str(b)]["figures"].get(name) or {}).get("images_per_s"))
               for b in batches]
        lines.append(f"{label:<{width}}" + "".join(f"{v:>14}" for v in row))
    lines += ["", "ratios"]
    for key in RATIOS:
        row = [res[str(b)]["ratios"][key] for b in batches]
        lines.append(f"  {key:<{width - 2}}" + "".join(f"{'-' if v is None else f'{v:.2f}x':>14}"
                                                        for v in row))
    lines += ["", "memory (GiB, around distill.dali)"]
    for key in MEMORY:
        row = [res[str(b)]["memory"][key] for b in batches]
        lines.append(f"  {key:<{width - 2}}" + "".join(f"{'-' if v is None else f'{v:.2f}':>14}"
                                                        for v in row))
    lines += ["", "compile seconds (first call)"]
    for key in ("distill_step",):
        row = [res[str(b)]["compile_seconds"][key] for b in batches]
        lines.append(f"  {key:<{width - 2}}" + "".join(f"{'-' if v is None else f'{v:.1f}':>14}"
                                                        for v in row))
    kern = [(res[str(b)].get("kernels.dist") or {}) for b in batches]
    if any(k.get("torch_ms") is not None for k in kern):
        lines += ["", "DIST loss fwd+bwd (ms)"]
        for key in ("torch_ms", "triton_ms"):
            row = [k.get(key) for k in kern]
            lines.append(f"  {key:<{width - 2}}" + "".join(
                f"{'-' if v is None else f'{v:.3f}':>14}" for v in row))
    checks = [(label, b, ok) for b in batches for label, ok in res[str(b)]["targets"].items()
              if ok is not None]
    if checks:
        lines += ["", "targets"]
        lines += [f"  batch {b}: {label}: {'pass' if ok else 'FAIL'}" for label, b, ok in checks]
    if report["notes"]:
        lines += ["", "notes"]
        lines += [f"  {k}: {v}" for k, v in report["notes"].items()]
    return "\n".join(lines)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to fd 1 (libraries, forked workers) to stderr until the report,
    so that --json prints exactly one object on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dali_erkt.config import ConfigError
    from dali_erkt.precision import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        log(f"error: {exc}")
        return 2
    gpu = device.type == "cuda"
    batches = parse_batches(args.batch or ("30" if gpu else "8"))
    args.image_size = args.image_size or (256 if gpu else 64)
    args.iters = args.iters if args.iters is not None else (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    if args.iters < 1 or args.warmup < 0 or args.workers < 0:
        log("error: --iters must be >= 1, --warmup and --workers >= 0")
        return 2
    if gpu:
        torch.cuda.set_device(device)

    start = time.perf_counter()
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="dali-erkt-bench-") as tmp:
        try:
            paths, labels, classes, dmeta = load_dataset(args, device, Path(tmp))
            paths, labels, dmeta["epoch_images"] = cover_run(paths, labels, batches, args)
            bench = Bench(args, device, paths, labels, classes, dmeta)
        except (ConfigError, ValueError) as exc:
            log(f"error: {exc}")
            return 2
        results = {}
        # Smallest batch first: memory left cached by a larger batch cannot inflate its figure.
        for b in sorted(batches):
            results[str(b)] = bench.run_batch(b)
        report = {"meta": metadata(args, device, bench, batches, dmeta),
                  "results": {str(b): results[str(b)] for b in batches},
                  "notes": bench.notes}
        report["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text if args.json else table(report), flush=True)
    log(f"done in {report['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
