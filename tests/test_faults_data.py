"""Data faults from the command line: a hand-edited split, a run resumed on another split, an image
DALI cannot decode behind a .jpg name, teacher weights that do not sum to 1, a malformed list.

Each refusal: exit 2, one `error:` line naming the file (and line) and what to do, no traceback,
nothing written lost. (To be merged into tests/test_faults.py; `cli` and `one_error_line` are
that file's.)
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dali_erkt.checkpoint import load_checkpoint, save_checkpoint
from dali_erkt.data.dataset import load_split, split_digests, split_sha256
from dali_erkt.synthetic import make_scenes

from cli_helpers import cli, one_error_line

SIZE, ARCH = 32, "resnet10t"


def train(split, out, *extra, command="train-teacher"):
    arch = ["--arch", ARCH] if command == "train-teacher" else ["--no-teacher", "--set", f"model.arch={ARCH}"]
    return cli(command, "--split", split, *arch, "--out", out, "--device", "cpu", "--image-size", SIZE,
               "--batch-size", 4, "--epochs", 1, "--lr", 0.01, "--no-progress", "--set",
               "data.num_threads=1", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 3-class data set, its split S, and a one-epoch train-teacher run on S."""
    root = tmp_path_factory.mktemp("faults_data")
    make_scenes(root / "data", classes=3, per_class=6, size=SIZE)
    assert cli("split", root / "data", "--train-ratio", 0.5, "--out", root / "S").exit_code == 0
    r = train(root / "S", root / "run")
    assert r.exit_code == 0, r.output
    return root


def edited(data, tmp_path, name, edit) -> Path:
    """A copy of split S with `name` rewritten by `edit(text) -> text` (or bytes -> bytes)."""
    s = tmp_path / "edited"
    shutil.copytree(data / "S", s)
    raw = (s / name).read_bytes()
    out = edit(raw.decode())
    (s / name).write_bytes(out if isinstance(out, bytes) else out.encode())
    return s


def lines(text):
    return text.splitlines(keepends=True)


# ---- load_split checks what `split` guarantees ------------------------------------------------

