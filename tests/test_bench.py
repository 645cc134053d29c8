"""bench/throughput.py on the CPU: it completes at CI sizes and its JSON holds every figure.

The numbers themselves are not checked (the CPU says nothing about GPU speed); only that each
figure the CPU can measure is a positive rate, and each GPU-only one is null with a reason.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"

FIGURES = ("loader.dali_gpu", "loader.dali_reference_gpu", "loader.dali_cpu",
           "loader.dali_reference_cpu", "loader.torchvision", "teacher.fp32_nchw_eager",
           "teacher.amp_cl_eager", "teacher.compiled", "student.step", "distill.synthetic",
           "distill.paper_style", "distill.dali", "distill.cached", "distill.torchvision_fast")
# teacher.compiled: unless --compile-cpu
GPU_ONLY = ("loader.dali_gpu", "loader.dali_reference_gpu", "teacher.compiled")
MEMORY = ("memory.torch_peak_gib", "memory.torch_peak_reserved_gib", "memory.device_used_gib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--json", "--batch", "4,2",
           "--iters", "1", "--warmup", "1", "--image-size", "32", "--workers", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_stdout_is_one_json_object_and_out_file_matches(run):
    proc, out = run
    report = json.loads(proc.stdout)  # fails on any stray text around the object
    assert json.loads(out.read_text()) == report
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["batches"] == [4, 2] and meta["image_size"] == 32
    for key in ("card", "date", "command", "versions", "dataset", "iters", "warmup"):
        assert meta[key] is not None, key
    assert meta["versions"]["torch"] and meta["dataset"]["classes"] >= 2


def test_every_figure_present_numbers_or_null_with_note(run):
    report = json.loads(run[0].stdout)
    notes = report["notes"]
    assert list(report["results"]) == ["4", "2"]  # the order given on the command line
    for batch, res in report["results"].items():
        figures = res["figures"]
        assert tuple(figures) == FIGURES
        for name in FIGURES:
            fig = figures[name]
            if name in GPU_ONLY:
                assert fig is None and notes.get(name), name
            else:
                assert fig is not None, f"{name} at batch {batch}: {notes.get(name)}"
                assert fig["images_per_s"] > 0 and fig["images"] >= int(batch) and fig["seconds"] > 0
        for key, value in res["ratios"].items():
            assert value is None or value > 0, key
        # These ratios have their inputs on the CPU, so they are numbers here; the GPU one is null.
        for key in ("dali_vs_ceiling", "dali_vs_paper", "dali_vs_reference_cpu",
                    "dali_cpu_vs_torchvision"):
            assert res["ratios"][key] is not None, key
        assert res["ratios"]["dali_vs_reference_gpu"] is None
        assert all(res["memory"][k] is None for k in MEMORY) and notes.get("memory")
        assert res["kernels.dist"]["torch_ms"] is None  # CUDA events only
        assert all(v is None for v in res["targets"].values())  # GPU claims: not judged on a CPU
        assert res["compile_seconds"] == {"distill_step": None, "teacher": None}


def test_table_formats_a_report(run):
    mod = _module()
    text = mod.table(json.loads(run[0].stdout))
    assert "batch 4" in text and "batch 2" in text
    for _, label in mod.FIGURES:
        assert label in text
    assert "dali_vs_paper" in text and "loader.dali_gpu:" in text  # ratios and notes


def _module():
    spec = importlib.util.spec_from_file_location("throughput_mod", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batch_list_parsing():
    mod = _module()
    assert mod.parse_batches("30,128") == [30, 128]
    assert mod.parse_batches("8, 8,4") == [8, 4]
    for bad in ("0", "x", ""):
        with pytest.raises(SystemExit):
            mod.parse_batches(bad)


TINY = ["--device", "cpu", "--json", "--batch", "2", "--iters", "1", "--warmup", "0",
        "--image-size", "32", "--workers", "0", "--set", "model.teachers=[resnet10t]",
        "--set", "model.teacher_weights=[1]", "--set", "model.arch=resnet10t"]


def test_only_measures_just_the_named_figures():
    only = ("loader.dali_cpu", "loader.torchvision")
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--only", ",".join(only)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["meta"]["only"] == list(only) and report["notes"].get("only")
    res = report["results"]["2"]
    for name in FIGURES:
        fig = res["figures"].get(name)
        if name in only:
            assert fig is not None, f"{name}: {report['notes'].get(name)}"
            assert fig["images_per_s"] > 0 and fig["images"] >= 2 and fig["seconds"] > 0
        else:  # not run: absent, or null with a note
            assert fig is None and (name not in res["figures"] or report["notes"].get(name)), name
    # Only the ratio of the two loaders measured is a number.
    assert res["ratios"].pop("dali_cpu_vs_torchvision") > 0
    assert all(v is None for v in res["ratios"].values()) and res["kernels.dist"] is None
    text = _module().table(report)
    assert "loader: DALI, CPU only" in text and "distill: paper-style loop" not in text


def test_ci_loader_comparison_gives_its_figures_and_ratios():
    """The issue's CI command, at a small image size: the plan-driven DALI CPU pipeline, the
    reference DALI pipeline and the torchvision twin, side by side, and the ratios between them."""
    only = ("loader.dali_cpu", "loader.dali_reference_cpu", "loader.torchvision")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--image-size", "48",
                           "--batch", "6", "--iters", "2", "--warmup", "1", "--workers", "1",
                           "--only", ",".join(only), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)["results"]["6"]
    for name in only:
        assert res["figures"][name]["images_per_s"] > 0, name
    for key in ("dali_vs_reference_cpu", "dali_cpu_vs_torchvision"):
        assert res["ratios"][key] > 0, key
    expected = res["figures"]["loader.dali_cpu"]["images_per_s"] / \
        res["figures"]["loader.dali_reference_cpu"]["images_per_s"]
    assert res["ratios"]["dali_vs_reference_cpu"] == pytest.approx(expected, rel=1e-3)
    assert res["ratios"]["dali_vs_reference_gpu"] is None  # its figures were not run


def test_unknown_only_name_is_a_one_line_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--only", "loader.dali_cpu,nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "nope" in lines[0], proc.stderr


def test_bad_device_is_a_one_line_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "tpu", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error:" in proc.stderr and "tpu" in proc.stderr


def test_cached_replay_is_measured_beside_distill_dali(run):
    """distill.cached (DALI + teacher-cache rows + the student step) and its ratio to distill.dali."""
    for res in json.loads(run[0].stdout)["results"].values():
        cached, dali = res["figures"]["distill.cached"], res["figures"]["distill.dali"]
        assert cached["images_per_s"] > 0 and dali["images_per_s"] > 0
        assert res["ratios"]["cached_vs_dali"] == pytest.approx(
            cached["images_per_s"] / dali["images_per_s"], rel=1e-3)
