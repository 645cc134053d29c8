"""The `dali-erkt` command line: a thin click layer over `dali_erkt.commands`.

Every expected error (a wrong setting, unusable data, a bad checkpoint, a failed run) is printed
as one line, `error: <what is wrong and what to do>`, with a non-zero exit status: 2 for the
input, 3 for a run that failed (diverged, out of memory). The last line of defence: any other
exception is a bug, printed as one line, `internal error: ...`, naming the file that holds its
traceback (inside the run folder where the command has one), exit status 4. Ctrl-C and SIGTERM
end with one line saying what the run folder holds and that `--resume` continues (130 / 143).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import click

from .config import VSM_PRESETS
from .errors import ConfigError, ErktError

INTERNAL_ERROR = 4  # exit status of a bug (an exception that is not an ErktError)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _terminate(signum, frame):
    raise Terminated


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except ErktError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, Terminated) as exc:
            name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
            click.echo(f"interrupted ({name}){_kept(kwargs.get('out_dir'))}", err=True)
            sys.exit(code)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            where = _write_traceback(kwargs.get("out_dir"))
            what = (str(exc).strip().splitlines() or [""])[0][:200]
            click.echo(f"internal error: {type(exc).__name__}: {what} (a bug in dali-erkt: the "
                       f"traceback is in {where}; please report it with that file)", err=True)
            sys.exit(INTERNAL_ERROR)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


def _kept(out_dir) -> str:
    """What an interrupted command's run folder holds (every file in it is complete: atomic)."""
    if not out_dir or not Path(out_dir).is_dir():
        return ": nothing was left half-written"
    if (Path(out_dir) / "last.pt").is_file():
        return (f": {out_dir} holds its last complete epoch (last.pt); run the same command with "
                "--resume to continue")
    return f": {out_dir} holds no checkpoint yet; run the same command with --resume to start it"


def _write_traceback(out_dir) -> str:
    """The traceback of the exception being handled, in a file: the run folder where there is
    one, else the temporary folder. Returns the file's path."""
    text = traceback.format_exc()
    name = f"internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    folders = ([Path(out_dir)] if out_dir and Path(out_dir).is_dir() else []) + [Path(tempfile.gettempdir())]
    for folder in folders:
        try:
            (folder / name).write_text(text, encoding="utf-8")
            return str(folder / name)
        except OSError:
            continue
    return "(no writable folder: the traceback is below)\n" + text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dali-erkt")
def main():
    """ERKT-Net distillation for remote-sensing scene classification, fed by NVIDIA DALI."""


def options(*opts):
    def decorate(fn):
        for option in reversed(opts):
            fn = option(fn)
        return fn
    return decorate


# Options of every command that resolves a configuration (see config.resolve_config).
config_options = options(
    click.option("--config", "config_path", type=click.Path(dir_okay=False),
                 help="YAML config (as written into every run folder) to start from."),
    click.option("--preset", type=click.Choice(VSM_PRESETS), default=None,
                 help="VSM preset (default: erkt; base for train-teacher)."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override any setting, e.g. --set vsm.cutmix.p=0.5 (repeatable)."),
)
run_options = options(
    click.option("--epochs", type=click.IntRange(min=1), help="optim.epochs"),
    click.option("--batch-size", type=click.IntRange(min=1), help="data.batch_size"),
    click.option("--image-size", type=click.IntRange(min=16), help="data.image_size"),
    click.option("--lr", type=float, help="optim.lr"),
    click.option("--seed", type=click.IntRange(min=0), help="run.seed"),
    click.option("--device", help="run.device: auto, cpu, cuda or cuda:N"),
    click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                 help="run.precision (auto: bf16 on Ampere+, fp16 + GradScaler on older GPUs, "
                      "fp32 on the CPU)"),
    click.option("--compile/--no-compile", "compile_", default=None,
                 help="torch.compile the models (default: on where CUDA is)."),
)
training_options = options(
    click.option("--split", "split_dir", required=True, type=click.Path(),
                 help="Split folder written by `dali-erkt split`."),
    click.option("--out", "out_dir", required=True, type=click.Path(), help="Run folder."),
    click.option("--weights", type=click.Path(dir_okay=False),
                 help="Local weights to start from (safetensors or a torch state dict)."),
    click.option("--pretrained", is_flag=True, help="Start from timm's hub weights (needs network)."),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt."),
    click.option("--allow-changes", is_flag=True,
                 help="With --resume: accept settings that differ from the run's (not exact)."),
    click.option("--no-progress", is_flag=True, help="No progress bar (epoch lines stay)."),
    click.option("--tensorboard", is_flag=True,
                 help="TensorBoard event files in --out/tensorboard (run.tensorboard; needs "
                      "pip install \"dali-erkt[tensorboard]\")."),
)


