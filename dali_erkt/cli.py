"""The `dali-erkt` command line: thin wrappers over the library.

Each command turns library errors (ConfigError, DataError, ...) into one clear line and exit 2.
"""
from __future__ import annotations

import functools
import sys

import click

from .config import ConfigError


def friendly_errors(fn):
    """Show expected errors as one line (`error: ...`) instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .data.dataset import DataError
        from .checkpoint import CheckpointError
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, CheckpointError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dali-erkt")
def main():
    """ERKT-Net distillation for remote-sensing scene classification, fed by NVIDIA DALI."""


# Commands are added below, one function each.


@main.command("split")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--train-ratio", required=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the images used for training, e.g. 0.2.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the random draw.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str),
              help="Folder to write classes.txt, train.txt, test.txt and split.yaml into.")
@click.option("--no-stratify", is_flag=True, help="Draw from the whole set, not class by class.")
@click.option("--skip-check", is_flag=True, help="Do not decode every file first (faster, riskier).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
              help="Threads used to check the files.")
@friendly_errors
def split_cmd(data, train_ratio, seed, out_dir, no_stratify, skip_check, workers):
    """Draw a reproducible train/test split of the image folder DATA and save it as file lists."""
    from .data.dataset import check_files, make_split, save_split, scan

    bad = None
    if not skip_check:
        # DALI stops on the first corrupt file, so find them now rather than mid-training.
        _, samples = scan(data)
        bad = [p for p, _ in check_files(data, [p for p, _ in samples], workers=workers)]
    split = make_split(data, train_ratio, seed=seed, stratify=not no_stratify, bad=bad)
    out = save_split(split, out_dir)
    click.echo(f"split: {len(split.classes)} classes, {len(split.train)} train / "
               f"{len(split.test)} test images (ratio {train_ratio}, seed {seed}, "
               f"{'stratified' if split.stratified else 'not stratified'}) written to {out}")


@main.command("check-data")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
              help="Threads used to decode the files.")
@friendly_errors
def check_data_cmd(data, as_json, workers):
    """Decode every image under DATA; list the unreadable ones (exit 1 if there are any)."""
    import json
    import os

    from .data.dataset import check_files, scan

    _, samples = scan(data)
    bad = check_files(data, [p for p, _ in samples], workers=workers)
    if as_json:
        click.echo(json.dumps({"root": os.path.abspath(data), "checked": len(samples),
                               "bad": [{"path": p, "reason": r} for p, r in bad]}))
    else:
        for path, reason in bad:
            click.echo(f"{path}: {reason}")
        click.echo(f"checked {len(samples)} images in {data}: "
                   + (f"{len(bad)} unreadable; remove or replace them" if bad else "all readable"))
    sys.exit(1 if bad else 0)


# --------------------------------------------------------------------------------------------
# Training, distillation, evaluation and the demo.
# --------------------------------------------------------------------------------------------

def run_options(default_preset: str):
    """Options shared by the commands that train or evaluate: config file, preset, overrides."""
    def decorate(fn):
        options = [
            click.option("--config", "config_path", type=click.Path(dir_okay=False),
                         help="YAML config (as written into every run folder) to start from."),
            click.option("--preset", default=None,
                         help=f"VSM preset: erkt, base or none (default {default_preset})."),
            click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                         help="Override any setting, e.g. --set vsm.cutmix.p=0.5 (repeatable)."),
            click.option("--epochs", type=click.IntRange(min=1), help="optim.epochs"),
            click.option("--batch-size", type=click.IntRange(min=1), help="data.batch_size"),
            click.option("--image-size", type=click.IntRange(min=16), help="data.image_size"),
            click.option("--lr", type=float, help="optim.lr"),
            click.option("--seed", type=int, help="run.seed"),
            click.option("--device", help="run.device: auto, cpu, cuda or cuda:N"),
            click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                         help="run.precision (auto: bf16 on Ampere+, fp16 + GradScaler on older "
                              "GPUs, fp32 on the CPU)"),
            click.option("--compile/--no-compile", "compile_", default=None,
                         help="torch.compile the models (default: on where CUDA is)."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def training_run_options(fn):
    """Options of the commands that train a model: run folder, initial weights, resume."""
    options = [
        click.option("--out", "out_dir", required=True, type=click.Path(), help="Run folder."),
        click.option("--weights", type=click.Path(dir_okay=False),
                     help="Local weights to start from (safetensors or a torch state dict)."),
        click.option("--pretrained", is_flag=True, help="Start from timm's hub weights (needs network)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(default_preset, config_path=None, preset=None, overrides=(), epochs=None,
                 batch_size=None, image_size=None, lr=None, seed=None, device=None, precision=None,
                 compile_=None):
    """Defaults < preset < config file < --set overrides < dedicated flags."""
    from .config import apply_overrides, default_config, load_config, vsm_preset

    cfg = load_config(config_path) if config_path else default_config(preset or default_preset)
    if preset and config_path:
        cfg.preset, cfg.vsm = preset, vsm_preset(preset)
    flags = {"optim.epochs": epochs, "data.batch_size": batch_size, "data.image_size": image_size,
             "optim.lr": lr, "run.seed": seed, "run.device": device, "run.precision": precision,
             "run.compile": None if compile_ is None else ("on" if compile_ else "off")}
    return apply_overrides(cfg, list(overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None])


def training_errors(fn):
    """TrainingError (diverged, out of memory) as one line and exit 3, like friendly_errors."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .engine import TrainingError
        try:
            return fn(*args, **kwargs)
        except TrainingError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(3)
    return wrapper