DEFECTS = {  # name: (file, edit, words of the one error line)
    "absolute path": ("train.txt", lambda t, root: t.replace(lines(t)[0].split("\t")[0],
                                                          str(root / lines(t)[0].split("\t")[0]), 1),
                      ["train.txt line 1", "not inside the dataset folder"]),
    "escaping ..": ("test.txt", lambda t, root: "../outside.jpg\t0\n" + t,
                    ["test.txt line 1", "'../outside.jpg'", "not inside the dataset folder"]),
    "listed twice": ("train.txt", lambda t, root: t + lines(t)[1],
                     ["train.txt lists", "twice (lines 2 and 10)", "remove one line"]),
    "test image in train": ("train.txt", lambda t, root: t + lines((root.parent / "S" / "test.txt")
                                                                 .read_text())[0],
                            ["is listed in both", "train.txt (line 10)", "test.txt (line 1)", "leaks"]),
    "label of another folder": ("train.txt", lambda t, root: t.replace("\t0\n", "\t2\n", 1),
                                ["train.txt line 1 labels", "2 ('", "in the folder of class 0"]),
    "class named twice": ("classes.txt", lambda t, root: t + lines(t)[0],
                          ["classes.txt line 4 repeats class", "(line 1)"]),
    "class without training image": ("train.txt", lambda t, root: "".join(
        x for x in lines(t) if not x.endswith("\t2\n")), ["class '", "has no image in", "train.txt"]),
    "latin-1 list": ("train.txt", lambda t, root: (t + "forest/caf\xe9.jpg\t1\n").encode("latin-1"),
                     ["train.txt line 10 is not UTF-8 text (byte 0xe9)", "save it as UTF-8"]),
    "latin-1 classes": ("classes.txt", lambda t, root: (t + "caf\xe9\n").encode("latin-1"),
                        ["classes.txt line 4 is not UTF-8"]),
    "latin-1 split.yaml": ("split.yaml", lambda t, root: ("# r\xe9sum\xe9\n" + t).encode("latin-1"),
                           ["split.yaml line 1 is not UTF-8"]),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_a_hand_edited_split_is_one_line_naming_the_file(data, tmp_path, defect):
    name, edit, words = DEFECTS[defect]
    s = edited(data, tmp_path, name, lambda t: edit(t, data / "data"))
    one_error_line(train(s, tmp_path / "run"), *words)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_split_as_written_passes_every_check(data):
    s = load_split(data / "S")
    assert (len(s.classes), len(s.train), len(s.test)) == (3, 9, 9) and s.folder == str(data / "S")


# ---- a run records its split; --resume on another split is refused ----------------------------

def test_the_split_hash_and_the_cache_keys_digests(data):
    s = load_split(data / "S")
    # The cache key's digests keep their definition (existing caches stay valid).
    listing = "".join(f"{p}\t{y}\n" for p, y in s.train) + "|" + "\n".join(s.classes)
    assert split_digests(s)["split_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    state = load_checkpoint(data / "run" / "last.pt")
    assert state["split"] == {"folder": str(data / "S"), "sha256": split_sha256(s)}


def other_split(data, tmp_path) -> Path:
    """Same classes, same counts, other files: one training and one test image swapped."""
    o = tmp_path / "O"
    shutil.copytree(data / "S", o)
    train_lines, test_lines = lines((o / "train.txt").read_text()), lines((o / "test.txt").read_text())
    train_lines[0], test_lines[0] = test_lines[0], train_lines[0]
    (o / "train.txt").write_text("".join(train_lines))
    (o / "test.txt").write_text("".join(test_lines))
    assert load_split(o).classes == load_split(data / "S").classes
    return o


def test_resume_with_another_split_is_refused_naming_both(data, tmp_path):
    o = other_split(data, tmp_path)
    run = tmp_path / "run"
    shutil.copytree(data / "run", run)
    before = (run / "last.pt").read_bytes()
    line = one_error_line(train(o, run, "--resume"), "was trained on split", str(data / "S"),
                          f"--split {o}", "resume with --split")
    assert str(run / "last.pt") in line
    assert (run / "last.pt").read_bytes() == before
    # distill runs the same check.
    assert train(data / "S", tmp_path / "student", command="distill").exit_code == 0
    before = (tmp_path / "student" / "last.pt").read_bytes()
    one_error_line(train(o, tmp_path / "student", "--resume", command="distill"), "was trained on split",
                   f"--split {o}")
    assert (tmp_path / "student" / "last.pt").read_bytes() == before
    # The same lists in another folder are the same split.
    same = tmp_path / "copy"
    shutil.copytree(data / "S", same)
    r = train(same, run, "--resume", "--epochs", 2, "--allow-changes")
    assert r.exit_code == 0 and "split changed" not in r.stderr, r.output


def test_an_old_run_without_a_recorded_split_still_resumes(data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(data / "run", run)
    state = load_checkpoint(run / "last.pt")
    del state["split"]
    save_checkpoint(run / "last.pt", state)
    r = train(data / "S", run, "--resume", "--epochs", 2, "--allow-changes")
    assert r.exit_code == 0, r.output
    after = load_checkpoint(run / "last.pt")
    assert after["epoch"] == 2 and after["split"]["sha256"] == split_sha256(load_split(data / "S"))


# ---- check-data decodes as training does ------------------------------------------------------

def test_a_gif_named_jpg_is_unreadable_in_check_data_split_and_training(data, tmp_path):
    tree = tmp_path / "d"
    shutil.copytree(data / "data", tree)
    s = tmp_path / "S"
    assert cli("split", tree, "--train-ratio", 0.5, "--out", s).exit_code == 0
    rel = next(ln.split("\t")[0] for ln in (s / "train.txt").read_text().splitlines())
    Image.open(tree / rel).save(tree / rel, format="GIF")  # a GIF under its .jpg name
    r = cli("check-data", tree, "--json")
    assert r.exit_code == 1, r.output
    bad = json.loads(r.stdout)["bad"]
    assert [b["path"] for b in bad] == [rel] and "GIF image" in bad[0]["reason"], bad
    r = cli("check-data", tree)
    assert f"{rel}: GIF image, a format DALI's decoder cannot read" in r.stdout
    assert "1 unreadable" in r.stdout
    one_error_line(cli("split", tree, "--train-ratio", 0.5, "--out", tmp_path / "S2"), rel,
                   "check-data")
    # Training meets it (written after the split): one line naming the one file. Batches of 3
    # take all 9 training images (drop_last would leave one of 9 out at 4).
    line = one_error_line(train(s, tmp_path / "run", "--batch-size", 3), str(tree / rel), "GIF image",
                          "write the split again")
    assert line.count(".jpg") == 1, line


# ---- teacher weights and malformed lists -------------------------------------------------------

def test_teacher_weights_that_do_not_sum_to_1_are_said_once(data, tmp_path):
    teacher = data / "run" / "last.pt"
    r = cli("distill", "--split", data / "S", "--out", tmp_path / "kd", "--device", "cpu",
            "--image-size", SIZE, "--batch-size", 4, "--epochs", 2, "--no-progress",
            "--set", "data.num_threads=1", "--set", f"model.arch={ARCH}",
            "--set", f"model.teachers=[{ARCH},{ARCH}]", "--set", "model.teacher_weights=[3,3]",
            "--teacher", teacher, "--teacher", teacher)
    assert r.exit_code == 0, r.output
    note = "model.teacher_weights [3, 3] sum to 6; used as [0.5, 0.5]"
    assert r.stderr.count(note) == 1, r.stderr
    assert r.stderr.count("teacher_weights") == 1
    r = cli("distill", "--split", data / "S", "--out", tmp_path / "kd2", "--device", "cpu",
            "--image-size", SIZE, "--batch-size", 4, "--epochs", 1, "--no-progress",
            "--set", "data.num_threads=1", "--set", f"model.arch={ARCH}",
            "--set", f"model.teachers=[{ARCH},{ARCH}]", "--set", "model.teacher_weights=[0.5,0.5]",
            "--teacher", teacher, "--teacher", teacher)
    assert r.exit_code == 0 and "teacher_weights" not in r.stderr, r.output
    r = cli("evaluate", "--split", data / "S", "--out", tmp_path / "ev", "--device", "cpu",
            "--set", f"model.teachers=[{ARCH},{ARCH}]", "--set", "model.teacher_weights=[3,3]",
            "--teacher", teacher, "--teacher", teacher)
    assert r.exit_code == 0 and r.stderr.count(f"note: {note}") == 1, r.output


@pytest.mark.parametrize("value,words", [
    ("model.teachers=[a,b", ["model.teachers is not valid YAML"]),
    ("model.teachers=a,b]", ["model.teachers is not valid YAML"]),
    ("model.teacher_weights=[1,,2]", ["model.teacher_weights is not valid YAML"]),
    ("model.teacher_weights=[0.5, x]", ["model.teacher_weights = 'x' is not a valid float"]),
    ("model.teachers=[[a],b]", ["model.teachers = ['a'] is not a valid str"]),
    ("model.teachers={a: b}", ["model.teachers = {'a': 'b'} is not a valid str"]),
])
def test_a_malformed_list_is_one_line(data, tmp_path, value, words):
    r = cli("distill", "--split", data / "S", "--out", tmp_path / "kd", "--device", "cpu",
            "--epochs", 1, "--teacher", data / "run" / "last.pt", "--set", value)
    one_error_line(r, *words)
    assert not (tmp_path / "kd").exists()