def _tensorboard_flag(kwargs: dict) -> dict:
    """--tensorboard as the setting it stands for (last, so it wins like a dedicated flag)."""
    if kwargs.pop("tensorboard", False):
        kwargs["overrides"] = (*kwargs.get("overrides", ()), "run.tensorboard=true")
    return kwargs


teacher_options = options(
    click.option("--teachers", "teacher_dir", type=click.Path(file_okay=False),
                 help="Folder holding one train-teacher run per teacher: DIR/<arch>/last.pt."),
    click.option("--teacher", "teachers", multiple=True, type=click.Path(dir_okay=False),
                 help="A teacher checkpoint, once per teacher in model.teachers order."),
)


@main.command("split")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--train-ratio", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the images used for training, e.g. 0.2.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the random draw.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str),
              help="Folder to write classes.txt, train.txt, test.txt and split.yaml into.")
@click.option("--no-stratify", is_flag=True, help="Draw from the whole set, not class by class.")
@click.option("--skip-check", is_flag=True, help="Do not decode every file first (faster, riskier).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
              help="Threads used to check the files.")
@one_line_errors
def split_cmd(data, train_ratio, seed, out_dir, no_stratify, skip_check, workers):
    """Draw a reproducible train/test split of the image folder DATA and save it as file lists."""
    from .commands.data import skipped_line, split
    r = split(data, train_ratio, out_dir, seed=seed, stratify=not no_stratify,
              skip_check=skip_check, workers=workers)
    if skipped_line(r["skipped"]):
        click.echo(skipped_line(r["skipped"]), err=True)
    click.echo(f"split: {r['classes']} classes, {r['train']} train / {r['test']} test images "
               f"(ratio {train_ratio}, seed {seed}, "
               f"{'stratified' if r['stratified'] else 'not stratified'}) written to {r['out']}")


@main.command("check-data")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1),
              help="Threads used to decode the files.")
@one_line_errors
def check_data_cmd(data, as_json, workers):
    """Decode every image under DATA; list the unreadable ones (exit 1 if there are any)."""
    from .commands.data import check_data, skipped_line
    r = check_data(data, workers)
    if skipped_line(r["skipped"]):
        click.echo(skipped_line(r["skipped"]), err=True)
    if as_json:
        click.echo(json.dumps(r))
    else:
        for bad in r["bad"]:
            click.echo(f"{bad['path']}: {bad['reason']}")
        click.echo(f"checked {r['checked']} images in {data}: " + (
            f"{len(r['bad'])} unreadable; remove or replace them" if r["bad"] else "all readable"))
    sys.exit(1 if r["bad"] else 0)


@main.command("train-teacher")
@click.option("--arch", required=True, help="timm name, e.g. efficientnet_b3, efficientnet_b0, resnet50.")
@training_options
@config_options
@run_options
@one_line_errors
def train_teacher_cmd(no_progress, **kwargs):
    """Fine-tune one teacher on a split with CutMix cross-entropy (the `base` preset by default)."""
    from .commands.train import train_teacher
    click.echo(json.dumps(train_teacher(progress=not no_progress, **_tensorboard_flag(kwargs))))


@main.command("distill")
@teacher_options
@click.option("--teacher-cache", type=click.Path(file_okay=False),
              help="Folder of the teacher logit cache: read where it holds this run's views, "
                   "else filled as the run goes.")
