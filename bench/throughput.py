#!/usr/bin/env python
"""Throughput of the ERKT distillation loop and its parts, in one run, on one card, on one data set.

Per batch size: images/s of each figure in FIGURES (bench/README.md: usage, what each one runs),
the ratios in report.RATIOS, peak GPU memory around distill.dali, and the DIST
kernel timing. A figure that needs a GPU is null on the CPU, with the reason in `notes`. Progress
goes to stderr; stdout gets only the table, or with --json exactly one JSON object (report.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: also when imported by path
from report import FIGURES, MEMORY, batch_result, metadata, stdout_to_stderr, write  # noqa: E402
from report import table  # noqa: E402,F401  (throughput.table, as before the split)
from reference import make_loader  # noqa: E402

SELECTABLE = tuple(name for name, _ in FIGURES) + ("kernels.dist",)  # the names --only takes
GIB, _T0 = 1024 ** 3, time.perf_counter()


class Skip(Exception):
    """A figure that cannot be measured here; the message says why (it goes into `notes`)."""


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def usage_error(msg: str):
    log(f"error: {msg}")  # one line on stderr, exit status 2
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--batch", help="a size or a comma list (30,128) measured side by side (30 GPU, 8 CPU)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--data", help="folder-per-class dataset (default: generated scenes in a temp folder)")
    add("--image-size", type=int, help="default 256 on a GPU, 64 on the CPU")
    add("--iters", type=int, help="timed iterations per figure (default 20 on a GPU, 3 on the CPU)")
    add("--warmup", type=int, help="untimed iterations before each figure (default 5 GPU, 1 CPU)")
    add("--workers", type=int, help="torchvision DataLoader workers (default min(16, CPU count))")
    add("--threads", type=int, help="DALI threads (default data.num_threads on the GPU, --workers on "
                                    "the CPU: the torchvision loader's cores)")
    add("--preset", default="erkt", help="VSM preset: erkt | base | none")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, repeatable (model.teachers=[resnet18] model.teacher_weights=[1])")
    add("--only", metavar="NAME[,NAME]", help="measure only these: " + ", ".join(SELECTABLE))
    add("--no-compile", action="store_true", help="run the fast step eager")
    add("--compile-cpu", action="store_true", help="torch.compile on the CPU too (slow to compile)")
    add("--json", action="store_true", help="print one JSON object instead of the table")
    add("--out", help="also write the JSON to this file")
    return p.parse_args(argv)


def parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        usage_error(f"--batch {text!r}: give a positive size or a comma list such as 30,128")
    return list(dict.fromkeys(sizes))  # unique, in the order given


def parse_only(text: str | None) -> tuple[str, ...]:
    names = SELECTABLE if text is None else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SELECTABLE]
    if unknown or not names:
        usage_error(f"--only: unknown figure {', '.join(unknown) or repr(text)}: choose from "
                    f"{', '.join(SELECTABLE)}")
    return tuple(n for n in SELECTABLE if n in names)


def measure(step, batch: int, warmup: int, iters: int, device: torch.device) -> dict:
    """`step` warmup times untimed, then iters times timed with one sync (of the whole device:
    DALI's streams too) at the end. The first warm-up call is timed alone: torch.compile's."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        if i == 0:
            sync()
            first = round(time.perf_counter() - t0, 3)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    seconds = time.perf_counter() - t0
    return {"images_per_s": round(batch * iters / seconds, 2), "images": batch * iters,
            "seconds": round(seconds, 4), "first_call_s": first}


def stream(loader):
    """A loader's batches across epochs, without rebuilding it (ReferenceLoader moves on only by
    set_epoch; DaliLoader takes it as the epoch it starts anyway)."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def to_device(batch, device: torch.device):
    """A Batch on the device; non_blocking, as a training loop would move it."""
    return batch if batch.images.device == device else \
        type(batch)(*(t.to(device, non_blocking=True) for t in batch))


class Bench:
    """The run's models and data; one `fig_*` method per figure returns that figure's dict."""

    def __init__(self, args, cfg, rt, paths, labels, classes, only):
        from dali_erkt.models import TeacherEnsemble, create_model
        self.args, self.cfg, self.rt, self.only, self.notes = args, cfg, rt, only, {}
        self.device, self.gpu = rt.device, rt.device.type == "cuda"
        self.paths, self.labels, self.classes = paths, labels, classes
        # The paper's loop runs fp32 NCHW eager; student.step the fast step's settings, eager.
        self.paper_rt = dataclasses.replace(rt, precision="fp32", compile=False, channels_last=False)
        self.eager_rt = dataclasses.replace(rt, compile=False)
        self.threads = {"gpu": args.threads or cfg.data.num_threads,
                        "cpu": args.threads or max(1, args.workers)}
        # A DataLoader starts with a burst of workers x prefetch_factor (2) batches, DALI with its
        # prefetched ones: loaders warm up past them; compiled ones past CUDA graphs' calls 2-3.
        self.tv_warmup = max(args.warmup, 2 * args.workers)
        self.dali_warmup = max(args.warmup, cfg.data.prefetch + 1)
        self.tv_iters = max(args.iters, 2 * args.workers)
        self.warm_c = max(args.warmup, 3) if rt.compile else args.warmup
        torch.manual_seed(0)
        m, n = cfg.model, len(classes)
        self.teacher = TeacherEnsemble([create_model(a, n) for a in m.teachers], m.teacher_weights,
                                       m.combine).to(self.device)
        self.student = create_model(m.arch, n).to(self.device)

    def note(self, key: str, text: str) -> None:
        old = self.notes.get(key)
        self.notes[key] = text if old is None else old if text in old else f"{old}; {text}"

    def measure_all(self, *names: str) -> None:
        """Each selected figure of `names`: its dict, or null and the reason in `notes`."""
        for name in (n for n in names if n in self.only):
            log(f"[batch {self.b}] {name} ...")
            try:
                self.res[name] = getattr(self, "fig_" + name.replace(".", "_"))()
                log(f"[batch {self.b}] {name}: {self.res[name]['images_per_s']:,.1f} images/s")
            except Exception as exc:  # null and the reason: one figure must not lose the others
                self.res[name], msg = None, (str(exc).strip().splitlines() or [""])[0][:300]
                self.note(name, msg if isinstance(exc, Skip) else
                          f"failed at batch {self.b}: {type(exc).__name__}: {msg}")
                if not isinstance(exc, Skip):
                    traceback.print_exc(file=sys.stderr)
                    self.free()

    def free(self) -> None:
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()
            with contextlib.suppress(Exception):
                import nvidia.dali.backend as dali_backend
                dali_backend.ReleaseUnusedMemory()  # DALI keeps its own pool otherwise

    def reset(self, channels_last: bool) -> None:
        """Drop every compiled graph (other batch size, format or models); set the models' format."""
        torch._dynamo.reset()
        for model in (self.teacher, self.student):
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.free()

    def synthetic_batch(self):
        """A fixed device-resident batch shaped like DaliLoader's: images, labels, CutMix partners."""
        from dali_erkt.data.loader import Batch
        b, s, g = self.b, self.cfg.data.image_size, torch.Generator().manual_seed(self.b)
        images = torch.randn(b, 3, s, s, generator=g).to(self.rt.input_dtype)
        labels = torch.randint(0, len(self.classes), (b,), generator=g)
        batch = to_device(Batch(images, labels, labels[torch.randperm(b, generator=g)],
                                torch.rand(b, generator=g), torch.arange(b)), self.device)
        fmt = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        return batch._replace(images=batch.images.contiguous(memory_format=fmt))

    def train_step(self, model, teacher, rt, fused: bool):
        """`model`'s training step: distillation from `teacher`, or supervised where it is None.
        fused=False gives the paper's default (foreach) AdamW, built as on the CPU."""
        from dali_erkt.engine import Distillation, Supervised, make_optimizer, make_train_step
        from dali_erkt.teachers import LiveTeacher
        opt = make_optimizer(self.student, self.cfg.optim.lr, self.cfg.optim.weight_decay,
                             rt.device if fused else torch.device("cpu"))
        task = Supervised() if teacher is None else \
            Distillation.from_config(LiveTeacher(teacher), self.cfg.loss)
        return make_train_step(model, task, opt, rt.grad_scaler(), rt)

    def loader(self, kind: str, gpu: bool = False):
        """bench/reference.py's `make_loader` (dali, reference, torchvision) at this batch."""
        if gpu and not self.gpu:
            raise Skip("needs a CUDA device (DALI's mixed decoder and GPU operators)")
        return make_loader(kind, cfg=self.cfg, paths=self.paths, labels=self.labels,
                           batch_size=self.b, threads=self.threads["gpu" if gpu else "cpu"],
                           workers=self.args.workers, device=self.device if gpu else "cpu")

    def timed(self, step, warmup: int | None = None) -> dict:
        return measure(step, self.b, self.args.warmup if warmup is None else warmup,
                       self.args.iters, self.device)

    def time_loader(self, loader, warmup: int, iters: int, step_fn=None, before_close=None) -> dict:
        """Iterate `loader` (touching each batch, or feeding it to step_fn) and time it."""
        batches = stream(loader)

        def step():
            b = to_device(next(batches), self.device)  # DALI on the GPU: already there
            if step_fn is not None:
                step_fn(b)
        try:
            out = measure(step, self.b, warmup, iters, self.device)
            if before_close is not None:
                before_close()
            return out
        finally:
            batches.close()
            loader.close()  # its workers and pipeline stop now, not at garbage collection
            del loader
            self.free()

    def read_memory(self) -> None:
        """Read after the loop's final sync, while the pipeline and the step's buffers are alive
        (caching pools do not shrink, so this is their peak). total - free: torch, DALI, context."""
        free, total = torch.cuda.mem_get_info(self.device)
        values = (torch.cuda.max_memory_allocated(self.device),
                  torch.cuda.max_memory_reserved(self.device), total - free, total)
        self.memory.update(zip(MEMORY, (round(v / GIB, 3) for v in values)))  # MEMORY's order

    def fig_loader_dali_gpu(self):
        return self.time_loader(self.loader("dali", gpu=True), self.dali_warmup, self.args.iters)

    def fig_loader_dali_reference_gpu(self):
        return self.time_loader(self.loader("reference", True), self.dali_warmup, self.args.iters)

    def fig_loader_dali_cpu(self):
        return self.time_loader(self.loader("dali"), self.dali_warmup, self.tv_iters)

    def fig_loader_dali_reference_cpu(self):
        return self.time_loader(self.loader("reference"), self.dali_warmup, self.tv_iters)

    def fig_loader_torchvision(self):
        return self.time_loader(self.loader("torchvision"), self.tv_warmup, self.tv_iters)

    def fig_teacher_fp32_nchw_eager(self):
        s = self.cfg.data.image_size
        x = torch.randn(self.b, 3, s, s, device=self.device)
        return self.timed(lambda: self.teacher(x))

    def fig_distill_paper_style(self):
        step = self.train_step(self.student, self.teacher, self.paper_rt, fused=False)
        # The reference loader collates channels-last; the paper's loop feeds NCHW.
        return self.time_loader(self.loader("torchvision"), self.tv_warmup, self.tv_iters,
                                lambda b: step(b._replace(images=b.images.contiguous())))

    def teacher_forward(self, teacher, mark_step: bool = False) -> None:
        if mark_step:  # CUDA graphs: the previous replay's outputs may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with self.rt.autocast():
            teacher(self.fixed.images)

    def fig_teacher_amp_cl_eager(self):
        return self.timed(lambda: self.teacher_forward(self.teacher))

    def fig_student_step(self):
        step = self.train_step(self.student, None, self.eager_rt, fused=self.gpu)
        return self.timed(lambda: step(self.fixed))

    def fast_step(self):
        """The step `dali-erkt distill` runs: the compiled models (where enabled), fused AdamW."""
        return self.train_step(self.student_c, self.teacher_c, self.rt, fused=self.gpu)

    def fig_distill_synthetic(self):
        if not self.rt.compile:
            self.note("distill.synthetic", "fast step runs eager (not compiled)" +
                      ("" if self.gpu else f"; precision {self.rt.precision} on the CPU"))
        step = self.fast_step()
        out = self.timed(lambda: step(self.fixed), self.warm_c)
        if self.rt.compile:  # the first call compiles the teacher and the student's fwd + bwd
            self.compile_s["distill_step"] = out["first_call_s"]
        return out

    def fig_distill_dali(self):
        step = self.fast_step()
        if not self.gpu:
            return self.time_loader(self.loader("dali"), self.warm_c, self.args.iters, step)
        self.free()
        torch.cuda.reset_peak_memory_stats(self.device)
        return self.time_loader(self.loader("dali", gpu=True), self.warm_c, self.args.iters, step,
                                before_close=self.read_memory)

    def fig_distill_cached(self):
        """DALI + the student step, the teachers' logits replayed from a teacher cache (rows of
        the right shape; their values do not change the time), moved to the device per epoch."""
        import numpy as np

        from dali_erkt.engine import make_optimizer, make_train_step
        from dali_erkt.tasks import Distillation
        from dali_erkt.teacher_cache import TeacherCache
        from dali_erkt.teachers import CachedTeacher
        loader = self.loader("dali", gpu=self.gpu)
        k, c, n = len(self.cfg.model.teachers), len(self.classes), loader.batches_per_epoch * self.b
        with tempfile.TemporaryDirectory(prefix="dali-erkt-cache-") as folder:
            cache = TeacherCache(folder, {"bench": 1}, teachers=k, positions=n, classes=c)
            for epoch in range(-(-(self.warm_c + self.args.iters) // loader.batches_per_epoch) + 1):
                cache.write_epoch(epoch, np.zeros((k, n, c), dtype=np.float16))
            task = Distillation.from_config(CachedTeacher(self.teacher, cache), self.cfg.loss)
            task.prepare(self.rt)
            opt = make_optimizer(self.student, self.cfg.optim.lr, self.cfg.optim.weight_decay, self.device)
            step = make_train_step(self.student_c, task, opt, self.rt.grad_scaler(), self.rt)

            def batches():
                for epoch in itertools.count():
                    yield from task.epoch_batches(loader, epoch)
            feed = batches()
            try:
                return self.timed(lambda: step(next(feed)), self.warm_c)
            finally:
                feed.close()
                loader.close()

    def fig_distill_torchvision_fast(self):
        return self.time_loader(self.loader("torchvision"), max(self.tv_warmup, self.warm_c),
                                self.tv_iters, self.fast_step())

    def fig_teacher_compiled(self):
        if not self.rt.compile:
            raise Skip("--no-compile given" if self.args.no_compile else
                       "compiling on the CPU is slow: pass --compile-cpu to measure it")
        teacher = torch.compile(self.teacher, mode=self.rt.compile_mode)  # alone: dynamo was reset
        out = self.timed(lambda: self.teacher_forward(teacher, self.rt.uses_cuda_graphs), self.warm_c)
        self.compile_s["teacher"] = out["first_call_s"]
        return out

    def kernel_dist(self):
        """The DIST loss, torch vs the fused kernel (CUDA events: nothing timed on the CPU)."""
        from dali_erkt import kernels
        from dali_erkt.losses import dist_terms
        fns = {"torch": lambda S, T: dist_terms(S, T, impl="torch"),
               "triton": lambda S, T: dist_terms(S, T, impl="triton")}
        try:
            out = kernels.time_fwd_bwd(fns, self.b, len(self.classes), self.device,
                                       iters=max(100, self.args.iters))
        except Exception as exc:
            self.note("kernels.dist", f"failed at batch {self.b}: {type(exc).__name__}: {exc}")
            return None
        t, k = out.get("torch_ms"), out.get("triton_ms")
        return {**out, "speedup": round(t / k, 3) if t and k else None}

    def run_batch(self, batch: int) -> dict:
        """Every selected figure at one batch size, in groups that keep them apart: the loaders; the
        paper's fp32 NCHW set-up; autocast channels-last eager; the fast step as `dali-erkt distill`
        compiles it (memory is read in distill.dali, before any other compiled call); the teacher
        compiled alone, from a fresh dynamo cache."""
        from dali_erkt.engine import compiled
        self.b, self.res, self.memory = batch, {}, dict.fromkeys(MEMORY)
        self.compile_s = {"distill_step": None, "teacher": None}
        self.measure_all("loader.dali_gpu", "loader.dali_reference_gpu", "loader.dali_cpu",
                         "loader.dali_reference_cpu", "loader.torchvision")
        self.reset(channels_last=False)
        self.measure_all("teacher.fp32_nchw_eager", "distill.paper_style")
        self.reset(channels_last=self.rt.channels_last)
        self.fixed = self.synthetic_batch()
        self.measure_all("teacher.amp_cl_eager", "student.step")
        self.student_c, self.teacher_c = (compiled(m, self.rt) for m in (self.student, self.teacher))
        self.measure_all("distill.synthetic", "distill.dali", "distill.cached",
                         "distill.torchvision_fast")
        self.student_c = self.teacher_c = None
        self.reset(channels_last=self.rt.channels_last)
        self.measure_all("teacher.compiled")
        self.fixed = None
        self.reset(channels_last=self.rt.channels_last)
        kern = self.kernel_dist() if "kernels.dist" in self.only else None
        return batch_result(batch, self.res, self.memory, kern, self.compile_s, self.gpu)


def load_dataset(args, device: torch.device, tmp: Path):
    """(absolute paths, labels, classes, metadata); generates scenes when --data is not given."""
    from dali_erkt.data.dataset import scan
    from dali_erkt.synthetic import make_scenes
    root = Path(args.data or tmp / "scenes").resolve()
    meta = {"path": str(root) if args.data else None, "generated": False}
    if not args.data:  # enough distinct files to look like a data set, quick to render
        classes, per_class = (8, 40) if device.type == "cuda" else (4, 16)
        log(f"generating {classes} x {per_class} scenes at {args.image_size} px in {root} ...")
        make_scenes(root, classes=classes, per_class=per_class, size=args.image_size, seed=0)
        meta["generated"] = (f"dali_erkt.synthetic.make_scenes({classes} classes x {per_class}, "
                             f"{args.image_size} px, jpg)")
    classes, samples = scan(root)
    meta.update(classes=len(classes), images=len(samples))
    return [str(root / p) for p, _ in samples], [label for _, label in samples], classes, meta


def cover_run(paths, labels, batches, args):
    """Repeat the file list so that one epoch covers the longest timed figure: epoch ends (DALI
    drains and restarts its prefetch queue; DataLoader workers restart) stay out of the timing."""
    per_loader = max(args.warmup, 3, 2 * args.workers) + max(args.iters, 2 * args.workers) + 4
    reps = max(1, math.ceil(per_loader * max(batches) / len(paths)))
    return paths * reps, labels * reps, len(paths) * reps


def main(argv=None) -> int:
    args = parse_args(argv)
    only = parse_only(args.only)
    from dali_erkt.config import resolve_config
    from dali_erkt.errors import ErktError
    from dali_erkt.runtime import resolve_device, resolve_runtime
    try:
        gpu = resolve_device(args.device).type == "cuda"
    except ErktError as exc:
        usage_error(str(exc))
    batches = parse_batches(args.batch or ("30" if gpu else "8"))
    args.image_size = args.image_size or (256 if gpu else 64)
    args.iters = args.iters if args.iters is not None else (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    if args.iters < 1 or args.warmup < 0 or args.workers < 0:
        usage_error("--iters must be >= 1, --warmup and --workers >= 0")
    compile_flag = "off" if args.no_compile else None if gpu else "on" if args.compile_cpu else "off"
    start = time.perf_counter()
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="dali-erkt-bench-") as tmp:
        try:
            cfg = resolve_config("erkt", preset=args.preset, overrides=args.overrides, flags={
                "data.image_size": args.image_size, "run.device": args.device,
                "run.compile": compile_flag})
            rt = resolve_runtime(cfg.run, args.threads or args.workers)  # CPU: torch's threads too
            if rt.device.type == "cuda":
                torch.cuda.set_device(rt.device)
            paths, labels, classes, dmeta = load_dataset(args, rt.device, Path(tmp))
            paths, labels, dmeta["epoch_images"] = cover_run(paths, labels, batches, args)
            bench = Bench(args, cfg, rt, paths, labels, classes, only)
        except (ErktError, ValueError) as exc:
            usage_error(str(exc))
        if not bench.gpu:
            bench.note("memory", "GPU memory needs a CUDA device")
        elif "distill.dali" not in only:
            bench.note("memory", "read around distill.dali, which --only left out")
        if args.only is not None:
            bench.note("only", f"measured only {', '.join(only)} (--only)")
        # Smallest batch first: memory left cached by a larger batch cannot inflate its figure.
        results = {str(b): bench.run_batch(b) for b in sorted(batches)}
        report = {"meta": metadata(args, bench, batches, dmeta),
                  "results": {str(b): results[str(b)] for b in batches}, "notes": bench.notes}
        report["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    write(report, args.json, args.out)
    log(f"done in {report['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
