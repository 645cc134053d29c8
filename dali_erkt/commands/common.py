"""What the commands share: resolving their configuration from the command line, and teachers."""
from __future__ import annotations

from pathlib import Path

from ..config import Config, resolve_config
from ..errors import ConfigError
from ..io import file_sha256

# Dedicated flags and the settings they set (the top layer of the resolver).
FLAG_KEYS = {"epochs": "optim.epochs", "batch_size": "data.batch_size",
             "image_size": "data.image_size", "lr": "optim.lr", "seed": "run.seed",
             "device": "run.device", "precision": "run.precision", "compile_": "run.compile"}


def config_from_options(default_preset: str, *, config_path=None, preset=None, overrides=(),
                        base: dict | None = None, extra_flags: dict | None = None, **flags) -> Config:
    """defaults < preset < config file (over `base`) < --set < dedicated flags."""
    values = {FLAG_KEYS[k]: v for k, v in flags.items() if k in FLAG_KEYS}
    if values.get("run.compile") is not None:
        values["run.compile"] = "on" if values["run.compile"] else "off"
    unknown = set(flags) - set(FLAG_KEYS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    top = {**values, **(extra_flags or {})}
    cfg = resolve_config(default_preset, config_path, preset, overrides, top, base=base)
    _record_weights(cfg, overrides, top)
    return cfg


def _record_weights(cfg: Config, overrides, top: dict) -> None:
    """model.weights with its SHA-256, however it was given: a path set by `--set model.weights`
    (without its own `model.weights_sha256`) is resolved, checked and hashed now; a path from a
    file without a recorded hash is hashed where the file exists (an unreadable one is refused
    when the run starts). A recorded hash is kept: the run checks the file against it."""
    m = cfg.model
    if not m.weights or "model.weights_sha256" in top:
        return
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    set_here = "model.weights" in keys and "model.weights_sha256" not in keys
    path = Path(m.weights).expanduser()
    if set_here:
        if not path.is_file():
            raise ConfigError(f"model.weights = {m.weights}: no such file; give the path of a "
                              "weights file (safetensors or a torch state dict)")
        m.weights, m.weights_sha256 = str(path.resolve()), file_sha256(path)
    elif not m.weights_sha256 and path.is_file():
        m.weights_sha256 = file_sha256(path)


def weights_flags(weights, pretrained: bool) -> dict:
    """The settings `--weights FILE` / `--pretrained` set: the file's path and SHA-256."""
    if weights and pretrained:
        raise ConfigError("give --weights or --pretrained, not both")
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights file {path} does not exist")
        return {"model.weights": str(path.resolve()), "model.weights_sha256": file_sha256(path),
                "model.pretrained": False}
    return {"model.pretrained": True, "model.weights": "", "model.weights_sha256": ""} if pretrained else {}


def resume_base(resume: bool, out_dir, config_path):
    """A resumed run starts from its own config.yaml (options given now still override it)."""
    saved = Path(out_dir) / "config.yaml"
    if resume and not config_path and saved.is_file():
        return str(saved)
    return config_path


def teacher_paths(archs, teacher_dir, teachers) -> list[str]:
    """One checkpoint per teacher arch: --teacher given in order, or DIR/<arch>/last.pt."""
    if teachers:
        if len(teachers) != len(archs):
            raise ConfigError(f"{len(teachers)} --teacher checkpoints for {len(archs)} teachers "
                              f"({', '.join(archs)}): give one per teacher")
        return list(teachers)
    if not teacher_dir:
        raise ConfigError("no teachers: pass --teachers DIR (train-teacher runs in DIR/<arch>/) "
                          "or one --teacher PATH per teacher")
    if not archs:
        raise ConfigError("model.teachers is empty: name the teachers, e.g. "
                          "--set model.teachers=[resnet50] --set model.teacher_weights=[1]")
    paths = [Path(teacher_dir) / arch / "last.pt" for arch in archs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"teacher checkpoint {missing[0]} does not exist: run "
                          f"`dali-erkt train-teacher --arch ARCH --out {teacher_dir}/ARCH` first")
    return [str(p) for p in paths]
