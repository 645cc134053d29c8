#!/usr/bin/env python
"""The GPU check (issue 17): every GPU figure the issue's targets need, in one command, in about
8 minutes on one H100/H200, written to OUTDIR/gpu_check.json and OUTDIR/gpu_check.md.

    python bench/gpu_check.py OUTDIR               # on a machine with CUDA and DALI
    python bench/gpu_check.py OUTDIR --quick       # tiny sizes on the CPU (the test suite runs it)

Steps, in this order, each a subprocess with a timeout (its cap, or what is left of --budget):

    env             card, capability, memory, versions (a child process: this one never starts CUDA)
    pytest-gpu      pytest -q -m gpu: pass / fail / skip counts
    epoch-cold      one short `distill` epoch (DALI loader, the three paper teachers, random
                    weights, generated scenes), fp16 + GradScaler, compiled, batch 30, under a
                    6 GiB cap: first-step seconds from an empty compiler cache, images/s, memory
    epoch-warm      the same in a second process with the same compiler cache: the warm start
    bench-b30-bf16  bench/throughput.py, batch 30, bf16: loader, ceiling, paper, cache figures
    cli-smoke       split, train-teacher 1 epoch, distill 1 epoch with --teacher-cache, distill
                    --resume (one more epoch), evaluate: exit codes
    bench-b128-bf16 bench/throughput.py, batch 128, bf16
    bench-b30-fp16  bench/throughput.py, batch 30, fp16 (the RTX 2060 precision)

A step that cannot run here (no CUDA, fp16 on the CPU, the budget spent) is listed as skipped
with the reason. Then every target of the issue's table: pass / fail / not measured, its figure.
--quick runs the same step functions at 32 px, batch 4, resnet10t models, on the CPU where there
is no CUDA. Exit status: 0 when every step that ran succeeded, 1 when one failed, 2 for bad input.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # report.py, throughput.py (imported where used: they load torch)
GIB = 1024 ** 3
CAP_GIB = 6.0  # the RTX 2060's memory
SMALL = "resnet10t"

# Per step: the longest it may take on the GPU (s); --quick scales these down (QUICK_CAP).
CAPS = {"env": 60, "pytest-gpu": 90, "epoch-cold": 200, "epoch-warm": 100, "bench-b30-bf16": 180,
        "cli-smoke": 150, "bench-b128-bf16": 180, "bench-b30-fp16": 120}
QUICK_CAP = 120
ORDER = tuple(CAPS)
# The figures each benchmark run needs for the targets (--only).
BENCH_RUNS = {
    "bench-b30-bf16": (30, "bf16", ("loader.dali_gpu", "loader.dali_reference_gpu",
                                    "distill.synthetic", "distill.paper_style", "distill.dali",
                                    "distill.cached")),
    "bench-b128-bf16": (128, "bf16", ("distill.synthetic", "distill.paper_style", "distill.dali")),
    "bench-b30-fp16": (30, "fp16", ("distill.synthetic", "distill.dali")),
}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fail_usage(msg: str):
    print(f"error: {msg}", file=sys.stderr, flush=True)  # one line, exit status 2
    raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="folder for gpu_check.json, gpu_check.md and logs/")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (32 px, batch 4, resnet10t), on the CPU where there is no CUDA")
    p.add_argument("--cache-dir", help="compiler cache folder (TORCHINDUCTOR_CACHE_DIR and "
                                       "TRITON_CACHE_DIR below it; default OUTDIR/compile-cache)")
    p.add_argument("--budget", type=float, help="seconds for all steps (default 470; --quick 400)")
    p.add_argument("--steps", help="comma list of steps to run (default all): " + ",".join(ORDER[1:]))
    p.add_argument("--commit", help="the commit to record where OUTDIR's tree is no git checkout")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one step's child part
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Running a child process within a budget.
# --------------------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.out = Path(args.outdir).resolve()
        self.logs = self.out / "logs"
        self.cache = Path(args.cache_dir).resolve() if args.cache_dir else self.out / "compile-cache"
        self.budget = args.budget if args.budget is not None else (400.0 if args.quick else 470.0)
        self.deadline = time.monotonic() + self.budget
        self.steps, self.gpu = {}, False
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
                        "PYTHONPATH", "").split(os.pathsep) if p]),
                    "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "inductor"),
                    "TRITON_CACHE_DIR": str(self.cache / "triton")}

    def cap(self, name: str) -> float:
        return min(CAPS[name], QUICK_CAP) if self.quick else CAPS[name]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], timeout: float, cwd=ROOT) -> dict:
        """`cmd` with its output in logs/<name>.log; rc (None on a timeout), seconds, log tail."""
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"{name}.log"
        t0 = time.monotonic()
        with open(path, "ab") as f:
            f.write(f"$ {subprocess.list2cmdline(cmd)}\n".encode())
            f.flush()
            # Its own process group: a timeout ends it with its children (DataLoader workers,
            # the compiler's worker pool), which would otherwise hold the GPU and the cores.
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                rc = None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = path.read_text(errors="replace").splitlines()
        return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "timeout_s": round(timeout, 1),
                "log": str(path), "tail": text[-25:]}

    def worker(self, name: str, spec: dict, timeout: float) -> dict:
        """This script's --worker part in a child: its JSON result, or the failure."""
        result = self.out / f"{name}.result.json"
        result.unlink(missing_ok=True)
        spec = {**spec, "result": str(result)}
        r = self.run(name, [sys.executable, str(Path(__file__).resolve()), str(self.out),
                            "--worker", json.dumps(spec)], timeout)
        if r["rc"] == 0 and result.exists():
            return {**json.loads(result.read_text()), "seconds": r["seconds"], "log": r["log"]}
        raise StepFailed(r, "timed out" if r["rc"] is None else f"exit status {r['rc']}")


