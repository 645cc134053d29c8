"""The output side of bench/throughput.py: the figures' names and table labels, the ratios and the
issue's targets derived from the figures, the JSON metadata, the text table, and the guard that
keeps stdout to the report alone. Nothing here measures; throughput.py imports it."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

FIGURES = (
    ("loader.dali_gpu", "loader: DALI, GPU decode + ops"),
    ("loader.dali_reference_gpu", "loader: DALI reference, GPU"),
    ("loader.dali_cpu", "loader: DALI, CPU only"),
    ("loader.dali_reference_cpu", "loader: DALI reference, CPU"),
    ("loader.torchvision", "loader: torchvision DataLoader"),
    ("teacher.fp32_nchw_eager", "teacher fwd: fp32 NCHW eager"),
    ("teacher.amp_cl_eager", "teacher fwd: autocast CL eager"),
    ("teacher.compiled", "teacher fwd: compiled"),
    ("student.step", "student step: autocast CL"),
    ("distill.synthetic", "distill: synthetic input (ceiling)"),
    ("distill.paper_style", "distill: paper-style loop"),
    ("distill.dali", "distill: DALI + fast step"),
    ("distill.cached", "distill: DALI + teacher cache + student"),
    ("distill.torchvision_fast", "distill: torchvision + fast step"),
)
# Each ratio: (numerator figure, denominator figure), both in images/s.
# dali_vs_reference_*: the plan-driven pipeline against bench/reference.py's, which draws its
# parameters with DALI's own random operators and reads with fn.readers.file.
RATIOS = {"dali_vs_ceiling": ("distill.dali", "distill.synthetic"),
          "cached_vs_dali": ("distill.cached", "distill.dali"),
          "dali_vs_paper": ("distill.dali", "distill.paper_style"),
          "dali_vs_reference_gpu": ("loader.dali_gpu", "loader.dali_reference_gpu"),
          "dali_vs_reference_cpu": ("loader.dali_cpu", "loader.dali_reference_cpu"),
          "dali_cpu_vs_torchvision": ("loader.dali_cpu", "loader.torchvision")}
MEMORY = ("memory.torch_peak_gib", "memory.torch_peak_reserved_gib", "memory.device_used_gib",
          "memory.device_total_gib")
# The claims for a GPU run: (label, ratio or memory key, bound, batch sizes it applies to).
TARGETS = (("dali_vs_ceiling >= 0.95", "dali_vs_ceiling", 0.95, None),
           ("dali_vs_reference_gpu >= 0.9", "dali_vs_reference_gpu", 0.9, None),
           ("dali_vs_reference_cpu >= 0.9", "dali_vs_reference_cpu", 0.9, None),
           ("dali_cpu_vs_torchvision >= 1.0", "dali_cpu_vs_torchvision", 1.0, None),
           ("dali_vs_paper >= 3.0", "dali_vs_paper", 3.0, (30,)),
           ("dali_vs_paper >= 2.5", "dali_vs_paper", 2.5, (128,)),
           ("memory.device_used_gib < 5.0", "memory.device_used_gib", 5.0, (30,)))


def ratio(a, b):
    return round(a["images_per_s"] / b["images_per_s"], 4) if a and b and b["images_per_s"] else None


def ratios(figures: dict) -> dict:
    """RATIOS from one batch size's figures; None where either side is missing or null."""
    return {name: ratio(figures.get(a), figures.get(b)) for name, (a, b) in RATIOS.items()}


def check_targets(batch: int, values: dict, gpu: bool) -> dict:
    """The issue's GPU claims checked on this run: True/False, or None where not applicable."""
    return {label: None if values.get(key) is None or not gpu else
            bool(values[key] < bound) if key.startswith("memory") else bool(values[key] >= bound)
            for label, key, bound, sizes in TARGETS if sizes is None or batch in sizes}


def batch_result(batch: int, figures: dict, memory: dict, kernel, compile_s: dict, gpu: bool) -> dict:
    """One batch size's entry in `results`: its figures in table order, the ratios, memory, the DIST
    kernel timing, the targets and the compile times."""
    r = ratios(figures)
    return {"figures": {n: figures[n] for n, _ in FIGURES if n in figures}, "ratios": r,
            "memory": memory, "kernels.dist": kernel,
            "targets": check_targets(batch, {**r, **memory}, gpu), "compile_seconds": compile_s}


def compile_label(rt) -> str:
    return rt.compile_mode if rt.compile else "off"


def cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def version(module: str):
    with contextlib.suppress(Exception):
        return __import__(module, fromlist=["__version__"]).__version__


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": version("torchvision"), "timm": version("timm"),
            "dali": version("nvidia.dali")}


def settings(bench) -> dict:
    """What each group of figures runs with (meta.settings)."""
    groups = {"paper_style": (bench.paper_rt, False), "eager": (bench.eager_rt, bench.gpu),
              "fast_step": (bench.rt, bench.gpu)}
    return {name: {"precision": rt.precision, "channels_last": rt.channels_last,
                   "compile": compile_label(rt),
                   "optimizer": "AdamW (fused)" if fused else "AdamW (foreach)"}
            for name, (rt, fused) in groups.items()}


def metadata(args, bench, batches, dataset_meta) -> dict:
    """The JSON's `meta`: the machine, the versions, and what the run measured with (a Bench)."""
    cfg, rt, b, m = bench.cfg, bench.rt, bench, bench.cfg.model
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "device": str(rt.device),
            "card": torch.cuda.get_device_name(rt.device) if b.gpu else cpu_model(),
            "cpu_count": os.cpu_count(), "batches": batches, "versions": versions(),
            "image_size": cfg.data.image_size, "iters": args.iters, "warmup": args.warmup,
            "workers": args.workers, "dataset": dataset_meta, "only": list(b.only),
            "precision": rt.precision, "compile": compile_label(rt),
            "channels_last": rt.channels_last, "preset": cfg.preset, "teachers": list(m.teachers),
            "teacher_weights": list(m.teacher_weights), "combine": m.combine, "student": m.arch,
            "loader_fed_iters": b.tv_iters, "loader_fed_warmup": b.tv_warmup,
            "dali_loader_warmup": b.dali_warmup,
            "compiled_warmup": b.warm_c, "dali_threads": b.threads, "dali_dtype": cfg.data.dtype,
            "torch_threads": torch.get_num_threads(),
            "dali_prefetch": cfg.data.prefetch, "settings": settings(b)}


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(report: dict) -> str:
    """The report as text: one column per batch size, then ratios, memory, compile times, the
    DIST kernel (where timed), the targets (where judged) and the notes."""
    meta, batches, width = report["meta"], report["meta"]["batches"], 36
    per = [report["results"][str(b)] for b in batches]

    def row(label, values, fmt):
        return f"{label:<{width}}" + "".join(f"{'-' if v is None else fmt(v):>14}" for v in values)

    data, v = meta["dataset"], meta["versions"]
    lines = [f"dali-erkt throughput | {meta['card']} ({meta['device']}) | torch {v['torch']} | "
             f"DALI {v.get('dali')} | {meta['image_size']} px | {meta.get('precision', '?')} | "
             f"compile {meta.get('compile', '?')}",
             f"data: {data.get('path') or data.get('generated')} ({data['classes']} classes, "
             f"{data['images']} images)", "", row("images/s", [f"batch {b}" for b in batches], str)]
    lines += [row(label, [(r["figures"].get(n) or {}).get("images_per_s") for r in per], fmt_rate)
              for n, label in FIGURES if any(n in r["figures"] for r in per)]
    sections = [("ratios", "ratios", RATIOS, "{:.2f}x"),
                ("memory (GiB, around distill.dali)", "memory", MEMORY, "{:.2f}"),
                ("compile seconds (first call)", "compile_seconds", ("distill_step", "teacher"),
                 "{:.1f}")]
    if any((r.get("kernels.dist") or {}).get("torch_ms") is not None for r in per):
        sections.append(("DIST loss fwd+bwd (ms)", "kernels.dist", ("torch_ms", "triton_ms"), "{:.3f}"))
    for title, key, names, fmt in sections:
        lines += ["", title] + [row(f"  {k}", [(r[key] or {}).get(k) for r in per], fmt.format)
                                for k in names]
    checks = [f"  batch {b}: {label}: {'pass' if ok else 'FAIL'}"
              for b, r in zip(batches, per) for label, ok in r["targets"].items() if ok is not None]
    notes = [f"  {k}: {text}" for k, text in report["notes"].items()]
    return "\n".join(lines + (["", "targets"] + checks if checks else [])
                     + (["", "notes"] + notes if notes else []))


@contextlib.contextmanager
def stdout_to_stderr():
    """fd 1 (libraries, forked workers) goes to stderr until the report: --json prints one object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def write(report: dict, as_json: bool, out: str | None) -> None:
    """The JSON to `out` (if given); stdout gets the JSON with --json, else the table."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text if as_json else table(report), flush=True)
