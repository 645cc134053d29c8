"""`export --timm`: a trained run in timm's pretrained folder format, loaded back by timm itself;
and export's write faults (read-only folder, a path below a file, a full disk) as one line, exit 3."""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli_helpers import mount_tmpfs, umount
from conftest import write_image_tree
from dali_erkt.cli import main
from dali_erkt.commands.export import export, export_timm, format_export, real_batch
from dali_erkt.errors import ConfigError
from dali_erkt.models import load_trained
from dali_erkt.synthetic import make_scenes

timm = pytest.importorskip("timm")

README = Path(__file__).resolve().parents[1] / "README.md"
SIZE, MEAN, STD = 32, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run: resnet10t, 32 px, one epoch on generated scenes, its own mean / std."""
    root = tmp_path_factory.mktemp("timm-export")
    data = make_scenes(root / "data", classes=3, per_class=8, size=SIZE)
    assert cli("split", data, "--train-ratio", 0.5, "--out", root / "split").exit_code == 0
    r = cli("train-teacher", "--split", root / "split", "--arch", "resnet10t", "--out", root / "run",
            "--device", "cpu", "--image-size", SIZE, "--batch-size", 4, "--epochs", 1, "--lr", 0.01,
            "--no-progress", "--set", "data.num_threads=1", "--set", f"data.mean={MEAN}",
            "--set", f"data.std={STD}")
    assert r.exit_code == 0, r.output
    return root


def one_error_line(r, *words, code):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_timm_loads_the_run_back_with_the_same_logits(run, tmp_path):
    out = tmp_path / "student-timm"
    result = export_timm(run / "run" / "last.pt", out, batch_images=run / "split")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert result["timm_check"]["source"] == "real" and result["timm_check"]["max_abs_diff"] < 1e-5
    assert "timm.create_model('local-dir:" in format_export(result)

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours, state = load_trained(run / "run" / "last.pt")
    ours.eval()
    x, _ = real_batch(run / "split", SIZE, MEAN, STD, limit=6)
    x = torch.cat([x, torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), ours(x).numpy(), atol=1e-5, rtol=0)

    # The classes travel, and timm's own preprocessing of the folder is the run's evaluation.
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 3
    assert config["label_names"] == state.classes == model.pretrained_cfg["label_names"]
    cfg = model.pretrained_cfg
    assert list(cfg["input_size"]) == [3, SIZE, SIZE]
    assert list(cfg["mean"]) == MEAN and list(cfg["std"]) == STD
    data = timm.data.resolve_data_config(model=model)
    assert data["crop_pct"] == 1.0 and data["crop_mode"] == "squash" and data["interpolation"] == "bilinear"
    # timm's eval transform of non-square images (Pillow's resize) against the project's (the
    # torchvision twin of the pipeline's): both squash to 32 x 32, no crop, and normalise alike.
    from PIL import Image
    root = write_image_tree(tmp_path / "wide", {"x": 3, "y": 3}, size=(96, 60), formats=("png",))
    files = sorted(root.rglob("*.png"))
    load = lambda cfg: torch.stack([timm.data.create_transform(**cfg)(Image.open(f).convert("RGB"))
                                    for f in files])
    mine, _ = real_batch(files, SIZE, MEAN, STD)
    theirs = load(data)
    assert theirs.shape == mine.shape == (6, 3, SIZE, SIZE)
    assert float((theirs - mine).abs().mean()) < 0.02  # resampling only (measured 0.005)
    cropped = load({**data, "crop_mode": "center", "crop_pct": 0.875})  # timm's usual default
    assert float((cropped - mine).abs().mean()) > 0.05  # (measured 0.09): the check can tell


def test_cli_export_timm_and_onnx_together(run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    r = cli("export", run / "run" / "last.pt", "--timm", tmp_path / "t", "--onnx", tmp_path / "m.onnx",
            "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["timm_check"]["max_abs_diff"] < 1e-5 and result["check"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "t" / "model.safetensors").is_file()


def test_existing_files_need_force_and_nothing_is_refused_late(run, tmp_path):
    out = tmp_path / "t"
    export_timm(run / "run" / "last.pt", out, check=False)
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError) as err:
        export(run / "run" / "last.pt", timm_dir=out, onnx_path=tmp_path / "new.onnx")
    assert "--force" in str(err.value) and "config.json" in str(err.value)
    assert not (tmp_path / "new.onnx").exists()  # refused before the ONNX file was written
    result = export_timm(run / "run" / "last.pt", out, force=True)
    assert (out / "model.safetensors").stat().st_mtime_ns >= before
    assert result["timm_check"]["max_abs_diff"] < 1e-5
    with pytest.raises(ConfigError) as err:
        export(run / "run" / "last.pt")
    assert "--onnx FILE, --timm DIR" in str(err.value)


# ---- write faults: one line, exit 3, nothing half-written ---------------------------------------

def _targets(folder: Path, kind: str) -> list:
    if kind == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        return ["--onnx", folder / "sub" / "m.onnx"]
    return ["--timm", folder / "sub" / "t"]


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["onnx", "timm"])
def test_read_only_folder_is_one_line(run, tmp_path, kind):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through chmod: a read-only mount, as tests/test_faults.py
        if not mount_tmpfs(folder, "4m", "ro"):
            pytest.skip("needs root and permission to mount a read-only tmpfs")
        words = ("cannot write", "Read-only")
    else:
        folder.mkdir()
        folder.chmod(0o555)
        words = ("cannot write", "Permission denied")
    try:
        r = cli("export", run / "run" / "last.pt", *_targets(folder, kind))
        line = one_error_line(r, *words, code=3)
        assert "--out" not in line and ("--onnx" in line or "--timm" in line)
        assert not list(folder.iterdir())
    finally:
        umount(folder) if os.geteuid() == 0 else folder.chmod(0o755)


@pytest.mark.parametrize("kind", ["onnx", "timm"])
def test_a_path_below_a_file_is_one_line(run, tmp_path, kind):
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    args = _targets(tmp_path / "notes.txt", kind)
    one_error_line(cli("export", run / "run" / "last.pt", *args), "cannot write", "notes.txt", code=3)
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder\n"
    if kind == "timm":  # the folder itself a file
        one_error_line(cli("export", run / "run" / "last.pt", "--timm", tmp_path / "notes.txt"),
                       "cannot write", "notes.txt is a file, not a folder", code=3)


@pytest.mark.parametrize("kind", ["onnx", "timm"])
def test_full_disk_is_one_line(run, tmp_path, kind):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("needs root and permission to mount a tmpfs (a small full disk)")
    try:
        r = cli("export", run / "run" / "last.pt", *_targets(disk, kind))  # the model is ~20 MB
        one_error_line(r, "cannot write", "No space left on device", code=3)
        _no_temporaries(disk)
        assert not [p for p in disk.rglob("*") if p.is_file()]
    finally:
        umount(disk)


# ---- the README's export section, as written --------------------------------------------------

def _section(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"## {title}"):]
    return section[:section.index("\n## ", 4)]


def test_readme_export_section_runs_as_written(run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    section = _section("Exporting a run: ONNX and timm")
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    image = sorted((run / "data").rglob("*.jpg"))[0]
    subs = {"runs/erkt-s0/last.pt": str(run / "run" / "last.pt"),
            "splits/nwpu-10-s0": str(run / "split"), "scene.jpg": str(image)}
    monkeypatch.chdir(tmp_path)
    lines = [ln.split("#")[0].strip() for ln in bash.splitlines()]
    lines = [ln for ln in lines if ln]
    assert lines and all(ln.startswith("dali-erkt export ") for ln in lines)
    for line in lines:
        args = [subs.get(a, a) for a in shlex.split(line)[1:]]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, (line, r.output)
    for old, new in subs.items():
        code = code.replace(f'"{old}"', repr(new))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    out = capsys.readouterr().out.strip().splitlines()[-1]
    name, p = out.split()
    assert name in ("farmland", "forest", "river") and 0 < float(p) <= 1
    ours = load_trained(run / "run" / "last.pt")[0].eval()
    with torch.no_grad():  # the README's model is the run's
        x = scope["batch"]
        np.testing.assert_allclose(scope["model"](x).numpy(), ours(x).numpy(), atol=1e-5, rtol=0)
