"""The README's examples run as written: the loader in other KD code, on the CPU."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.synthetic import make_scenes

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"## {title}"):]
    section = section[:section.index("\n## ", 4)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block under '{title}'"
    return blocks[0]


def test_loader_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    code = section_code("The loader in your own KD code")
    data = make_scenes(tmp_path / "data", classes=3, per_class=16, size=64)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["split", str(data), "--train-ratio", "0.5", "--out", "splits/demo"])
    assert r.exit_code == 0, r.output
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    # It trained: two epochs of 24 / 8 = 3 batches, and the loss is a finite number.
    assert scope["epoch"] == 1 and scope["loss"].isfinite()
    assert scope["loader"].state_dict() == {"epoch": 2, "batch": 0}
    assert scope["x"].shape == (8, 3, 64, 64) and scope["target"].shape == (8, 3)
    assert scope["x"].dtype == torch.float32  # the default dtype, on the CPU and a GPU
    # zip(test, test): the 24 test images / 8 as 3 pairs of equal batches; the CutMix refusal
    # printed as one line that names the fix.
    assert len(scope["pairs"]) == len(scope["test"]) == 3
    refusal = [line for line in capsys.readouterr().out.splitlines() if "CutMix" in line]
    assert len(refusal) == 1 and "cutmix=False" in refusal[0]
