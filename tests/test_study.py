"""The study around `distill`: a student without a teacher, log.csv, `sweep` (print, run, resume)
and `report` (mean +- std over seeds)."""
from __future__ import annotations

import csv
import json
import shlex

import pytest
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.models import TeacherEnsemble
from dali_erkt.synthetic import make_scenes

SIZE = 32
COMMON = ["--epochs", "1", "--image-size", str(SIZE), "--batch-size", "6", "--lr", "1e-3",
          "--device", "cpu", "--set", "model.teachers=[resnet10t,resnet14t]", "--set",
          "model.teacher_weights=[0.5,0.5]", "--set", "model.arch=resnet10t", "--set", "data.num_threads=1"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("study") / "data", classes=3, per_class=8, size=SIZE)


@pytest.mark.parametrize("table,students", [("6", 5), ("7", 5), ("9", 3)])
def test_print_commands_lists_every_step_in_order(data, tmp_path, table, students):
    r = cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0,1", "--out", tmp_path / "s", "--table", table,
            "--print-commands", "--set", "model.teachers=[efficientnet_b3,efficientnet_b0,resnet50]")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    per_seed = 1 + 3 + students
    assert len(lines) == 2 * per_seed
    kinds = [shlex.split(x)[1] for x in lines[:per_seed]]
    assert kinds == ["split"] + ["train-teacher"] * 3 + ["distill"] * students
    assert all(f"--seed {k // per_seed}" in x for k, x in enumerate(lines))
    assert not (tmp_path / "s").exists()  # printing runs nothing
    if table == "9":
        assert "--no-teacher" in lines[4] and "--preset base" in lines[5] and "--preset erkt" in lines[6]
        assert "--teacher-cache" not in lines[4]


@pytest.mark.slow
def test_sweep_runs_resumes_and_reports(data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", data, "--train-ratio", 0.5, "--seeds", "0,1", "--out", out, "--table", "9", *COMMON]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1]) == {"steps": 12, "done": 0, "ran": 12, "resumed": 0}
    base = out / "seed-1" / "students" / "base"
    assert json.loads((base / "summary.json").read_text())["kind"] == "student"
    assert json.loads((base / "log.jsonl").read_text().splitlines()[0]).keys() >= {"loss", "ce", "oa"}
    assert "inter" not in (base / "log.csv").read_text().splitlines()[0].split(",")
    # A killed sweep: one student stopped after its last epoch (no summary), one never started.
    (out / "seed-0" / "students" / "erkt" / "summary.json").unlink()
    for f in (out / "seed-1" / "students" / "dist").iterdir():
        if f.name != "config.yaml":
            f.unlink()
    monkeypatch.setattr(TeacherEnsemble, "member_logits", lambda *a: pytest.fail("the cache was not replayed"))
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1]) == {"steps": 12, "done": 10, "ran": 0, "resumed": 2}
    monkeypatch.undo()
    r = cli("report", out)
    assert r.exit_code == 0, r.output
    table = r.stdout
    for name in ("students/base", "students/dist", "students/erkt", "teachers/resnet10t"):
        row = next(x for x in table.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "2" and "+-" in cells[2] and "+-" in cells[3]  # 2 seeds, mean +- std
    rows = list(csv.DictReader((out / "report" / "report.csv").open()))
    erkt = next(x for x in rows if x["configuration"] == "students/erkt")
    assert 0.0 <= float(erkt["last_oa"]) <= 1.0 and float(erkt["train_loss"]) > 0
    assert (out / "report" / "curves-students_erkt.png").read_bytes()[:4] == b"\x89PNG"
    assert {x["configuration"] for x in csv.DictReader((out / "report" / "per_class.csv").open())} >= {"students/erkt"}


def test_ratio_two_runs_no_teacher_and_is_twice_the_ce(data, tmp_path, monkeypatch):
    assert cli("split", data, "--train-ratio", 0.5, "--out", tmp_path / "split").exit_code == 0
    for arch in ("resnet10t", "resnet14t"):
        assert cli("train-teacher", "--split", tmp_path / "split", "--arch", arch, "--out",
                   tmp_path / "t" / arch, "--no-progress", *COMMON).exit_code == 0
    monkeypatch.setattr(TeacherEnsemble, "forward", lambda *a: pytest.fail("a teacher ran"))
    r = cli("distill", "--split", tmp_path / "split", "--teachers", tmp_path / "t", "--out", tmp_path / "r2",
            "--set", "loss.ratio=2", "--no-progress", *COMMON)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "r2" / "log.jsonl").read_text())
    assert record["loss"] == pytest.approx(2 * record["ce"], rel=1e-6) and "inter" not in record
    header = (tmp_path / "r2" / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["epoch", "lr", "loss", "ce"]