def _resume_config(resume: bool, out_dir: str, opts: dict) -> dict:
    """A resumed run starts from its own config.yaml (flags given now still override it)."""
    from pathlib import Path

    saved = Path(out_dir) / "config.yaml"
    if resume and not opts.get("config_path") and saved.is_file():
        opts = dict(opts, config_path=str(saved))
    return opts


def _teacher_paths(cfg, teacher_dir, teachers):
    """One checkpoint per configured teacher: --teacher given in order, or DIR/<arch>/last.pt."""
    from pathlib import Path

    if teachers:
        if len(teachers) != len(cfg.model.teachers):
            raise ConfigError(f"{len(teachers)} --teacher checkpoints for {len(cfg.model.teachers)} "
                              f"teachers ({', '.join(cfg.model.teachers)}): give one per teacher")
        return list(teachers)
    if not teacher_dir:
        raise ConfigError("no teachers: pass --teachers DIR (train-teacher runs in DIR/<arch>/) "
                          "or one --teacher PATH per teacher")
    paths = [Path(teacher_dir) / arch / "last.pt" for arch in cfg.model.teachers]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"teacher checkpoint {missing[0]} does not exist: run "
                          f"`dali-erkt train-teacher --arch ARCH --out {teacher_dir}/ARCH` first")
    return [str(p) for p in paths]


@main.command("train-teacher")
@click.option("--split", "split_dir", required=True, type=click.Path(),
              help="Split folder written by `dali-erkt split`.")
@click.option("--arch", required=True, help="timm name, e.g. efficientnet_b3, efficientnet_b0, resnet50.")
@training_run_options
@run_options("base")
@friendly_errors
@training_errors
def train_teacher_cmd(split_dir, arch, out_dir, weights, pretrained, resume, no_progress, **opts):
    """Fine-tune one teacher on a split with CutMix cross-entropy (the `base` preset by default)."""
    import json

    from .data.dataset import load_split
    from .engine import fit

    cfg = build_config("base", **_resume_config(resume, out_dir, opts))
    cfg.model.pretrained = cfg.model.pretrained or pretrained
    summary = fit(cfg, load_split(split_dir), out_dir, arch, weights=weights, resume=resume,
                  progress=not no_progress, kind="teacher")
    click.echo(json.dumps(summary))


@main.command("distill")
@click.option("--split", "split_dir", required=True, type=click.Path(),
              help="Split folder written by `dali-erkt split`.")
@click.option("--teachers", "teacher_dir", type=click.Path(file_okay=False),
              help="Folder holding one train-teacher run per teacher: DIR/<arch>/last.pt.")
@click.option("--teacher", "teachers", multiple=True, type=click.Path(dir_okay=False),
              help="A teacher checkpoint, once per teacher in model.teachers order.")
@training_run_options
@run_options("erkt")
@friendly_errors
@training_errors
def distill_cmd(split_dir, teacher_dir, teachers, out_dir, weights, pretrained, resume, no_progress,
                **opts):
    """Distil the teacher ensemble into the student (ERKT: VSM + CE + DIST), the paper's loop."""
    import json

    from .data.dataset import load_split
    from .engine import fit
    from .evaluation import load_ensemble

    cfg = build_config("erkt", **_resume_config(resume, out_dir, opts))
    cfg.model.pretrained = cfg.model.pretrained or pretrained
    split = load_split(split_dir)
    paths = _teacher_paths(cfg, teacher_dir, teachers)
    ensemble = load_ensemble(paths, cfg.model.teacher_weights, cfg.model.combine, split.classes)
    summary = fit(cfg, split, out_dir, cfg.model.student, teacher=ensemble, weights=weights,
                  resume=resume, progress=not no_progress, kind="student")
    click.echo(json.dumps(summary))


