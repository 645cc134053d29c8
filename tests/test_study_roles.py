"""The study's roles: teachers and students of a sweep with their own weights files and settings,
`--set model.weights` recorded with its SHA-256, the teachers' ensemble in `report`, and
`report`'s readers refusing files that are not a finished run's in one line."""
from __future__ import annotations

import hashlib
import json
import shlex

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.commands import report as report_commands
from dali_erkt.commands.common import config_from_options
from dali_erkt.config import load_config
from dali_erkt.data.dataset import load_split
from dali_erkt.synthetic import make_scenes

SIZE = 32
TINY = ["--image-size", str(SIZE), "--batch-size", "6", "--lr", "1e-3", "--device", "cpu",
        "--set", "model.arch=resnet10t", "--set", "model.teachers=[resnet10t]",
        "--set", "model.teacher_weights=[1]", "--set", "data.num_threads=1"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("roles") / "data", classes=3, per_class=8, size=SIZE)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Local starting points as a user downloads them: a teacher's and a student's resnet10t
    (different initialisations, so each role's file is told apart by its hash), and a folder of
    files named by architecture."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for name, seed in (("teacher", 1), ("student", 2)):
        torch.manual_seed(seed)
        state = {k: v.contiguous() for k, v in timm.create_model("resnet10t", pretrained=False).state_dict().items()}
        files[name] = folder / f"{name}.safetensors"
        save_file(state, str(files[name]))
    (folder / "dir").mkdir()
    save_file(state, str(folder / "dir" / "resnet10t.safetensors"))
    torch.save(timm.create_model("resnet14t", pretrained=False).state_dict(), folder / "dir" / "resnet14t.pth")
    files["dir"] = folder / "dir"
    return files


def sweep_lines(data, out, *args):
    r = cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0", "--out", out, "--print-commands", *args)
    assert r.exit_code == 0, r.output
    return [shlex.split(x) for x in r.stdout.strip().splitlines()]


def sets(argv) -> list[str]:
    return [argv[i + 1] for i, x in enumerate(argv) if x == "--set"]


def opt(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_each_role_gets_only_its_settings(data, tmp_path):
    lines = sweep_lines(data, tmp_path / "s", "--table", "9", "--epochs", "1", "--teacher-epochs", "2",
                        "--teacher-lr", "5e-4", "--teacher-preset", "erkt", "--teacher-set", "vsm.cutmix.p=0.25",
                        "--set", "loss.tau=3", "--set", "model.combine=logits", *TINY,
                        "--set", "model.teachers=[resnet10t,resnet14t]", "--set", "model.teacher_weights=[0.5,0.5]")
    teachers = [a for a in lines if a[1] == "train-teacher"]
    students = [a for a in lines if a[1] == "distill"]
    # --teacher-set wins over a shared flag of the same setting (--batch-size is data.batch_size)
    own = sweep_lines(data, tmp_path / "s", *TINY, "--teacher-set", "data.batch_size=4")
    assert [(opt(a, "--batch-size"), "data.batch_size=4" in sets(a)) for a in own[1:]] == [
        (None, True), ("6", False)]
    assert [opt(a, "--arch") for a in teachers] == ["resnet10t", "resnet14t"] and len(students) == 3
    for argv in teachers:
        assert (opt(argv, "--epochs"), opt(argv, "--lr"), opt(argv, "--preset")) == ("2", "0.0005", "erkt")
        assert not [s for s in sets(argv) if s.startswith(("model.", "loss."))], argv
        assert sets(argv) == ["data.num_threads=1", "vsm.cutmix.p=0.25"]
        cfg = config_from_options("base", preset="erkt", overrides=sets(argv), extra_flags={
            "model.arch": opt(argv, "--arch"), "model.teachers": (), "model.teacher_weights": ()})
        assert cfg.loss.tau == 2.0 and cfg.vsm.cutmix.p == 0.25  # the student's tau is not the teacher's
    for argv in students:
        assert (opt(argv, "--epochs"), opt(argv, "--lr")) == ("1", "0.001")
        assert "loss.tau=3" in sets(argv) and "model.arch=resnet10t" in sets(argv)
        assert "vsm.cutmix.p=0.25" not in sets(argv)


def test_weights_per_role_from_a_mapping_or_a_folder(data, tmp_path, weights):
    two = ["--set", "model.teachers=[resnet10t,resnet14t]", "--set", "model.teacher_weights=[0.5,0.5]"]
    lines = sweep_lines(data, tmp_path / "s", *TINY, "--weights", f"resnet10t={weights['teacher']}",
                        "--weights", f"student={weights['student']}", "--pretrained", *two)
    by_out = {opt(a, "--out").split("seed-0/")[1]: a for a in lines if a[1] != "split"}
    assert opt(by_out["teachers/resnet10t"], "--weights") == str(weights["teacher"])
    assert "--pretrained" in by_out["teachers/resnet14t"] and "--weights" not in by_out["teachers/resnet14t"]
    assert opt(by_out["students/default"], "--weights") == str(weights["student"])
    # Without student=FILE the student shares its arch's file with the teacher of that arch.
    lines = sweep_lines(data, tmp_path / "s", *TINY, "--weights", f"resnet10t={weights['teacher']}")
    assert {opt(a, "--weights") for a in lines if a[1] != "split"} == {str(weights["teacher"])}
    # A folder of files named by arch: .safetensors and .pth both taken.
    lines = sweep_lines(data, tmp_path / "s", *TINY, "--weights-dir", weights["dir"], *two)
    assert [opt(a, "--weights") for a in lines if a[1] != "split"] == [
        str(weights["dir"] / "resnet10t.safetensors"), str(weights["dir"] / "resnet14t.pth"),
        str(weights["dir"] / "resnet10t.safetensors")]
    base = ["sweep", data, "--train-ratio", 0.5, "--out", tmp_path / "s", "--print-commands", *TINY]
    one_error_line(cli(*base, "--weights-dir", weights["dir"], "--set", "model.arch=resnet18"),
                   "resnet18.safetensors", "--pretrained")
    one_error_line(cli(*base, "--weights", f"resnet50={weights['teacher']}"), "resnet50", "resnet10t")
    one_error_line(cli(*base, "--weights", f"resnet10t={tmp_path / 'none.safetensors'}"), "none.safetensors")
    one_error_line(cli(*base, "--set", f"model.weights={weights['teacher']}"), "--weights ARCH=FILE")
    one_error_line(cli(*base, "--teacher-set", "loss.tau=1"), "loss.tau", "--set")


def test_every_steps_configuration_is_checked_before_anything_runs(data, tmp_path):
    for bad, needle in ((["--teacher-set", "optim.lr=-1"], "optim.lr"),
                        (["--set", "loss.ratio=3"], "loss.ratio"),
                        (["--vary", "loss.tau=1,0"], "loss.tau")):
        one_error_line(cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0", "--out", tmp_path / "s",
                           "--epochs", 1, *TINY, *bad), needle)
        assert not (tmp_path / "s").exists()  # not even the split ran


def test_set_model_weights_records_the_files_sha256(data, tmp_path, weights):
    cfg = config_from_options("base", overrides=[f"model.weights={weights['teacher']}"])
    assert (cfg.model.weights, cfg.model.weights_sha256) == (str(weights["teacher"].resolve()),
                                                             sha256(weights["teacher"]))
    # A stored hash is kept (the run checks the file against it); --set with its own hash too.
    pinned = config_from_options("base", overrides=[f"model.weights={weights['teacher']}",
                                                    "model.weights_sha256=" + "0" * 64])
    assert pinned.model.weights_sha256 == "0" * 64
    one_error_line(cli("train-teacher", "--split", tmp_path / "nosplit", "--arch", "resnet10t", "--out",
                       tmp_path / "t", "--set", f"model.weights={tmp_path / 'missing.pt'}"), "missing.pt")
    assert cli("split", data, "--train-ratio", 0.5, "--out", tmp_path / "split").exit_code == 0
    r = cli("train-teacher", "--split", tmp_path / "split", "--arch", "resnet10t", "--out", tmp_path / "t",
            "--epochs", 1, "--no-progress", *TINY, "--set", f"model.weights={weights['teacher']}")
    assert r.exit_code == 0, r.output
    saved = load_config(tmp_path / "t" / "config.yaml").model
    assert (saved.weights, saved.weights_sha256) == (str(weights["teacher"].resolve()), sha256(weights["teacher"]))
    assert "weights: " in r.stderr and "tensors loaded from" in r.stderr


@pytest.mark.slow
def test_a_sweep_from_local_weights_with_teacher_epochs_and_its_report(data, tmp_path, weights):
    out = tmp_path / "sweep"
    r = cli("sweep", data, "--train-ratio", 0.5, "--seeds", "0", "--out", out, "--no-progress", *TINY,
            "--epochs", 1, "--teacher-epochs", 2, "--teacher-lr", "5e-4", "--set", "loss.tau=3",
            "--weights", f"resnet10t={weights['teacher']}", "--weights", f"student={weights['student']}")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"steps": 3, "done": 0, "ran": 3, "resumed": 0}  # one object
    seed = out / "seed-0"
    teacher, student = seed / "teachers" / "resnet10t", seed / "students" / "default"
    assert len((teacher / "log.jsonl").read_text().splitlines()) == 2
    assert len((student / "log.jsonl").read_text().splitlines()) == 1
    t, s = load_config(teacher / "config.yaml"), load_config(student / "config.yaml")
    assert (t.model.weights, t.model.weights_sha256) == (str(weights["teacher"].resolve()), sha256(weights["teacher"]))
    assert (s.model.weights, s.model.weights_sha256) == (str(weights["student"].resolve()), sha256(weights["student"]))
    assert (t.optim.epochs, t.optim.lr, t.loss.tau, t.model.teachers) == (2, 5e-4, 2.0, ())
    assert (s.optim.epochs, s.optim.lr, s.loss.tau, s.model.teachers) == (1, 1e-3, 3.0, ("resnet10t",))

    r = cli("report", out)
    assert r.exit_code == 0, r.output
    row = next(x for x in r.stdout.splitlines() if x.startswith("| ensemble |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "1" and cells[2].endswith(" +- n/a") and cells[3] == "-"  # one seed: no spread
    student_row = next(x for x in r.stdout.splitlines() if x.startswith("| students/default |"))
    assert "+- n/a" in student_row and "+- 0.00" not in r.stdout
    rows = json.loads((out / "report" / "report.json").read_text())["rows"]
    ens = next(x for x in rows if x["kind"] == "ensemble")
    assert ens["teachers"] == ["resnet10t"] and ens["last_oa_std"] is None
    assert ens["source"]["seed-0"] == f"cache {next(seed.glob('cache-*')).name}"
    # The cached test logits are what running the teachers gives: the same ensemble OA.
    split = load_split(seed / "split")
    paths = [teacher / "last.pt"]
    run = report_commands._evaluated_test_logits(["resnet10t"], paths, split, t, "cpu")
    cached, _ = report_commands._cached_test_logits(seed, ["resnet10t"], paths, split, t.data)
    np.testing.assert_allclose(cached, run, atol=1e-3)
    labels = np.asarray(split.labels("test"))
    assert ens["oa_per_seed"]["seed-0"] == report_commands.ensemble_oa(run, labels, [1.0], "probs")[0]
    assert ens["last_oa"] == pytest.approx(float((run[0].argmax(1) == labels).mean()))
    assert f"{ens['last_oa'] * 100:.2f} +- n/a" == cells[2]


SUMMARY = {"kind": "student", "arch": "resnet10t", "classes": ["a", "b"], "epochs": 1, "last_oa": 0.5,
           "last_epoch": 1, "best_oa": 0.5, "best_epoch": 1, "agreement": None, "per_class": None}
LOG = json.dumps({"epoch": 1, "lr": 0.001, "loss": 1.0, "ce": 1.0, "oa": 0.5}) + "\n"


@pytest.mark.parametrize("summary,log,file,why", [
    (json.dumps({"accuracy": 0.91, "model": "vit"}), LOG, "summary.json", "no 'kind'"),
    (json.dumps({**SUMMARY, "last_oa": "high"}), LOG, "summary.json", "'last_oa'"),
    (json.dumps(SUMMARY, indent=2)[:40], LOG, "summary.json", "not readable JSON"),
    (json.dumps(SUMMARY), None, "log.jsonl", "does not exist"),
    (json.dumps(SUMMARY), "", "log.jsonl", "empty"),
    (json.dumps(SUMMARY), '{"epoch": 1, "lr": 0.0\x00\n', "log.jsonl", "line 1 is not JSON"),
    (json.dumps(SUMMARY), "[1, 2]\n", "log.jsonl", "line 1 is not an object"),
    (json.dumps(SUMMARY), b"\xff\xfe\n", "log.jsonl", "not readable text"),
    (json.dumps({**SUMMARY, "epochs": 2}), LOG, "summary.json", "holds 1"),
])
def test_report_names_a_file_that_is_not_a_finished_runs(tmp_path, summary, log, file, why):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(summary)
    if isinstance(log, bytes):
        (run / "log.jsonl").write_bytes(log)
    elif log is not None:
        (run / "log.jsonl").write_text(log)
    one_error_line(cli("report", tmp_path / "runs"), run / file, why)
    assert not (tmp_path / "runs" / "report").exists()  # nothing written


def test_report_of_a_hand_made_finished_run_reads(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "log.jsonl").write_text(LOG)
    r = cli("report", tmp_path / "runs", "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["rows"]  # no sweep folder: no ensemble row
    assert (row["configuration"], row["last_oa"], row["last_oa_std"]) == ("x", 0.5, None)
