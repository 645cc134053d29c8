"""The training loop on the CPU: learning, resume, divergence, run folders, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from dali_erkt import engine
from dali_erkt.checkpoint import load_checkpoint, save_checkpoint
from dali_erkt.cli import main
from dali_erkt.commands.demo import DemoSettings, run_demo
from dali_erkt.config import default_config, from_dict
from dali_erkt.data.dataset import make_split, save_split
from dali_erkt.engine import Distillation, Supervised
from dali_erkt.teachers import LiveTeacher
from dali_erkt.errors import CheckpointError, ConfigError, TrainingError
from dali_erkt.models import build_ensemble
from dali_erkt.runtime import resolve_runtime
from dali_erkt.synthetic import make_scenes

SIZE = 32
ARCH = "resnet10t"  # small and quick to learn from scratch (see demo.py)


def tiny_config(preset="erkt", epochs=2):
    cfg = default_config(preset)
    cfg.data.image_size = SIZE
    cfg.data.batch_size = 12
    cfg.data.num_threads = 2
    cfg.optim.epochs = epochs
    cfg.optim.lr = 2e-3
    cfg.run.device = "cpu"
    cfg.run.log_every = 2
    cfg.model.teachers, cfg.model.teacher_weights, cfg.model.arch = (ARCH, ARCH), (0.6, 0.4), ARCH
    return cfg.validate()


def fit_teacher(cfg, split, out, **kwargs):
    return engine.fit(cfg, split, out, Supervised(), resolve_runtime(cfg.run), progress=False, **kwargs)


def fit_student(cfg, split, out, teachers, **kwargs):
    m = cfg.model
    ens = build_ensemble(m.teachers, teachers, m.teacher_weights, m.combine, split.classes)
    return engine.fit(cfg, split, out, Distillation.from_config(LiveTeacher(ens), cfg.loss), resolve_runtime(cfg.run),
                      progress=False, **kwargs)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_scenes(tmp_path_factory.mktemp("scenes"), classes=4, per_class=30, size=SIZE)
    return make_split(root, 0.5, seed=0)


@pytest.fixture(scope="module")
def teachers(split, tmp_path_factory):
    """Two briefly trained teachers (CE, base preset) and their checkpoints."""
    out = tmp_path_factory.mktemp("teachers")
    cfg = tiny_config("base", epochs=8)
    paths = []
    for k in range(2):
        cfg.run.seed = k
        fit_teacher(cfg, split, out / f"t{k}")
        paths.append(out / f"t{k}" / "last.pt")
    return paths


def test_distillation_beats_chance(split, teachers, tmp_path):
    cfg = tiny_config("erkt", epochs=8)
    s = fit_student(cfg, split, tmp_path / "student", teachers)
    chance = 1 / len(split.classes)
    # Measured: about 0.75 (4 classes, 60 training images, 8 epochs); the margin asked is +0.25.
    assert s["last_oa"] >= chance + 0.25, s
    assert 0.0 <= s["agreement"] <= 1.0
    log = [json.loads(line) for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert all(k in log[-1] for k in ("loss", "ce", "inter", "intra", "oa", "agreement", "images_per_s"))
    assert log[-1]["lr"] < log[0]["lr"]  # cosine decay
    saved = from_dict(yaml.safe_load((tmp_path / "student" / "config.yaml").read_text()))
    assert saved == cfg


def _fit_stopped_after_first_epoch(cfg, split, out, teachers, monkeypatch):
    """Run `fit` and kill it right after epoch 1's checkpoint and log are written."""
    real = engine.RunDir.save

    def save_then_stop(self, state, is_best):
        real(self, state, is_best)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.RunDir, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit_student(cfg, split, out, teachers)
    monkeypatch.setattr(engine.RunDir, "save", real)


def _as_schema_1(path) -> None:
    """Rewrite a checkpoint as the first schema wrote it (before run_state): no schema field, a
    0-based epoch, a stored configuration without the settings added since (the loss kinds)."""
    state = load_checkpoint(path)
    del state["schema"]
    state["epoch"] -= 1
    for key in ("kind", "dkd_alpha", "dkd_beta", "dkd_warmup"):
        del state["config"]["loss"][key]
    save_checkpoint(path, state)