@click.option("--no-teacher", is_flag=True,
              help="Train the student without a teacher (CE only; the paper's Base).")
@training_options
@config_options
@run_options
@one_line_errors
def distill_cmd(no_progress, **kwargs):
    """Distil the teacher ensemble into the student (ERKT: VSM + CE + DIST), the paper's loop."""
    from .commands.train import distill
    click.echo(json.dumps(distill(progress=not no_progress, **_tensorboard_flag(kwargs))))


@main.command("cache-teachers")
@click.option("--split", "split_dir", required=True, type=click.Path(),
              help="Split folder written by `dali-erkt split`.")
@click.option("--teacher-cache", required=True, type=click.Path(file_okay=False),
              help="Folder of the teacher logit cache to fill.")
@teacher_options
@config_options
@run_options
@one_line_errors
def cache_teachers_cmd(**kwargs):
    """Run the teachers over every view of optim.epochs epochs and store their logits, so that
    `distill --teacher-cache` replays them (sweeps over teacher weights, the loss, students)."""
    from .commands.train import cache_teachers
    click.echo(json.dumps(cache_teachers(**kwargs)))


@main.command("sweep")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--train-ratio", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seeds", default="0,1,2", show_default=True,
              help="Comma list; a seed draws the split and seeds the runs.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Sweep folder.")
@click.option("--vary", multiple=True, metavar="KEY=V1,V2",
              help="A setting's values (or preset=base,erkt); several --vary give their product "
                   "(repeatable).")
@click.option("--table", type=click.Choice(["6", "7", "9", "kd"]),
              help="A named recipe: the paper's 6 (EfficientNet-B3's weight), 7 (loss ratio R), "
                   "9 (ablation); kd (DIST, KD, DKD on the same views and teacher cache).")
@click.option("--print-commands", is_flag=True,
              help="Print the steps as dali-erkt command lines in order instead of running them.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Passed to every run (student-only settings, model.arch, model.teachers, "
                   "model.teacher_weights, model.combine, loss.*, to the students only).")
@click.option("--pretrained", is_flag=True,
              help="Teachers and students start from timm's hub weights (needs network), where "
                   "--weights / --weights-dir give no local file.")
@click.option("--weights", "weights", multiple=True, metavar="ARCH=FILE",
              help="A local weights file for the teacher or student of that arch (student=FILE: "
                   "the student alone; repeatable).")
@click.option("--weights-dir", type=click.Path(file_okay=False),
              help="Folder of <arch>.safetensors / .pth / .pt files, one per teacher and student arch.")
@click.option("--teacher-epochs", type=click.IntRange(min=1), help="optim.epochs of the teachers.")
@click.option("--teacher-lr", type=float, help="optim.lr of the teachers.")
@click.option("--teacher-preset", type=click.Choice(VSM_PRESETS), help="The teachers' preset (default: base).")
@click.option("--teacher-set", "teacher_overrides", multiple=True, metavar="KEY=VALUE",
              help="A setting for the teachers only, over --set (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bars (epoch lines stay).")
@run_options
@one_line_errors
def sweep_cmd(data, train_ratio, seeds, out_dir, vary, table, print_commands, overrides, pretrained,
              weights, weights_dir, teacher_epochs, teacher_lr, teacher_preset, teacher_overrides,
              no_progress, **flags):
    """The study for each seed: split, teachers, then the grid of student runs, each an ordinary
    run folder; finished steps are skipped and started ones resumed."""
    from pathlib import Path

    from .commands.sweep import ensemble_table, plan, run
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        seed_list = []
    if not seed_list or min(seed_list) < 0 or len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"--seeds {seeds!r}: give distinct whole seeds >= 0, e.g. 0,1,2")
    options = {**{k: v for k, v in flags.items() if v is not None}, "overrides": overrides,
               **({"pretrained": True} if pretrained else {}),
               **({"progress": False} if no_progress else {})}
    teacher = {"epochs": teacher_epochs, "lr": teacher_lr, "preset": teacher_preset,
               "overrides": teacher_overrides}
    steps = plan(data, train_ratio, seed_list, out_dir, vary=vary, table=table, options=options,
                 teacher_options=teacher, weights=weights, weights_dir=weights_dir)
    if print_commands:
        click.echo("\n".join(command_line(step.command, step.args) for step in steps))
        return
    result = {"steps": len(steps), **run(steps, command_line, lambda line: click.echo(line, err=True))}
    if table == "6":
        result["ensemble_oa"] = {f"seed-{seed}": ensemble_table(Path(out_dir) / f"seed-{seed}",
                                                                options)["ensemble_oa"]
                                 for seed in seed_list}
    click.echo(json.dumps(result))


