"""The study around `distill`: a student without a teacher, log.csv, `sweep` (print, run, resume)
and `report` (mean +- std over seeds)."""
from __future__ import annotations

import csv
import inspect
import json
import re
import shlex

import pytest
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.commands import data as data_commands
from dali_erkt.commands import sweep, train
from dali_erkt.config import resolve_config
from dali_erkt.data.dataset import load_split
from dali_erkt.models import TeacherEnsemble
from dali_erkt.runtime import choose_precision, resolve_device
from dali_erkt.teacher_cache import cache_key, config_key
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
    assert json.loads(r.stdout) == {"steps": 12, "done": 0, "ran": 12, "resumed": 0}  # stdout: one object
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
    assert json.loads(r.stdout) == {"steps": 12, "done": 10, "ran": 0, "resumed": 2}
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


def print_commands(data, out, *args):
    r = cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0", "--out", out, "--print-commands", *args)
    assert r.exit_code == 0, r.output
    return r.stdout.strip().splitlines()


def caches(lines) -> dict[str, str]:
    """Student name -> the teacher cache folder its line names."""
    out = {}
    for line in lines:
        argv = shlex.split(line)
        if argv[1] == "distill" and "--teacher-cache" in argv:
            out[argv[argv.index("--out") + 1].rsplit("/", 1)[1]] = argv[argv.index("--teacher-cache") + 1]
    return out


def test_the_printed_lines_are_what_the_sweep_runs(data, tmp_path, monkeypatch):
    """Each step runs in this process through its command's library function; the line printed
    for it, run as written, calls that function with the same arguments."""
    real = {"split": data_commands.split, "train-teacher": train.train_teacher, "distill": train.distill}
    calls = []

    def recorder(command):
        def record(*args, **kwargs):
            bound = inspect.signature(real[command]).bind(*args, **kwargs)
            bound.apply_defaults()
            flat = {**bound.arguments, **bound.arguments.pop("options", {})}
            flat.pop("options", None)
            calls.append((command, {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()
                                    if v is not None and v != ()}))
            return {"classes": 3, "train": 12, "test": 12, "stratified": True, "out": "x", "skipped": []}
        return record

    monkeypatch.setattr(data_commands, "split", recorder("split"))
    monkeypatch.setattr(train, "train_teacher", recorder("train-teacher"))
    monkeypatch.setattr(train, "distill", recorder("distill"))
    args = ["--table", "9", "--pretrained", "--no-progress", "--no-compile", "--precision", "fp32", *COMMON]
    lines = print_commands(data, tmp_path / "s", *args)
    r = cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0", "--out", tmp_path / "s", *args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"steps": 6, "done": 0, "ran": 6, "resumed": 0}
    assert [x.removeprefix("sweep: ") for x in r.stderr.splitlines() if x.startswith("sweep: ")] == lines
    ran = list(calls)
    calls.clear()
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "dali-erkt"
        assert cli(*argv[1:]).exit_code == 0
    assert [c for c, _ in ran] == ["split", "train-teacher", "train-teacher", "distill", "distill", "distill"]
    assert calls == ran
    dist = ran[4][1]
    assert (dist["pretrained"], dist["progress"], dist["compile_"], dist["preset"]) == (True, False, False, "base")


def test_students_share_a_cache_folder_exactly_when_their_views_and_teachers_agree(data, tmp_path):
    by_precision = caches(print_commands(data, tmp_path / "s", "--vary", "run.precision=fp32,bf16",
                                         "--vary", "loss.tau=1,2", *COMMON))
    assert len(by_precision) == 4 and len(set(by_precision.values())) == 2
    assert by_precision["run.precision=fp32,loss.tau=1"] == by_precision["run.precision=fp32,loss.tau=2"]
    assert by_precision["run.precision=bf16,loss.tau=1"] == by_precision["run.precision=bf16,loss.tau=2"]
    # "auto" is named as the run resolves it (fp32 on the CPU, bf16 or fp16 on a GPU)
    auto = caches(print_commands(data, tmp_path / "s", "--vary", "run.precision=auto,fp32", *COMMON))
    resolved = choose_precision(resolve_device("cpu"), "auto")
    assert (auto["run.precision=auto"] == auto["run.precision=fp32"]) == (resolved == "fp32")
    for args in (["--table", "6"], ["--table", "7"], ["--table", "kd"],
                 ["--vary", "model.teacher_weights=[0.2,0.8],[0.8,0.2]"]):
        assert len(set(caches(print_commands(data, tmp_path / "s", *args, *COMMON)).values())) == 1, args
    table9 = caches(print_commands(data, tmp_path / "s", "--table", "9", *COMMON))
    assert sorted(table9) == ["dist", "erkt"] and table9["dist"] != table9["erkt"]  # base vs VSM views
    views = caches(print_commands(data, tmp_path / "s", "--vary", "vsm.cutmix.p=0.1,0.5", "--vary",
                                  "data.mean=[0.5,0.5,0.5],[0.4,0.4,0.4]", *COMMON))
    assert len(set(views.values())) == 4
    assert re.fullmatch(r".*/seed-0/cache-[0-9a-f]{8}", next(iter(views.values())))


