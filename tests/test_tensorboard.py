"""`--tensorboard`: every number of log.jsonl per epoch, the configuration as text and the final
confusion matrix as an image, read back with TensorBoard's own reader; a resumed run adds to
the same curves with no step twice; the missing package is one line."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.run_dir import TENSORBOARD_NEEDS, RunDir, epoch_scalars
from dali_erkt.synthetic import make_scenes

README = Path(__file__).resolve().parents[1] / "README.md"
SIZE = 32


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    scenes = make_scenes(root / "data", classes=3, per_class=8, size=SIZE)
    assert cli("split", scenes, "--train-ratio", 0.5, "--out", root / "split").exit_code == 0
    return root


def train_args(data, out, *extra, epochs=2):
    return ["train-teacher", "--split", data / "split", "--arch", "resnet10t", "--out", out,
            "--device", "cpu", "--image-size", SIZE, "--batch-size", 4, "--epochs", epochs,
            "--lr", 0.01, "--no-progress", "--set", "data.num_threads=1", *extra]


def events(folder: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_scalars_are_the_log(acc, run: Path, classes) -> None:
    """Every number of every log.jsonl record is a scalar at step = its epoch, once, equal in
    float32; per-class accuracies under per_class/<class>."""
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    tags = set(acc.Tags()["scalars"])
    for record in log:
        numbers = {k: v for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
        assert {"loss", "lr", "oa", "images_per_s"} <= set(numbers)
        numbers.update({f"per_class/{c}": v for c, v in zip(classes, record["per_class"])})
        for tag, value in numbers.items():
            assert tag in tags, tag
            points = [e for e in acc.Scalars(tag) if e.step == record["epoch"]]
            assert len(points) == 1, (tag, record["epoch"], points)
            assert points[0].value == pytest.approx(np.float32(value), rel=1e-6, abs=1e-7), tag
    for tag in tags:  # no step twice, none beyond the log
        steps = [e.step for e in acc.Scalars(tag)]
        assert sorted(steps) == [r["epoch"] for r in log], (tag, steps)


@pytest.fixture(scope="module")
def teacher(data):
    """A 2-epoch train-teacher run with --tensorboard: (its folder, its summary)."""
    r = cli(*train_args(data, data / "run", "--tensorboard"))
    assert r.exit_code == 0, r.output
    return data / "run", json.loads(r.stdout)


def test_events_hold_every_logged_number_the_config_and_the_confusion(teacher):
    run, summary = teacher
    acc = events(run / "tensorboard")
    assert_scalars_are_the_log(acc, run, summary["classes"])
    best = [e.value for e in acc.Scalars("best_oa")]
    assert best[-1] == pytest.approx(summary["best_oa"])

    # The resolved configuration, as config.yaml holds it, at the start step.
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0
    shown = text.tensor_proto.string_val[0].decode()
    assert [line[4:] for line in shown.splitlines()] == (run / "config.yaml").read_text().splitlines()
    assert "tensorboard: true" in (run / "config.yaml").read_text()

    # The final confusion matrix, as a PNG image at the last epoch.
    (image,) = acc.Images("confusion_matrix")
    assert image.step == 2 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.width > 100 and image.height > 100
    assert not [p.name for p in (run / "tensorboard").iterdir() if p.name.endswith(".tmp")]


def test_distill_events_hold_its_loss_parts_and_agreement(data, teacher):
    run = data / "student"
    r = cli("distill", "--split", data / "split", "--teacher", teacher[0] / "last.pt", "--out", run,
            "--set", "model.teachers=[resnet10t]", "--set", "model.teacher_weights=[1]",
            "--set", "model.arch=resnet10t", "--set", "run.tensorboard=true", "--device", "cpu",
            "--image-size", SIZE, "--batch-size", 4, "--epochs", 1, "--no-progress",
            "--set", "data.num_threads=1")
    assert r.exit_code == 0, r.output
    acc = events(run / "tensorboard")
    assert_scalars_are_the_log(acc, run, json.loads(r.stdout)["classes"])
    assert {"loss", "ce", "inter", "intra", "agreement"} <= set(acc.Tags()["scalars"])  # DIST's parts


def test_resume_adds_to_the_same_curves_without_a_step_twice(data):
    run = data / "resumed"
    assert cli(*train_args(data, run, "--tensorboard", epochs=1)).exit_code == 0
    # A kill between last.pt and the epoch's event file leaves the epoch without one.
    (run / "tensorboard" / "events.out.tfevents.epoch-000001").unlink()
    # The run's own config.yaml keeps run.tensorboard on: no flag needed to resume.
    r = cli(*train_args(data, run, "--resume", "--allow-changes", epochs=2))
    assert r.exit_code == 0, r.output
    acc = events(run / "tensorboard")
    assert_scalars_are_the_log(acc, run, json.loads(r.stdout)["classes"])
    assert sorted(t.step for t in acc.Tensors("config/text_summary")) == [0, 1]  # each start
    assert [i.step for i in acc.Images("confusion_matrix")] == [1, 2]  # each final epoch


def test_turned_on_at_resume_writes_the_history_too(data):
    run = data / "late"
    assert cli(*train_args(data, run, epochs=1)).exit_code == 0
    assert not (run / "tensorboard").exists()
    r = cli(*train_args(data, run, "--resume", "--tensorboard", "--allow-changes", epochs=2))
    assert r.exit_code == 0, r.output
    assert "resume: run.tensorboard changed from False to True" in r.stderr
    assert_scalars_are_the_log(events(run / "tensorboard"), run, json.loads(r.stdout)["classes"])


def test_a_new_run_is_not_started_over_old_events(data, tmp_path):
    board = tmp_path / "run" / "tensorboard"
    board.mkdir(parents=True)
    (board / "events.out.tfevents.epoch-000003").write_bytes(b"")
    r = cli(*train_args(data, tmp_path / "run", "--tensorboard", epochs=1))
    assert r.exit_code == 2 and "holds results (tensorboard/ epoch events)" in r.stderr


def test_missing_package_is_one_line_at_the_start(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    for flag in (["--tensorboard"], ["--set", "run.tensorboard=true"]):
        r = cli(*train_args(data, tmp_path / "run", *flag, epochs=1))
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and lines == [f"error: {TENSORBOARD_NEEDS}"], r.output
        assert 'pip install "dali-erkt[tensorboard]"' in lines[0]
        assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_only_the_main_process_writes(tmp_path):
    pytest.importorskip("tensorboard")
    history = [{"epoch": 1, "lr": 0.1, "loss": 1.0, "oa": 0.5, "per_class": [0.5, None]}]
    RunDir(tmp_path / "rank1", main=False, tensorboard=True).write_log(history)
    assert not (tmp_path / "rank1").exists()
    RunDir(tmp_path / "rank0", main=True, tensorboard=True).write_log(history)
    assert (tmp_path / "rank0" / "tensorboard" / "events.out.tfevents.epoch-000001").is_file()


def test_epoch_scalars_take_numbers_only():
    record = {"epoch": 3, "lr": 0.1, "loss": 2, "note": "x", "flag": True, "per_class": [0.5, None]}
    assert epoch_scalars(record, ["a", "b"]) == {"lr": 0.1, "loss": 2.0, "per_class/a": 0.5}
    assert epoch_scalars(record) == {"lr": 0.1, "loss": 2.0, "per_class/0": 0.5}


def test_readme_recipe_runs_as_written(data, tmp_path, monkeypatch):
    """The README's TensorBoard lines, at the test's sizes (1 epoch, 32 px, the CPU)."""
    text = README.read_text()
    section = text[text.index("### Watching runs in TensorBoard"):]
    section = section[:section.index("\n#", 4)]
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [ln for ln in bash.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == ["dali-erkt", "tensorboard"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "nwpu-10-s0").symlink_to(data / "split")
    args = shlex.split(lines[0])[1:] + ["--arch", "resnet10t", "--epochs", "1", "--image-size",
                                        str(SIZE), "--batch-size", "4", "--device", "cpu",
                                        "--no-progress", "--set", "data.num_threads=1"]
    r = CliRunner().invoke(main, args)  # the later --arch wins: a small model
    assert r.exit_code == 0, r.output
    pytest.importorskip("tensorboard")
    words = shlex.split(lines[1], comments=True)
    tensorboard = Path(sys.executable).parent / "tensorboard"
    out = subprocess.run([str(tensorboard), *words[1:]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for tag in ("oa", "loss", "best_oa", "confusion_matrix", "config/text_summary"):
        assert re.search(rf"^\s+{re.escape(tag)}$", out.stdout, flags=re.M), (tag, out.stdout)