def command_line(command: str, args: dict) -> str:
    """The `dali-erkt` line that runs `command` with its library function's keyword arguments
    (`progress=False` is `--no-progress`), written from the command's own click parameters."""
    import shlex

    params = {p.name: p for p in main.commands[command].params}
    positional, opts = [], []
    for name, value in args.items():
        if name == "progress":
            name, value = "no_progress", not value
        p = params[name]
        if isinstance(p, click.Argument):
            positional.append(str(value))
        elif p.is_flag:
            if value != p.default:
                opts.append(p.opts[0] if value else p.secondary_opts[0])
        else:
            opts += [a for v in (value if p.multiple else (value,)) for a in (p.opts[0], str(v))]
    return shlex.join(["dali-erkt", command, *positional, *opts])


@main.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(), help="Folder for the report (default: PATHS[0]/report).")
@click.option("--device", default="auto", show_default=True,
              help="Where the teachers run for the ensemble row when no teacher cache holds their "
                   "test logits: auto, cpu, cuda or cuda:N.")
@click.option("--no-ensemble", is_flag=True, help="No ensemble row (the teachers are not read).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@one_line_errors
def report_cmd(paths, out_dir, device, no_ensemble, as_json):
    """Mean +- std over seeds per configuration (last and best OA, training loss, agreement,
    per-class accuracy), as Markdown, CSV and JSON, with training curves per configuration; in a
    sweep also the teachers' ensemble's OA."""
    from .commands.report import report
    r = report(paths, out_dir, device=device, ensemble=not no_ensemble)
    click.echo(json.dumps(r) if as_json else r["markdown"])
    click.echo(f"report: {r['out']}", err=True)


@main.command("models")
@click.argument("archs", nargs=-1, metavar="[RUN_OR_CHECKPOINT | TEACHER_DIR | ARCH]...")
@click.option("--paper", is_flag=True,
              help="Also the paper's Table 8 models (B3, B0, ResNet-50, their ensemble, B3 at "
                   "300 px); the default when no run or checkpoint is given.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=16),
              help="Size of the named archs and the paper's models (a run: its own).")
@click.option("--num-classes", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Classes of the named archs and the paper's models (a run: its own).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--images", type=click.IntRange(min=1), help="Images timed (default 6,300 on a GPU, 64 on the CPU).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", "latency_runs", default=20, show_default=True, type=click.IntRange(min=1),
              help="Batch-1 forward passes for the latency (median).")
@click.option("--at", "at", multiple=True, metavar="ARCH@SIZE",
              help="Also count ARCH at SIZE px (default efficientnet_b3@300, the paper's figure).")
@click.option("--no-timing", is_flag=True, help="Parameters and MACs only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def models_cmd(archs, at, paper, no_timing, as_json, **kwargs):
    """Parameters (M), multiply-accumulates (G) and inference time: of each run folder or
    checkpoint given (its own model at its image size and classes; a teacher folder adds the
    ensemble), of the paper's Table 8 models (--paper, or no run given), and of any timm names
    (e.g. resnet18 densenet121 mobilenetv2_100)."""
    from .commands.models import format_table, models_table, parse_at, split_arguments
    runs, names = split_arguments(archs)
    paper = paper or not runs
    result = models_table(names, runs=runs, paper=paper, at_sizes=parse_at(at) if at else None,
                          timing=not no_timing, note=lambda line: click.echo(line, err=True),
                          **kwargs)
    click.echo(json.dumps(result) if as_json else format_table(result))


@main.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--timm", "timm_dir", type=click.Path(),
              help="Folder to write in timm's pretrained format (model.safetensors, config.json), "
                   "for timm.create_model('local-dir:DIR', pretrained=True).")
@click.option("--images", "batch_images", multiple=True, type=click.Path(),
              help="Real inputs for the check: a split folder, an image folder or files (default: random).")
@click.option("--image-size", type=click.IntRange(min=16), help="Default: the checkpoint's data.image_size.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=18))
@click.option("--no-check", is_flag=True,
              help="Do not compare onnxruntime (or timm's load of the folder) with PyTorch.")
@click.option("--force", is_flag=True, help="Replace an existing ONNX file or timm folder's files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def export_cmd(checkpoint, batch_images, no_check, as_json, **kwargs):
    """Export a run's model (a student, or any run's last.pt / best.pt) to ONNX (--onnx) and/or
    timm's pretrained folder format (--timm), each checked against PyTorch on a batch of inputs
    (max abs difference of the logits)."""
    from .commands.export import export, format_export
    images = None if not batch_images else (batch_images[0] if len(batch_images) == 1 else list(batch_images))
    result = export(checkpoint, batch_images=images, check=not no_check, **kwargs)
    click.echo(json.dumps(result) if as_json else format_export(result))


@main.command("explain")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--images", multiple=True, required=True, type=click.Path(),
              help="An image file or a folder of images (repeatable); at most 64 images in all.")
@click.option("--label", "labels", multiple=True,
              help="True class of each image, in --images order (name or index): maps of the true "
                   "class; otherwise of each model's predicted class.")
@click.option("--out", default="gradcam.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--image-size", type=click.IntRange(min=16), help="Default: the first checkpoint's.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def explain_cmd(checkpoints, images, labels, out, image_size, device, as_json):
    """Grad-CAM grid (the paper's Figure 10): rows = images, columns = the image and each
    checkpoint's class-activation map (e.g. the student, then each teacher)."""
    from .commands import figures
    result = figures.explain(list(checkpoints), list(images), out, image_size=image_size,
                             device=device, labels=list(labels) or None)
    click.echo(json.dumps(result) if as_json else f"grad-cam grid: {result['out']}")


@main.command("embed")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--split", "split_dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", default="tsne.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG; the coordinates go to the same name with .csv.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--perplexity", default=30.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def embed_cmd(checkpoint, split_dir, out, device, perplexity, seed, as_json):
    """t-SNE map (the paper's Figures 11-12) of a model's penultimate features on the test split,
    coloured by class."""
    from .commands import figures
    result = figures.embed(checkpoint, split_dir, out, device=device, perplexity=perplexity, seed=seed)
    click.echo(json.dumps(result) if as_json else f"t-SNE map: {result['png']}, coordinates: {result['csv']}")


@main.command("evaluate")
@click.option("--split", "split_dir", required=True, type=click.Path(),
              help="Split folder written by `dali-erkt split`.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="A student or teacher checkpoint (last.pt / best.pt of a run).")
@teacher_options
@click.option("--part", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Folder for <name>_metrics.json and the confusion matrix (CSV, PNG).")
@click.option("--force", is_flag=True, help="Replace an existing report of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_options
@run_options
@one_line_errors
def evaluate_cmd(split_dir, out_dir, as_json, **kwargs):
    """OA, per-class accuracy and the confusion matrix of a trained run or the teacher ensemble,
    with the settings the run was trained with (image size, classes, architecture)."""
    from .commands.evaluate import evaluate
    result = evaluate(split_dir, out_dir, note=lambda line: click.echo(line, err=True), **kwargs)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['name']} on {result['part']}: OA {result['oa'] * 100:.2f}% over "
               f"{result['images']} images at {result['image_size']} px")
    for cls, acc in result["per_class"].items():
        click.echo(f"  {cls:<24} {'-' if acc is None else f'{acc * 100:6.2f}%'}")
    click.echo(f"confusion matrix: {result['confusion_csv']}, {result['confusion_png']}")


@main.command("predict")
@click.argument("checkpoint", required=False, type=click.Path(path_type=str))
@click.argument("images", nargs=-1, type=click.Path(path_type=str))
@teacher_options
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False),
              help="CSV to write (path, class1, prob1, ...; with --tile: row, col, x, y, ...).")
@click.option("--topk", default=3, show_default=True, type=click.IntRange(min=1),
              help="Classes written per image, most probable first.")
@click.option("--tile", type=click.IntRange(min=1),
              help="Cut one large image into SIZE x SIZE tiles (fully inside) and map their classes "
                   "(a PNG beside the CSV).")
@click.option("--stride", type=click.IntRange(min=1), help="With --tile: step between tiles (default SIZE).")
@click.option("--force", is_flag=True, help="Replace an existing CSV (and class map).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch (default: the run's).")
@click.option("--device", help="auto, cpu, cuda or cuda:N")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), help="run.precision")
@config_options
@one_line_errors
def predict_cmd(checkpoint, images, **kwargs):
    """Classify new images with a run's CHECKPOINT (last.pt, best.pt or its run folder) or, with
    --teachers / --teacher and no CHECKPOINT, the teacher ensemble. IMAGES: files, folders
    (recursive; sub-folders named like the classes give OA) or split parts (SPLIT:test)."""
    from .commands.predict import predict
    if checkpoint is not None and (kwargs["teacher_dir"] or kwargs["teachers"]):
        images = (checkpoint,) + images  # the ensemble takes no CHECKPOINT: all are images
        checkpoint = None
    result = predict(list(images), checkpoint=checkpoint,
                     note=lambda line: click.echo(line, err=True), **kwargs)
    click.echo(json.dumps(result))