def test_the_cache_folder_is_named_from_the_cache_keys_own_fields(data, tmp_path):
    assert cli("split", data, "--train-ratio", 0.5, "--out", tmp_path / "split").exit_code == 0
    cfg = resolve_config("erkt", overrides=["model.teachers=[resnet10t,resnet14t]",
                                            "model.teacher_weights=[0.5,0.5]", "run.device=cpu"])
    key = cache_key(cfg, load_split(tmp_path / "split"), [], "bf16", "cpu", True, 1)
    part = config_key(cfg, "bf16", "cpu", True, 1)
    assert {k: key[k] for k in part} == part
    assert set(key) - set(part) == {"split_sha256", "test_sha256", "teacher_sha256", "versions"}


def test_table_6_weights_come_from_one_rule(data, tmp_path):
    assert sweep.b3_weights(0.1, 3) == (0.1, 0.45, 0.45)
    assert sweep.b3_weights(0.3, 2) == (0.3, 0.7)
    lines = print_commands(data, tmp_path / "s", "--table", "6", *COMMON)
    assert [re.findall(r"model.teacher_weights=\[[^]]*\]", x)[-1] for x in lines[3:]] == [
        f"model.teacher_weights=[{w},{round(1 - w, 4)}]" for w in sweep.B3_WEIGHTS]
    r = cli("sweep", data, "--train-ratio", 0.5, "--out", tmp_path / "s", "--table", "6", "--print-commands",
            "--set", "model.teachers=[resnet10t]", "--set", "model.teacher_weights=[1]")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip() == ("error: --table 6 varies the first teacher's weight against the others: "
                                "it needs at least two teachers (model.teachers has 1)")


def test_table_kd_compares_the_kd_methods_on_one_teacher_cache(data, tmp_path):
    lines = print_commands(data, tmp_path / "s", "--table", "kd", *COMMON)
    students = [shlex.split(x) for x in lines if shlex.split(x)[1] == "distill"]
    assert [a[a.index("--out") + 1].rsplit("/", 1)[1] for a in students] == ["dist", "kd", "dkd"]
    configs = [resolve_config("erkt", overrides=[a[i + 1] for i, x in enumerate(a) if x == "--set"])
               for a in students]
    assert [(c.loss.kind, c.loss.tau) for c in configs] == [("dist", 2.0), ("kd", 4.0), ("dkd", 4.0)]
    assert len(set(caches(lines).values())) == 1


def test_sweep_takes_its_seeds_from_seeds_only(data, tmp_path):
    r = cli("sweep", data, "--train-ratio", 0.5, "--out", tmp_path / "s", "--seed", 3, "--print-commands")
    assert r.exit_code == 2 and "--seeds" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("seeds", [",", "-1", "0,0", "a,b", "1.5"])
def test_bad_seeds_are_one_line_before_anything_runs(data, tmp_path, seeds):
    r = cli("sweep", data, "--train-ratio", 0.5, "--out", tmp_path / "s", "--seeds", seeds)
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: --seeds {seeds!r}: give distinct whole seeds >= 0, e.g. 0,1,2"], r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_table_kd_runs_dist_kd_and_dkd_from_one_cache_and_table_6s_ensemble(data, tmp_path):
    out = tmp_path / "kd"
    r = cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0", "--out", out, "--table", "kd",
            "--no-progress", *COMMON)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"steps": 6, "done": 0, "ran": 6, "resumed": 0}
    seed = out / "seed-0"
    assert len(list(seed.glob("cache-*"))) == 1
    assert r.stderr.count("1 epochs there, 0.0 MB to write") == 2  # kd and dkd replay dist's cache
    for name, kind, tau in (("dist", "dist", 2.0), ("kd", "kd", 4.0), ("dkd", "dkd", 4.0)):
        cfg = resolve_config("erkt", seed / "students" / name / "config.yaml")
        assert (cfg.loss.kind, cfg.loss.tau) == (kind, tau)
        assert json.loads((seed / "students" / name / "summary.json").read_text())["kind"] == "student"
    # Table 6's ensemble OA per weight, from these teachers (the same weights as its students)
    options = {"overrides": tuple(COMMON[i + 1] for i, x in enumerate(COMMON) if x == "--set"),
               "image_size": SIZE, "batch_size": 6, "device": "cpu"}
    result = sweep.ensemble_table(seed, options)
    assert result == json.loads((seed / "ensemble.json").read_text())
    assert result["teachers"] == ["resnet10t", "resnet14t"]
    assert list(result["ensemble_oa"]) == [str(w) for w in sweep.B3_WEIGHTS]
    assert all(0.0 <= oa <= 1.0 for oa in result["ensemble_oa"].values())