class StepFailed(Exception):
    def __init__(self, run: dict, why: str):
        super().__init__(why)
        self.run = run


class Skip(Exception):
    """A step that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------
# The steps (the same functions in --quick; only the sizes differ).
# --------------------------------------------------------------------------------------------

def sizes(check: Check) -> dict:
    """Image size, batch, models and data of this mode."""
    if check.quick:
        return {"image_size": 32, "batch": 4, "teachers": [SMALL], "weights": [1.0], "student": SMALL,
                "classes": 4, "per_class": 12, "scene_px": 32, "device": "cuda" if check.gpu else "cpu"}
    # The paper's teachers, weights and student: the configuration's defaults (None: not set).
    return {"image_size": 256, "batch": 30, "teachers": None, "weights": None, "student": None,
            "classes": 8, "per_class": 50, "scene_px": 256, "device": "cuda"}


def step_env(check: Check, timeout: float) -> dict:
    return check.worker("env", {"kind": "env"}, timeout)


def step_pytest_gpu(check: Check, timeout: float) -> dict:
    xml = check.out / "pytest-gpu.xml"
    # --quick: one small module (its GPU tests skip without CUDA); the full check: every module.
    paths = ["tests/test_runtime.py"] if check.quick else []
    r = check.run("pytest-gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs",
                                 "-p", "no:cacheprovider", f"--junitxml={xml}", *paths], timeout)
    if r["rc"] is None or not xml.exists():
        raise StepFailed(r, "timed out" if r["rc"] is None else f"exit status {r['rc']}, no report")
    suites = ET.parse(xml).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts = {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
              "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"]}
    # pytest exits 5 when -m gpu selects nothing, 1 on a failure.
    ok = r["rc"] in (0, 5) and not counts["failed"] and not counts["errors"]
    out = {**counts, "rc": r["rc"], "seconds": r["seconds"], "log": r["log"]}
    if not ok:
        raise StepFailed({**r, "counts": counts}, f"{counts['failed']} failed, {counts['errors']} errors")
    return out


def epoch_spec(check: Check, cold: bool) -> dict:
    s = sizes(check)
    return {"kind": "epoch", "cold": cold, "data": str(check.out / "scenes"),
            "split": str(check.out / "epoch-split"), "run": str(check.out / "epoch-run"),
            "image_size": s["image_size"], "batch": s["batch"], "teachers": s["teachers"],
            "weights": s["weights"], "student": s["student"], "device": s["device"],
            "precision": "fp16" if check.gpu else "fp32", "compile": check.gpu,
            "cap_gib": CAP_GIB if check.gpu else None}


def step_epoch_cold(check: Check, timeout: float) -> dict:
    inductor = check.cache / "inductor"
    cached = inductor.is_dir() and any(inductor.iterdir())
    out = check.worker("epoch-cold", epoch_spec(check, cold=True), timeout)
    out["cache_was_empty"] = not cached
    if not check.gpu:
        out["note"] = ("CPU: fp32 and eager (fp16 needs CUDA; compiling is off on the CPU): the "
                       "code path only, no memory cap")
    return out


def step_epoch_warm(check: Check, timeout: float) -> dict:
    if not check.gpu:
        raise Skip("no CUDA: the CPU epoch runs eager, so a warm start has no compiler cache to reuse")
    return check.worker("epoch-warm", epoch_spec(check, cold=False), timeout)


def bench_step(name: str):
    batch, precision, only = BENCH_RUNS[name]

    def step(check: Check, timeout: float) -> dict:
        if precision == "fp16" and not check.gpu:
            raise Skip("fp16 needs CUDA (resolve_runtime refuses run.precision=fp16 on the CPU)")
        if check.quick and batch != 30:
            raise Skip("--quick: one benchmark batch size (batch 30's step at --quick sizes)")
        s = sizes(check)
        out = check.out / f"{name}.json"
        cmd = [sys.executable, str(BENCH / "throughput.py"), "--json", "--out", str(out),
               "--data", str(check.out / "scenes"),  # the check's scenes: generated once
               "--batch", str(s["batch"] if check.quick else batch), "--only", ",".join(only),
               "--set", f"run.precision={precision}"]
        if check.quick:
            cmd += ["--device", s["device"], "--image-size", "32", "--iters", "1", "--warmup", "1",
                    "--workers", "1", "--set", f"model.teachers=[{SMALL}]",
                    "--set", "model.teacher_weights=[1]", "--set", f"model.arch={SMALL}"]
        r = check.run(name, cmd, timeout)
        if r["rc"] != 0 or not out.exists():
            raise StepFailed(r, "timed out" if r["rc"] is None else f"exit status {r['rc']}")
        report = json.loads(out.read_text())
        (res,) = report["results"].values()
        figures = {k: (v or {}).get("images_per_s") for k, v in res["figures"].items()}
        return {"batch": report["meta"]["batches"][0], "precision": report["meta"]["precision"],
                "compile": report["meta"]["compile"], "figures": figures, "ratios": res["ratios"],
                "memory": res["memory"], "compile_seconds": res["compile_seconds"],
                "notes": report["notes"], "seconds": r["seconds"], "json": str(out), "log": r["log"]}
    return step


def step_cli_smoke(check: Check, timeout: float) -> dict:
    """The commands a user runs, on a small generated set; every exit code recorded."""
    s, root = sizes(check), check.out / "smoke"
    shutil.rmtree(root, ignore_errors=True)
    cli = [sys.executable, "-m", "dali_erkt.cli"]
    common = ["--split", str(root / "split"), "--image-size", str(min(s["image_size"], 64)),
              "--batch-size", str(min(s["batch"], 16)), "--no-compile", "--device", s["device"]]
    if check.gpu:
        common += ["--precision", "fp16"]  # the RTX 2060 path, its scaler state through --resume
    student = ["--teachers", str(root / "teachers"), "--out", str(root / "student"),
               "--teacher-cache", str(root / "cache"), "--no-progress", "--set",
               f"model.teachers=[{SMALL}]", "--set", "model.teacher_weights=[1]", "--set",
               f"model.arch={SMALL}"]
    commands = [
        ("split", ["split", str(check.out / "scenes"), "--train-ratio", "0.5", "--seed", "0",
                   "--out", str(root / "split")]),
        ("train-teacher", ["train-teacher", "--arch", SMALL, "--out", str(root / "teachers" / SMALL),
                           "--epochs", "1", "--no-progress", *common]),
        ("distill", ["distill", "--epochs", "1", *student, *common]),
        ("distill --resume", ["distill", "--resume", "--epochs", "2", "--allow-changes", *student,
                              *common]),
        ("evaluate", ["evaluate", "--split", str(root / "split"), "--checkpoint",
                      str(root / "student" / "last.pt"), "--out", str(root / "eval"), "--json",
                      "--device", s["device"]]),
    ]
    end, codes, seconds = time.monotonic() + timeout, {}, {}
    for label, cmd in commands:
        left = end - time.monotonic()
        if left < 1:
            break
        r = check.run("cli-smoke", cli + cmd, left)
        codes[label], seconds[label] = r["rc"], r["seconds"]
        if r["rc"] != 0:
            break  # the later commands need this one's files
    out = {"exit_codes": codes, "seconds": seconds, "not_run": [c for c, _ in commands if c not in codes],
           "precision": "fp16" if check.gpu else "auto (fp32 on the CPU)",
           "log": str(check.logs / "cli-smoke.log")}
    if any(v != 0 for v in codes.values()) or out["not_run"]:
        tail = (check.logs / "cli-smoke.log").read_text(errors="replace").splitlines()[-25:]
        raise StepFailed({"tail": tail, **out}, f"exit codes {codes}")
    return out


STEPS = {"env": step_env, "pytest-gpu": step_pytest_gpu, "epoch-cold": step_epoch_cold,
         "epoch-warm": step_epoch_warm, "cli-smoke": step_cli_smoke,
         **{name: bench_step(name) for name in BENCH_RUNS}}


# --------------------------------------------------------------------------------------------
# Child parts (--worker): the environment, and one short distill epoch.
# --------------------------------------------------------------------------------------------

def worker_env() -> dict:
    import torch

    from report import cpu_model, versions
    out = {"versions": versions(), "cuda": torch.cuda.is_available(), "cpu": cpu_model(),
           "cpu_count": os.cpu_count()}
    if out["cuda"]:
        props = torch.cuda.get_device_properties(0)
        out.update(card=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(props.total_memory / GIB, 1), cuda_version=torch.version.cuda)
    else:
        out["card"] = None
    return out


def worker_epoch(spec: dict) -> dict:
    """One epoch of the engine's own distillation (setup, train_one_epoch) with the first steps
    timed alone; memory read after it, while the loader and the step's buffers are alive."""
    t_start = time.perf_counter()
    import torch

    from dali_erkt.commands.data import split as write_split
    from dali_erkt.config import resolve_config
    from dali_erkt.data.dataset import load_split
    from dali_erkt.engine import setup, train_one_epoch
    from dali_erkt.models import TeacherEnsemble, create_model
    from dali_erkt.runtime import resolve_runtime
    from dali_erkt.tasks import Distillation
    from dali_erkt.teachers import LiveTeacher
    from throughput import Bench
    if not Path(spec["split"], "train.txt").exists():
        write_split(spec["data"], 0.8, spec["split"], seed=0, skip_check=True)
    split = load_split(spec["split"])
    cfg = resolve_config("erkt", flags={
        "data.image_size": spec["image_size"], "data.batch_size": spec["batch"],
        "model.teachers": spec["teachers"] and tuple(spec["teachers"]),
        "model.teacher_weights": spec["weights"] and tuple(spec["weights"]),
        "model.arch": spec["student"], "run.device": spec["device"],
        "run.precision": spec["precision"], "run.compile": "on" if spec["compile"] else "off",
        "optim.epochs": 1})
    rt = resolve_runtime(cfg.run)
    gpu = rt.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(rt.device)) if gpu else (lambda: None)
    if gpu and spec["cap_gib"]:
        total = torch.cuda.get_device_properties(rt.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total), rt.device)
    m, n = cfg.model, len(split.classes)
    ensemble = TeacherEnsemble([create_model(a, n) for a in m.teachers], m.teacher_weights, m.combine)
    task = Distillation.from_config(LiveTeacher(ensemble), cfg.loss)
    s = setup(cfg, split, task, rt, None, lambda line: None)
    first, marks = [], {}

    def timed_step(batch):  # the first 3 steps alone (compile, CUDA graph warm-up, replay)
        if len(first) >= 3:
            return s.step(batch)
        t0 = time.perf_counter()
        parts = s.step(batch)
        sync()
        first.append(round(time.perf_counter() - t0, 3))
        if len(first) == 1:  # from the worker's start (after Python's): imports, models, loaders
            marks["start_to_first_step_s"] = round(time.perf_counter() - t_start, 3)
        if len(first) == 3:
            marks["steady_from"] = time.perf_counter()
        return parts

    class Bar:  # train_one_epoch's progress bar, silent
        def update(self, n):
            pass

        def set_postfix(self, **kw):
            pass
    out = {"device": str(rt.device), "precision": rt.precision, "compile": rt.compile_mode
           if rt.compile else "off", "batch": cfg.data.batch_size, "image_size": cfg.data.image_size,
           "teachers": list(m.teachers), "student": m.arch, "train_images": len(split.train),
           "batches": s.train_loader.batches_per_epoch, "cap_gib": spec["cap_gib"] if gpu else None,
           "scaler_enabled": s.scaler.is_enabled(), "cold": spec["cold"]}
    if gpu:
        torch.cuda.reset_peak_memory_stats(rt.device)
    s.model.train()
    try:
        parts, seen = train_one_epoch(timed_step, task.epoch_batches(s.train_loader, 0), task, rt,
                                      10 ** 9, Bar())
    except torch.cuda.OutOfMemoryError as exc:
        return {**out, "completed": False, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    sync()
    t_end = time.perf_counter()
    steady = seen - 3 * cfg.data.batch_size  # images after the three steps timed alone
    rate = round(steady / (t_end - marks["steady_from"]), 2) if steady > 0 and "steady_from" in marks \
        else None
    out.update(completed=True, loss=parts["loss"], first_steps_s=first, first_step_s=first[0],
               start_to_first_step_s=marks.get("start_to_first_step_s"), images_per_s=rate,
               steady_images=max(steady, 0),
               scale=s.scaler.get_scale() if s.scaler.is_enabled() else None)
    if gpu:
        holder = type("Holder", (), {"device": rt.device, "memory": {}})()
        Bench.read_memory(holder)  # throughput.py's reading: torch peaks, device total - free
        out["memory"] = holder.memory
    out["process_s"] = round(t_end - t_start, 1)
    s.train_loader.close()
    s.test_loader.close()
    return out


def worker_main(args) -> int:
    spec = json.loads(args.worker)
    try:
        result = worker_env() if spec["kind"] == "env" else worker_epoch(spec)
    except Exception:
        traceback.print_exc()
        return 1
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# The issue's targets, from the steps' figures.
# --------------------------------------------------------------------------------------------

def judged(figure, goal: float, above: bool = True) -> str:
    if figure is None:
        return "not measured"
    return "pass" if (figure >= goal if above else figure <= goal) else "fail"


def targets(steps: dict, gpu: bool) -> list[dict]:
    """Every row of issue 17's table; "not measured" with the reason where a figure is missing.
    Ratios come from one benchmark process (one run, one card)."""
    def res(name):
        st = steps.get(name, {})
        return st.get("result") or {} if st.get("status") == "ok" else {}

    def why(name):
        st = steps.get(name, {})
        return st.get("reason") or (f"step {name} {st.get('status')}" if st else f"step {name} not run")

    b30, b128, cold, warm = res("bench-b30-bf16"), res("bench-b128-bf16"), res("epoch-cold"), res("epoch-warm")
    rows = []

    def row(target, goal, figure, status, source, note=None):
        extra = {}
        if not gpu:  # the CPU's figure says nothing about the claim: kept apart, not judged
            extra = {"cpu_figure": figure}
            figure, status, note = None, "not measured", "no CUDA device: the targets are GPU claims"
        rows.append({"target": target, "goal": goal, "figure": figure, "status": status,
                     "source": source, **({"note": note} if note else {}), **extra})

    def ratio_row(target, goal_text, bench, name, step, goal):
        from report import RATIOS
        value = (bench.get("ratios") or {}).get(name)
        notes = [f"{f}: {(bench.get('notes') or {})[f]}" for f in RATIOS[name]
                 if f in (bench.get("notes") or {})]
        row(target, goal_text, value, judged(value, goal), f"{step}: {name}",
            None if value is not None else why(step) if not bench else
            "; ".join(notes) or "a figure of the ratio is null (see the step's notes)")
    ratio_row("plan-driven GPU loader vs DALI's reference pipeline", ">= 0.9", b30,
              "dali_vs_reference_gpu", "bench-b30-bf16", 0.9)
    ratio_row("distill.dali vs distill.synthetic, batch 30", ">= 0.95", b30, "dali_vs_ceiling",
              "bench-b30-bf16", 0.95)
    ratio_row("distill.dali vs distill.synthetic, batch 128", ">= 0.95", b128, "dali_vs_ceiling",
              "bench-b128-bf16", 0.95)
    ratio_row("distill.dali vs the paper-style loop, batch 30", ">= 4.5x", b30, "dali_vs_paper",
              "bench-b30-bf16", 4.5)
    ratio_row("distill.dali vs the paper-style loop, batch 128", ">= 3.1x", b128, "dali_vs_paper",
              "bench-b128-bf16", 3.1)
    # fp16 + scaler, compiled, batch 30, with DALI: device memory (torch, DALI, context) <= 5.0 GiB
    # and the epoch completed under the 6 GiB cap (torch's allocator; DALI's pools are outside it).
    used = (cold.get("memory") or {}).get("memory.device_used_gib")
    if cold and not cold.get("completed"):
        row("fp16 + grad scaler, compiled, batch 30: memory with DALI", "<= 5.0 GiB, one epoch in "
            "a 6 GiB cap", used, "fail", "epoch-cold", cold.get("error"))
    else:
        row("fp16 + grad scaler, compiled, batch 30: memory with DALI",
            "<= 5.0 GiB, one epoch in a 6 GiB cap", used, judged(used, 5.0, above=False),
            "epoch-cold: memory.device_used_gib (cap: torch.cuda.set_per_process_memory_fraction)",
            None if used is not None else why("epoch-cold"))
    first = warm.get("first_step_s")
    row("warm start: a second run's first step", "<= 15 s", first, judged(first, 15.0, above=False),
        "epoch-warm: first_step_s" + (f" (cold: {cold.get('first_step_s')} s)" if cold else ""),
        None if first is not None else why("epoch-warm"))
    syn = (b30.get("figures") or {}).get("distill.synthetic")
    row("the three teachers run concurrently, distill.synthetic at batch 30", ">= 1.3x",
        syn, "not measured", "bench-b30-bf16: distill.synthetic (images/s)",
        "no concurrent-teacher path exists yet: this is today's sequential figure, the 1.0x side "
        "of the comparison")
    ratio_row("teacher cache replay vs live teachers, batch 30", ">= 2.5x", b30, "cached_vs_dali",
              "bench-b30-bf16", 2.5)
    return rows


# --------------------------------------------------------------------------------------------
# The check.
# --------------------------------------------------------------------------------------------

def git_commit(given: str | None) -> str | None:
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


def make_scenes_for(check: Check) -> str:
    from dali_erkt.synthetic import make_scenes
    s = sizes(check)
    make_scenes(check.out / "scenes", classes=s["classes"], per_class=s["per_class"],
                size=s["scene_px"], seed=0)
    return f"make_scenes({s['classes']} classes x {s['per_class']}, {s['scene_px']} px)"


def run_step(check: Check, name: str, chosen) -> None:
    t0 = time.monotonic()
    left = check.left()
    minimum = 5.0 if check.quick else 30.0
    entry = {"cap_s": check.cap(name)}
    (check.logs / f"{name}.log").unlink(missing_ok=True)
    try:
        if chosen is not None and name not in chosen and name != "env":
            raise Skip("not in --steps")
        if name != "env" and name != "pytest-gpu" and name != "cli-smoke" and not check.gpu \
                and not check.quick:
            raise Skip("no CUDA device")  # the full check measures nothing on the CPU
        if left < minimum:
            raise Skip(f"budget spent: {max(left, 0):.0f} s left of --budget {check.budget:.0f}")
        log(f"{name}: up to {min(check.cap(name), left):.0f} s")
        entry.update(status="ok", result=STEPS[name](check, min(check.cap(name), left)))
    except Skip as exc:
        entry.update(status="skipped", reason=str(exc))
    except StepFailed as exc:
        entry.update(status="failed", reason=str(exc), tail=exc.run.get("tail"),
                     result={k: v for k, v in exc.run.items() if k != "tail"})
    except Exception as exc:  # a bug in this script: the other steps still run
        entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                     tail=traceback.format_exc().splitlines()[-10:])
    entry["seconds"] = round(time.monotonic() - t0, 1)
    log(f"{name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""))
    check.steps[name] = entry


def summary_of(name: str, entry: dict) -> str:
    r = entry.get("result") or {}
    if entry["status"] != "ok":
        return entry.get("reason", "")
    if name == "env":
        return f"{r.get('card') or r.get('cpu')}; torch {r['versions']['torch']}, DALI {r['versions']['dali']}"
    if name == "pytest-gpu":
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if name.startswith("epoch"):
        mem = (r.get("memory") or {}).get("memory.device_used_gib")
        cold = "" if r.get("cache_was_empty", True) else " (cache not empty: not a cold start)"
        if not r.get("completed"):
            return f"{r['precision']}, batch {r['batch']}: did not complete: {r.get('error')}"
        return (f"{r['precision']}, compile {r['compile']}, batch {r['batch']}: first step "
                f"{r.get('first_step_s')} s{cold}, {r.get('images_per_s')} images/s"
                + (f", device used {mem} GiB (cap {r['cap_gib']} GiB)" if mem is not None else ""))
    if name == "cli-smoke":
        return "exit codes: " + ", ".join(f"{k} {v}" for k, v in r["exit_codes"].items())
    figs = ", ".join(f"{k} {v}" for k, v in r["figures"].items() if v is not None)
    return f"batch {r['batch']} {r['precision']}: {figs}"


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# GPU check: {m['card'] or 'no CUDA device'}", "",
             f"{m['date']}, commit {m['commit'] or 'unknown'}, torch {m['versions'].get('torch')}, "
             f"DALI {m['versions'].get('dali')}, {'--quick' if m['quick'] else 'full'} mode, "
             f"budget {m['budget_s']:.0f} s, {m['seconds']} s in all", "",
             "| step | status | seconds | result |", "|---|---|---|---|"]
    for name, e in report["steps"].items():
        lines.append(f"| {name} | {e['status']} | {e['seconds']} | {summary_of(name, e)} |")
    lines += ["", f"## Targets (issue 17), {m['card'] or 'no CUDA device'}", "",
              "| target | goal | figure | status | from |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        fig = "-" if t["figure"] is None else t["figure"]
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']} | {t['goal']} | {fig} | {t['status']} | {t['source']}{note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    chosen = None
    if args.steps:
        chosen = [x.strip() for x in args.steps.split(",") if x.strip()]
        unknown = [x for x in chosen if x not in STEPS]
        if unknown or not chosen:
            fail_usage(f"--steps: unknown step {', '.join(unknown) or repr(args.steps)}: choose from "
                       f"{', '.join(ORDER[1:])}")
    if args.budget is not None and args.budget <= 0:
        fail_usage("--budget must be a positive number of seconds")
    check = Check(args)
    try:
        check.out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=check.out, prefix=".probe-"):
            pass
        check.cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail_usage(f"cannot write to {args.outdir} ({exc.strerror or exc}): give a writable folder")
    t0, date = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # side by side: none needs another
        scenes = pool.submit(make_scenes_for, check)
        pool.submit(run_step, check, "pytest-gpu", chosen)
        run_step(check, "env", chosen)
        try:
            dataset = scenes.result()
        except Exception as exc:
            fail_usage(f"could not generate the scenes in {check.out / 'scenes'}: {exc}")
    check.steps = {n: check.steps[n] for n in ORDER if n in check.steps}  # env first
    env = check.steps["env"].get("result") or {}
    check.gpu = bool(env.get("cuda"))
    if not check.gpu and not args.quick:
        log("no CUDA device: the full check measures nothing here (--quick runs on the CPU)")
    for name in ORDER[2:]:
        run_step(check, name, chosen)
    check.steps = {n: check.steps[n] for n in ORDER if n in check.steps}
    report = {"meta": {"date": date.isoformat(timespec="seconds"), "card": env.get("card"),
                       "cuda": check.gpu, "commit": git_commit(args.commit),
                       "versions": env.get("versions") or {}, "capability": env.get("capability"),
                       "memory_gib": env.get("memory_gib"), "cuda_version": env.get("cuda_version"),
                       "cpu": env.get("cpu"),
                       "quick": args.quick, "budget_s": check.budget, "dataset": dataset,
                       "cache_dir": str(check.cache), "command": subprocess.list2cmdline(
                           [os.path.basename(sys.executable)] + sys.argv),
                       "seconds": round(time.monotonic() - t0, 1)},
              "steps": check.steps, "targets": targets(check.steps, check.gpu)}
    (check.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (check.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    failed = [n for n, e in check.steps.items() if e["status"] == "failed"]
    if failed:
        log(f"failed: {', '.join(failed)} (logs in {check.logs})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