@main.command("evaluate")
@click.option("--split", "split_dir", required=True, type=click.Path(),
              help="Split folder written by `dali-erkt split`.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="A student or teacher checkpoint (last.pt / best.pt of a run).")
@click.option("--teacher", "teachers", multiple=True, type=click.Path(dir_okay=False),
              help="Evaluate the ensemble of these teacher checkpoints (model.teachers order).")
@click.option("--teachers", "teacher_dir", type=click.Path(file_okay=False),
              help="Evaluate the ensemble of DIR/<arch>/last.pt.")
@click.option("--part", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Folder for <name>_metrics.json and the confusion matrix (CSV, PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@run_options("erkt")
@friendly_errors
def evaluate_cmd(split_dir, checkpoint, teachers, teacher_dir, part, out_dir, as_json, **opts):
    """OA, per-class accuracy and the confusion matrix of a student, a teacher or the ensemble."""
    import json

    from .data.dataset import load_split
    from .evaluation import evaluate_model, load_ensemble, load_trained

    cfg = build_config("erkt", **opts)
    split = load_split(split_dir)
    if checkpoint and (teachers or teacher_dir):
        raise ConfigError("give either --checkpoint or the ensemble's teachers, not both")
    if checkpoint:
        model, state = load_trained(checkpoint, len(split.classes), split.classes)
        name = state.get("kind", "model")
    else:
        paths = _teacher_paths(cfg, teacher_dir, teachers)
        model = load_ensemble(paths, cfg.model.teacher_weights, cfg.model.combine, split.classes)
        name = "ensemble"
    result = evaluate_model(model, cfg, split, out_dir, part=part, name=name)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{name} on {part}: OA {result['oa'] * 100:.2f}% over {result['images']} images")
    for cls, acc in result["per_class"].items():
        click.echo(f"  {cls:<24} {'-' if acc is None else f'{acc * 100:6.2f}%'}")
    click.echo(f"confusion matrix: {result['confusion_csv']}, {result['confusion_png']}")


@main.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(),
              help="Each demo run goes into a new time-stamped folder below this one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (student_oa, ensemble_oa, chance, ...) instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@friendly_errors
@training_errors
def demo_cmd(out_dir, device, as_json, no_progress):
    """Generate scenes, train three teachers, distil the student and report, end to end."""
    import json

    from .demo import format_report, run_demo

    report = run_demo(out_dir, device, progress=not no_progress)
    click.echo(json.dumps(report) if as_json else format_report(report))


from .config import VSM_PRESETS  # noqa: E402  (the preview command's --preset choices)


@main.command("preview")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--samples", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Samples of the training order the gate rates are measured over.")
@click.option("--preset", type=click.Choice(VSM_PRESETS), default=None,
              help="VSM preset (default erkt); not together with --config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. vsm.grayscale.p=0.5 (repeatable).")
@click.option("--config", "config_file", type=click.Path(path_type=str), default=None,
              help="YAML config to start from.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Plan seed (default: the config's run.seed).")
@click.option("--out", default="preview.png", show_default=True, type=click.Path(path_type=str),
              help="PNG file of the grid.")
@click.option("--rows", default=6, show_default=True, type=click.IntRange(min=1, max=30),
              help="Images shown, one per row, from different classes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the DALI pipeline of the grid runs (auto: cuda if present).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@friendly_errors
def preview_cmd(data, samples, preset, overrides, config_file, seed, out, rows, device, as_json):
    """Show what the nine VSM units do to the images of DATA.

    The gate rates (configured p against the share that fired) come from the augmentation plan
    of the first SAMPLES samples of the training order: the plan is exactly what the DALI pipeline
    executes, so no image is decoded for them. CutMix flips one coin per batch, so its rate and n
    count batches. The grid (--out) shows ROWS images, each resized to the training size and then
    as the real DALI training pipeline augments it in epochs 0-5, labelled with the units that
    fired; a yellow dashed box marks the CutMix paste, a cyan box the erased area.
    """
    import json
    import time

    from .config import apply_overrides, default_config, load_config
    from .data.dataset import scan
    from .preview import format_rates, gate_rates, render_grid, stdout_to_stderr

    start = time.perf_counter()
    if config_file and preset:
        raise ConfigError("give --preset or --config, not both (the config file names its preset)")
    cfg = load_config(config_file) if config_file else default_config(preset or "erkt")
    cfg = apply_overrides(cfg, list(overrides))
    seed = cfg.run.seed if seed is None else seed
    classes, items = scan(data)
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rates = gate_rates(cfg, len(items), samples, seed)
    # DALI may log to stdout; keep stdout for our own output (one JSON object with --json).
    with stdout_to_stderr():
        grid = render_grid(data, items, classes, cfg, out, rows=rows, seed=seed, device=device)
    report = {"gates": rates["gates"], "samples": rates["samples"], "batches": rates["batches"],
              "batch_size": rates["batch_size"], "preset": cfg.preset, "seed": seed,
              "device": device, "grid": str(grid), "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(format_rates(rates))
        click.echo(f"{rates['samples']} samples in {rates['batches']} batches of "
                   f"{rates['batch_size']} (seed {seed}, preset {cfg.preset})")
        click.echo(f"grid: {grid}")