@main.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(),
              help="Each demo run goes into a new time-stamped folder below this one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (student_oa, ensemble_oa, chance, ...) instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@one_line_errors
def demo_cmd(out_dir, device, as_json, no_progress):
    """Generate scenes, train three teachers, distil the student and report, end to end."""
    from .commands.demo import format_report, run_demo
    report = run_demo(out_dir, device, progress=not no_progress)
    click.echo(json.dumps(report) if as_json else format_report(report))


@main.command("preview")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--samples", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Samples of the training order the gate rates are measured over.")
@config_options
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Plan seed (default: the config's run.seed).")
@click.option("--out", default="preview.png", show_default=True, type=click.Path(path_type=str),
              help="PNG file of the grid.")
@click.option("--rows", default=6, show_default=True, type=click.IntRange(min=1, max=30),
              help="Images shown, one per row, from different classes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the DALI pipeline of the grid runs (auto: cuda if present).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@one_line_errors
def preview_cmd(data, as_json, **kwargs):
    """Show what the nine VSM units do to the images of DATA.

    The gate rates (configured p against the share that fired) come from the augmentation plan
    of the first SAMPLES samples of the training order: the plan is exactly what the DALI pipeline
    executes, so no image is decoded for them. CutMix flips one coin per batch, so its rate and n
    count batches. The grid (--out) shows ROWS images, each resized to the training size and then
    as the real DALI training pipeline augments it in epochs 0-5, labelled with the units that
    fired; a yellow dashed box marks the CutMix paste, a cyan box the erased area.
    """
    from .commands.preview import format_rates, preview
    report = preview(data, **kwargs)
    rates = report.pop("_rates")
    for bad in report["unreadable"]:
        click.echo(f"left out of the grid: {bad['path']}: {bad['reason']}", err=True)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(format_rates(rates))
    click.echo(f"{rates['samples']} samples in {rates['batches']} batches of {rates['batch_size']} "
               f"(seed {report['seed']}, preset {report['preset']})")
    click.echo(f"grid: {report['grid']}")


if __name__ == "__main__":
    main()