@pytest.mark.parametrize("schema", ["current", "schema-1"])
def test_resume_continues_exactly(split, teachers, tmp_path, monkeypatch, schema):
    cfg = tiny_config("erkt", epochs=2)
    full = fit_student(cfg, split, tmp_path / "full", teachers)

    _fit_stopped_after_first_epoch(cfg, split, tmp_path / "cut", teachers, monkeypatch)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1  # epochs done, from 1
    if schema == "schema-1":  # a run checkpointed by the previous version still resumes exactly
        _as_schema_1(tmp_path / "cut" / "last.pt")
    resumed = fit_student(cfg, split, tmp_path / "cut", teachers, resume=True)

    assert resumed["last_oa"] == full["last_oa"] and resumed["agreement"] == full["agreement"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda h: [{k: v for k, v in r.items() if "second" not in k and "per_s" not in k} for r in h]
    assert strip(a["history"]) == strip(b["history"])


def test_an_existing_run_is_not_overwritten(split, tmp_path):
    cfg = tiny_config("base", epochs=1)
    fit_teacher(cfg, split, tmp_path / "run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        fit_teacher(cfg, split, tmp_path / "run")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_nan_loss_stops_with_last_good_checkpoint_intact(split, tmp_path, monkeypatch):
    cfg = tiny_config("base", epochs=3)
    from dali_erkt import tasks
    real = tasks.cutmix_cross_entropy
    calls = {"n": 0}
    steps_per_epoch = len(split.train) // cfg.data.batch_size

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss  # from epoch 2 on

    monkeypatch.setattr(tasks, "cutmix_cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"NaN or infinite by step \d+ of epoch 2.*last good checkpoint"):
        fit_teacher(cfg, split, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_resume_refuses_another_architecture(split, tmp_path):
    cfg = tiny_config("base", epochs=3)
    cfg.optim.epochs = 1
    fit_teacher(cfg, split, tmp_path / "run")
    cfg.optim.epochs, cfg.model.arch = 3, "resnet18"
    with pytest.raises(CheckpointError, match="a run of resnet10t, not resnet18"):
        fit_teacher(cfg, split, tmp_path / "run", resume=True, allow_changes=True)


def test_cosine_schedule():
    assert engine.cosine_lr(1.0, 0, 10, "cosine") == 1.0
    assert engine.cosine_lr(1.0, 5, 10, "cosine") == pytest.approx(0.5)
    assert engine.cosine_lr(1.0, 9, 10, "cosine") > 0
    assert engine.cosine_lr(1.0, 7, 10, "constant") == 1.0


# ---- the command line ------------------------------------------------------------------------

def test_cli_train_teacher_distill_evaluate(split, tmp_path):
    split_dir = save_split(split, tmp_path / "split")
    run = CliRunner().invoke
    common = ["--split", str(split_dir), "--image-size", str(SIZE), "--batch-size", "12",
              "--device", "cpu", "--epochs", "1", "--no-progress", "--set", "data.num_threads=2"]
    for arch in ("resnet10t", "resnet14t"):
        r = run(main, ["train-teacher", "--arch", arch, "--out", str(tmp_path / "t" / arch)] + common)
        assert r.exit_code == 0, r.output
    teachers = ["--set", "model.teachers=[resnet10t, resnet14t]", "--set", "model.teacher_weights=[0.5, 0.5]"]
    r = run(main, ["distill", "--teachers", str(tmp_path / "t"), "--out", str(tmp_path / "s"),
                   "--set", "model.arch=resnet10t"] + teachers + common)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "student" and summary["epochs"] == 1
    assert (tmp_path / "s" / "best.pt").is_file() and (tmp_path / "s" / "config.yaml").is_file()

    # No --image-size: the checkpoint's own settings (32 px) are used, not the default 256.
    evaluate = ["evaluate", "--split", str(split_dir), "--checkpoint", str(tmp_path / "s" / "last.pt"),
                "--out", str(tmp_path / "ev"), "--device", "cpu", "--json"]
    r = run(main, evaluate)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert set(result["per_class"]) == set(split.classes) and 0 <= result["oa"] <= 1
    assert result["image_size"] == SIZE and result["name"] == "student-resnet10t-last"
    header = (tmp_path / "ev" / "student-resnet10t-last_confusion.csv").read_text().splitlines()[0]
    assert all(c in header for c in split.classes)
    assert (tmp_path / "ev" / "student-resnet10t-last_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "ev" / "student-resnet10t-last_config.yaml"
    assert yaml.safe_load(saved.read_text())["data"]["image_size"] == SIZE
    # An existing report is kept unless --force; a flag that overrides the run's size says so.
    before = (tmp_path / "ev" / "student-resnet10t-last_metrics.json").read_bytes()
    r = run(main, evaluate)
    assert r.exit_code == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert (tmp_path / "ev" / "student-resnet10t-last_metrics.json").read_bytes() == before
    r = run(main, evaluate + ["--force", "--image-size", "48"])
    assert r.exit_code == 0 and json.loads(r.stdout)["image_size"] == 48, r.output
    assert "data.image_size = 48; the run was trained with 32" in r.stderr

    r = run(main, ["evaluate", "--split", str(split_dir), "--teachers", str(tmp_path / "t"),
                   "--out", str(tmp_path / "ev"), "--device", "cpu"] + teachers)
    assert r.exit_code == 0, r.output
    assert "ensemble-resnet10t+resnet14t on test: OA" in r.output and f"at {SIZE} px" in r.output


def test_cli_errors_are_one_line(split, tmp_path):
    split_dir = save_split(split, tmp_path / "split")
    run = CliRunner().invoke
    r = run(main, ["distill", "--split", str(split_dir), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: no teachers")
    assert len(r.output.strip().splitlines()) == 1
    r = run(main, ["distill", "--split", str(split_dir), "--teachers", str(tmp_path / "none"),
                   "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 2 and "does not exist" in r.output and "train-teacher" in r.output
    r = run(main, ["train-teacher", "--split", str(tmp_path / "nosplit"), "--arch", ARCH,
                   "--out", str(tmp_path / "t")])
    assert r.exit_code == 2 and r.output.startswith("error:")
    r = run(main, ["train-teacher", "--split", str(split_dir), "--arch", "not_a_model",
                   "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert r.exit_code == 2 and "unknown timm model" in r.output
    r = run(main, ["train-teacher", "--split", str(split_dir), "--arch", ARCH, "--out", str(tmp_path / "t"),
                   "--set", "vsm.cutmix.p=2"])
    assert r.exit_code == 2 and "not a probability" in r.output


def test_evaluate_refuses_a_checkpoint_that_holds_code(split, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"arch": ARCH, "model": Evil()}))
    split_dir = save_split(split, tmp_path / "split")
    r = CliRunner().invoke(main, ["evaluate", "--split", str(split_dir), "--checkpoint", str(bad),
                                  "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert r.exit_code == 2 and "error:" in r.output
    assert not marker.exists()


def test_demo_pipeline_end_to_end(tmp_path):
    """The demo's code path with very small settings (the real CPU demo is reported in README)."""
    s = DemoSettings(teachers=(ARCH, ARCH, ARCH), student=ARCH, classes=3, per_class=16, image_size=SIZE,
                     train_ratio=0.5, teacher_epochs=1, student_epochs=1, lr=1e-3, batch_size=8)
    report = run_demo(tmp_path, "cpu", progress=False, settings=s)
    for key in ("student_oa", "ensemble_oa", "chance", "teacher_oa", "seconds", "out"):
        assert key in report
    assert report["chance"] == pytest.approx(1 / 3)
    assert json.loads((tmp_path / report["out"].split("/")[-1] / "report.json").read_text()) == report


def test_cli_resume_reads_the_runs_own_config(split, tmp_path):
    split_dir = save_split(split, tmp_path / "split")
    out = tmp_path / "t"
    first = ["train-teacher", "--split", str(split_dir), "--arch", ARCH, "--out", str(out),
             "--image-size", str(SIZE), "--batch-size", "12", "--device", "cpu", "--epochs", "1",
             "--no-progress", "--set", "vsm.grayscale.p=0.3"]
    assert CliRunner().invoke(main, first).exit_code == 0
    # Only --epochs is given now: size, batch, device and the VSM come from out/config.yaml.
    resume = ["train-teacher", "--split", str(split_dir), "--arch", ARCH, "--out", str(out), "--resume",
              "--epochs", "2", "--no-progress"]
    # More epochs reshape the cosine schedule: refused in one line unless asked for explicitly.
    r = CliRunner().invoke(main, resume)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "optim.epochs = 2, but the run has 1" in r.stderr and "--allow-changes" in r.stderr
    r = CliRunner().invoke(main, resume + ["--allow-changes"])
    assert r.exit_code == 0, r.output
    assert "resume: optim.epochs changed from 1 to 2" in r.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["image_size"] == SIZE and saved["vsm"]["grayscale"]["p"] == 0.3
    assert saved["optim"]["epochs"] == 2
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


# ---- the runtime's variants on the CPU ---------------------------------------------------------

def _two_steps(rt, split):
    """Two supervised steps from one initialisation on one fixed batch; the loss parts."""
    from dali_erkt.data.loader import DaliLoader
    from dali_erkt.models import create_model, place

    torch.manual_seed(0)
    model = place(create_model(ARCH, len(split.classes)), rt.device, rt.channels_last)
    opt = engine.make_optimizer(model, 1e-3, 0.0, rt.device)
    step = engine.make_train_step(engine.compiled(model, rt), Supervised(), opt, rt.grad_scaler(), rt)
    with DaliLoader(split.paths("train"), split.labels("train"), image_size=SIZE, batch_size=8,
                    device="cpu", dtype="float32", num_threads=1, seed=0) as loader:
        batch = next(iter(loader))
    return [step(batch)["loss"].item() for _ in range(2)]


@pytest.mark.slow
def test_compiled_step_on_the_cpu_matches_eager(split):
    """run.compile=on works on the CPU (inductor's C++ backend) and computes the eager step."""
    from dali_erkt.config import RunConfig

    eager = _two_steps(resolve_runtime(RunConfig(device="cpu", compile="off")), split)
    compiled = _two_steps(resolve_runtime(RunConfig(device="cpu", compile="on", compile_mode="default")),
                          split)
    assert eager[1] < eager[0]  # it learns on the repeated batch
    # Fused kernels reorder float sums only: measured 1.3e-4 relative on the second step.
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_bf16_on_the_cpu_and_evaluation_every_other_epoch(split, tmp_path):
    cfg = tiny_config("base", epochs=3)
    cfg.run.precision, cfg.run.eval_every = "bf16", 2
    s = fit_teacher(cfg, split, tmp_path / "run")
    assert s["precision"] == "bf16" and s["epochs"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert ["oa" in r for r in log] == [False, True, True]  # epoch 2, and the last one
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert s["last_epoch"] == 3 and s["best_epoch"] in (2, 3)


def test_weights_are_reported_recorded_and_rerun(split, tmp_path):
    """--weights: one line of what loaded; config.yaml records path and hash; a rerun from that
    config.yaml starts from the same bytes, and a changed file is refused."""
    from dali_erkt.models import create_model

    backbone = create_model(ARCH, 10)  # another class count: the classifier stays at its init
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    split_dir = save_split(split, tmp_path / "split")
    args = ["train-teacher", "--split", str(split_dir), "--arch", ARCH, "--image-size", str(SIZE),
            "--batch-size", "12", "--device", "cpu", "--epochs", "1", "--no-progress"]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "a"), "--weights", str(weights)])
    assert r.exit_code == 0, r.output
    n = len(backbone.state_dict()) - 2
    assert f"weights: {n} tensors loaded from {weights}; left at initialisation: fc.weight, fc.bias" in r.stderr
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["model"]["arch"] == ARCH and saved["model"]["teachers"] == []
    assert saved["model"]["weights"] == str(weights) and len(saved["model"]["weights_sha256"]) == 64
    # A rerun from the run's config.yaml loads the same file again ...
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b"), "--config", str(tmp_path / "a" / "config.yaml")])
    assert r.exit_code == 0 and f"{n} tensors loaded from {weights}" in r.stderr, r.output
    # ... and refuses it once it has changed.
    torch.manual_seed(1)  # other bytes than the first backbone, whatever the RNG's state was
    torch.save(create_model(ARCH, 10).state_dict(), weights)
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "c"), "--config", str(tmp_path / "a" / "config.yaml")])
    assert r.exit_code == 2 and "changed since this configuration recorded it" in r.stderr, r.output


def test_no_progress_keeps_one_line_per_epoch(split, tmp_path):
    split_dir = save_split(split, tmp_path / "split")
    r = CliRunner().invoke(main, ["train-teacher", "--split", str(split_dir), "--arch", ARCH, "--out",
                                  str(tmp_path / "t"), "--image-size", str(SIZE), "--batch-size", "12",
                                  "--device", "cpu", "--epochs", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"teacher {ARCH} epoch")]
    assert [ln.split()[3] for ln in lines] == ["1/2", "2/2"] and all("oa" in ln for ln in lines)
    assert json.loads(r.stdout)["epochs"] == 2  # stdout: the result alone
