"""The `split` and `check-data` commands, run in-process with click's CliRunner."""
from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import write_bad_files
from dali_erkt.cli import main
from dali_erkt.data.dataset import load_split


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_split_writes_files_and_summary(image_tree, tmp_path):
    out = tmp_path / "split"
    res = run("split", image_tree, "--train-ratio", 0.25, "--seed", 5, "--out", out)
    assert res.exit_code == 0, res.output
    assert "3 classes" in res.stdout and "6 train / 18 test" in res.stdout and str(out) in res.stdout
    assert len(res.stdout.strip().splitlines()) == 1
    split = load_split(out)
    assert (split.seed, split.train_ratio, split.stratified) == (5, 0.25, True)

    res = run("split", image_tree, "--train-ratio", 0.25, "--out", tmp_path / "s2", "--no-stratify")
    assert res.exit_code == 0 and "not stratified" in res.stdout
    assert load_split(tmp_path / "s2").stratified is False


def test_split_refuses_broken_file(image_tree, tmp_path):
    write_bad_files(image_tree / "beach")
    res = run("split", image_tree, "--train-ratio", 0.5, "--out", tmp_path / "s")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "beach/truncated.jpg" in lines[0] and "check-data" in lines[0]
    assert not (tmp_path / "s").exists()
    # --skip-check trusts the files.
    assert run("split", image_tree, "--train-ratio", 0.5, "--out", tmp_path / "s",
               "--skip-check").exit_code == 0


def test_split_missing_data_is_one_line_error(tmp_path):
    res = run("split", tmp_path / "nope", "--train-ratio", 0.5, "--out", tmp_path / "s")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "does not exist" in res.stderr


def test_check_data_exit_codes_and_json(image_tree):
    res = run("check-data", image_tree)
    assert res.exit_code == 0 and "24 images" in res.stdout and "all readable" in res.stdout

    names = write_bad_files(image_tree / "harbor")
    res = run("check-data", image_tree)
    assert res.exit_code == 1
    assert all(f"harbor/{n}:" in res.stdout for n in names) and "3 unreadable" in res.stdout

    res = run("check-data", image_tree, "--json")
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert set(report) == {"root", "checked", "bad", "skipped"} and report["checked"] == 27
    assert report["skipped"] == []
    assert {b["path"] for b in report["bad"]} == {f"harbor/{n}" for n in names}
    assert all(set(b) == {"path", "reason"} for b in report["bad"])
