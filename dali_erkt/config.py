"""Configuration: dataclasses holding the paper's defaults in one place.

Every run writes its fully resolved `Config` as YAML next to its results, and any YAML written
this way loads back to the same object. `apply_overrides` turns CLI strings such as
`data.batch_size=64` or `vsm.cutmix.p=0.5` into typed values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


# --------------------------------------------------------------------------------------------
# The VSM: nine gated functional units, in the order they run (paper, Table 1). Their draws,
# DALI operators and torchvision twins are declared in data/units.py, one record per unit.
# --------------------------------------------------------------------------------------------

@dataclass
class ColorJitter:
    p: float = 1.0
    # Factors are drawn uniformly from [1 - x, 1 + x] (torchvision's ColorJitter(x, x, x)).
    # The three adjustments run in one fixed order: brightness, contrast, saturation.
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5


@dataclass
class Rotation:
    p: float = 1.0
    degrees: tuple[float, float] = (-180.0, 180.0)  # nearest neighbour, fill 0, same size


@dataclass
class Flip:
    p: float = 0.9


@dataclass
class Grayscale:
    p: float = 0.1  # 3-channel gray output


@dataclass
class Autocontrast:
    p: float = 0.1  # per-channel min/max stretch; a flat channel is left as it is


@dataclass
class Erasing:
    p: float = 1.0
    scale: tuple[float, float] = (0.02, 0.33)  # erased area as a fraction of the image
    ratio: tuple[float, float] = (0.3, 3.3)  # aspect ratio, drawn log-uniformly
    attempts: int = 10  # torchvision's retry count; no fitting box in 10 tries -> no erase


@dataclass
class ResizedCrop:
    p: float = 0.1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # The crop is resized to size x size, then back to the training size. 0: 11/16 of the
    # training size (the paper's 176 at 256 px), see `crop_size`.
    size: int = 0
    attempts: int = 10


@dataclass
class CutMix:
    p: float = 1.0  # per batch
    alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)


@dataclass
class VSMConfig:
    color_jitter: ColorJitter = field(default_factory=ColorJitter)
    rotation: Rotation = field(default_factory=Rotation)
    hflip: Flip = field(default_factory=Flip)
    vflip: Flip = field(default_factory=Flip)
    grayscale: Grayscale = field(default_factory=Grayscale)
    autocontrast: Autocontrast = field(default_factory=Autocontrast)
    erasing: Erasing = field(default_factory=Erasing)
    resized_crop: ResizedCrop = field(default_factory=ResizedCrop)
    cutmix: CutMix = field(default_factory=CutMix)


# The nine units in pipeline order; names are the VSMConfig field names.
UNITS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(VSMConfig))


def vsm_preset(name: str) -> VSMConfig:
    """`erkt`: the paper's Table 1. `base`: the paper's ablation baseline (section 4.5)."""
    if name == "erkt":
        return VSMConfig()
    if name == "base":
        return VSMConfig(hflip=Flip(0.5), vflip=Flip(0.5), erasing=Erasing(p=0.0),
                         resized_crop=ResizedCrop(p=0.0), cutmix=CutMix(p=0.1))
    if name == "none":
        off = VSMConfig()
        for unit in UNITS:
            getattr(off, unit).p = 0.0
        return off
    raise ConfigError(f"unknown VSM preset {name!r}: choose one of {', '.join(VSM_PRESETS)}")


VSM_PRESETS = ("erkt", "base", "none")


# --------------------------------------------------------------------------------------------
# Data, models, loss, optimisation, run.
# --------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    image_size: int = 256  # images are resized to this square first, for training and testing
    batch_size: int = 30
    # ImageNet statistics: the CNNs are ImageNet-pretrained in the paper.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    dtype: str = "float16"  # float16 | float32 (the loader's image dtype)
    num_threads: int = 4  # DALI CPU threads
    prefetch: int = 2  # DALI prefetch queue depth (lower it on small cards)
    drop_last: bool = True  # training batches keep one shape (static shapes for CUDA graphs)


@dataclass
class ModelConfig:
    arch: str = "efficientnet_b0"  # the model the run trains: the student (distill) or a teacher
    # The frozen ensemble a distillation learns from; empty in a train-teacher run.
    teachers: tuple[str, ...] = ("efficientnet_b3", "efficientnet_b0", "resnet50")
    teacher_weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    combine: str = "probs"  # probs: log of the weighted sum of softmaxes | logits: weighted sum
    # Where the trained model's weights start: timm's hub weights (needs network access), or a
    # local file (its SHA-256 is recorded, so a rerun from config.yaml starts from the same bytes).
    pretrained: bool = False
    weights: str = ""
    weights_sha256: str = ""


# The distillation losses `loss.kind` chooses from (functions in losses.py, one table there).
LOSS_KINDS = ("dist", "kd", "dkd", "none")


@dataclass
class LossConfig:
    # dist: ERKT's DIST (the default) | kd: Hinton et al. 2015 | dkd: Zhao et al. 2022 |
    # none: CE only, no teacher (the paper's Base, as `distill --no-teacher`)
    kind: str = "dist"
    ratio: float = 1.0  # R in L = R*CE + (2 - R)*KD, KD = 2*(L_inter + L_intra) for dist
    tau: float = 2.0  # the temperature of every kind (the KD and DKD papers use 4)
    tau_squared: bool = True  # multiply DIST terms by tau^2 as the official DIST code does
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    # DKD: T^2 * (alpha * TCKD + beta * NCKD), ramped in over the first `dkd_warmup` epochs
    # (factor min(epoch / warmup, 1), epochs counted from 1; 0: no ramp), the official defaults.
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 1e-6
    epochs: int = 600
    schedule: str = "cosine"  # cosine (to 0 over the run) | constant


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    channels_last: bool = True
    compile: str = "auto"  # auto (on where CUDA is) | on | off
    # reduce-overhead captures CUDA graphs: at batch 30 the step is bound by kernel launches.
    compile_mode: str = "reduce-overhead"
    log_every: int = 20  # host reads of the loss happen once per this many steps
    eval_every: int = 1  # evaluate on the test split every this many epochs (and after the last)
    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard (needs dali-erkt[tensorboard])


@dataclass
class Config:
    preset: str = "erkt"
    vsm: VSMConfig = field(default_factory=VSMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        validate(self)
        return self


def default_config(preset: str = "erkt") -> Config:
    return Config(preset=preset, vsm=vsm_preset(preset))


def crop_size(resized_crop: ResizedCrop, image_size: int) -> int:
    """The random-resized-crop's intermediate size: as set, or 11/16 of the training size."""
    return resized_crop.size or max(8, round(image_size * 11 / 16))


def teacher_weights_note(weights) -> str | None:
    """The line saying how `model.teacher_weights` are used where they do not sum to 1 (the
    ensemble divides them by their sum); None where they do."""
    total = sum(float(w) for w in weights)
    if not weights or not total > 0 or abs(total - 1.0) <= 1e-6:
        return None
    given = ", ".join(f"{float(w):g}" for w in weights)
    used = ", ".join(f"{float(w) / total:.4g}" for w in weights)
    return f"model.teacher_weights [{given}] sum to {total:g}; used as [{used}]"


# --------------------------------------------------------------------------------------------
# Validation: one clear line per mistake.
# --------------------------------------------------------------------------------------------

def _check_range(where: str, rng, lo: float | None = None, hi: float | None = None) -> None:
    a, b = rng
    if not a < b:  # also false for NaN
        raise ConfigError(f"{where} = [{a}, {b}] is empty or reversed: give [low, high] with low < high")
    if lo is not None and not a >= lo or hi is not None and not b <= hi:
        raise ConfigError(f"{where} = [{a}, {b}] must lie within [{lo}, {hi}]")


def _check(ok: bool, message: str) -> None:
    """`ok` is written so that NaN fails it (`not x > 0`, never `x <= 0`)."""
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Every setting's check, in one place; NaN fails every bound."""
    for unit in UNITS:
        p = getattr(cfg.vsm, unit).p
        _check(0.0 <= p <= 1.0, f"vsm.{unit}.p = {p} is not a probability: use a value in [0, 1]")
    cj = cfg.vsm.color_jitter
    for name in ("brightness", "contrast", "saturation"):
        v = getattr(cj, name)
        _check(0.0 <= v <= 1.0, f"vsm.color_jitter.{name} = {v} must be in [0, 1] (factors 1 +- {name})")
    _check_range("vsm.rotation.degrees", cfg.vsm.rotation.degrees, -360.0, 360.0)
    _check_range("vsm.erasing.scale", cfg.vsm.erasing.scale, 0.0, 1.0)
    _check_range("vsm.erasing.ratio", cfg.vsm.erasing.ratio, 1e-3, 1e3)
    _check_range("vsm.resized_crop.scale", cfg.vsm.resized_crop.scale, 0.0, 1.0)
    _check_range("vsm.resized_crop.ratio", cfg.vsm.resized_crop.ratio, 1e-3, 1e3)
    for unit in ("erasing", "resized_crop"):
        n = getattr(cfg.vsm, unit).attempts
        _check(1 <= n <= 16, f"vsm.{unit}.attempts = {n} must be between 1 and 16")
    size = cfg.vsm.resized_crop.size
    _check(size == 0 or 8 <= size <= MAX_SIZE, f"vsm.resized_crop.size = {size}: use 8 to {MAX_SIZE}, "
                                               "or 0 for 11/16 of the image size")
    _check(cfg.vsm.cutmix.alpha > 0, f"vsm.cutmix.alpha = {cfg.vsm.cutmix.alpha} must be > 0")
    d = cfg.data
    _check(d.image_size >= 16, f"data.image_size = {d.image_size} is too small: use 16 or more")
    _check(d.image_size <= MAX_SIZE, f"data.image_size = {d.image_size} is too large: one float "
           f"image of it is {3 * 4 * d.image_size ** 2 / 1e9:.1f} GB; use at most {MAX_SIZE}")
    _check(d.batch_size <= 100_000, f"data.batch_size = {d.batch_size} is too large: use at most 100000")
    _check(d.batch_size >= 1, f"data.batch_size = {d.batch_size} must be at least 1")
    _check(d.dtype in ("float16", "float32"), f"data.dtype = {d.dtype!r}: use float16 or float32")
    _check(all(0 < s < float("inf") for s in d.std), f"data.std = {d.std} must be positive")
    _check(all(-1e3 < m < 1e3 for m in d.mean), f"data.mean = {d.mean} must be finite")
    _check(d.num_threads >= 1, f"data.num_threads = {d.num_threads} must be at least 1")
    _check(d.prefetch >= 1, f"data.prefetch = {d.prefetch} must be at least 1")
    m = cfg.model
    _check(len(m.teachers) == len(m.teacher_weights),
           f"model.teachers has {len(m.teachers)} names but model.teacher_weights "
           f"{len(m.teacher_weights)} weights: give one weight per teacher")
    _check(not m.teachers or (all(w >= 0 for w in m.teacher_weights) and sum(m.teacher_weights) > 0),
           f"model.teacher_weights = {m.teacher_weights} must be >= 0 with a positive sum")
    _check(m.combine in ("probs", "logits"), f"model.combine = {m.combine!r}: use probs or logits")
    _check(not (m.pretrained and m.weights), "model.pretrained and model.weights both set: start "
                                             "from one of them")
    _check(0.0 <= cfg.loss.ratio <= 2.0, f"loss.ratio = {cfg.loss.ratio} must be in [0, 2]")
    _check(0 < cfg.loss.tau < float("inf"), f"loss.tau = {cfg.loss.tau} must be > 0")
    _check(cfg.loss.kind in LOSS_KINDS, f"loss.kind = {cfg.loss.kind!r}: use {', '.join(LOSS_KINDS)}")
    _check(cfg.loss.dkd_warmup >= 0, f"loss.dkd_warmup = {cfg.loss.dkd_warmup} must be >= 0")
    for name in ("inter_weight", "intra_weight", "dkd_alpha", "dkd_beta"):
        v = getattr(cfg.loss, name)
        _check(0 <= v < float("inf"), f"loss.{name} = {v} must be >= 0")
    o = cfg.optim
    _check(0 < o.lr < float("inf"), f"optim.lr = {o.lr} must be a positive number")
    _check(0 <= o.weight_decay < float("inf"), f"optim.weight_decay = {o.weight_decay} must be >= 0")
    _check(o.epochs >= 1, f"optim.epochs = {o.epochs} must be at least 1")
    _check(o.schedule in ("cosine", "constant"), f"optim.schedule = {o.schedule!r}: use cosine or constant")
    r = cfg.run
    _check(0 <= r.seed < 2**63, f"run.seed = {r.seed} must be in [0, 2**63) (what torch and numpy "
                                "take as a seed)")
    _check(r.precision in ("auto", "fp32", "fp16", "bf16"),
           f"run.precision = {r.precision!r}: use auto, fp32, fp16 or bf16")
    _check(r.compile in ("auto", "on", "off"), f"run.compile = {r.compile!r}: use auto, on or off")
    _check(r.compile_mode in COMPILE_MODES,
           f"run.compile_mode = {r.compile_mode!r}: use {', '.join(COMPILE_MODES)}")
    _check(r.eval_every >= 1, f"run.eval_every = {r.eval_every} must be at least 1")
    _check(r.log_every >= 1, f"run.log_every = {r.log_every} must be at least 1")


MAX_SIZE = 4096  # pixels a side: a float image of it is 0.2 GB, a batch of 30 6 GB

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# --------------------------------------------------------------------------------------------
# Dict / YAML round trip and dotted overrides.
# --------------------------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def _coerce(where: str, current: Any, value: Any) -> Any:
    """Convert `value` (from YAML or the CLI) to the type of the field's current value. Only a
    bool (or true/false, yes/no, on/off, 1/0 written as text) is a bool, and a bool is never a
    number: YAML's `lr: yes` is refused, not read as 1.0."""
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "on", "1"):
                    return True
                if value.lower() in ("false", "no", "off", "0"):
                    return False
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if isinstance(current, int):
            return int(value) if float(value) == int(float(value)) else _bad()
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            if isinstance(value, str):
                value = _load_yaml(value if value.strip().startswith("[") else f"[{value}]", where)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if current and len(value) != len(current) and where not in _VARIABLE_LENGTH:
                raise ConfigError(f"{where} needs {len(current)} values, got {len(value)}")
            proto = current[0] if current else value[0] if value else ""
            return tuple(_coerce(where, proto, v) for v in value)
        if isinstance(current, str) and not isinstance(value, (list, tuple, dict)):
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        pass
    raise ConfigError(f"{where} = {value!r} is not a valid {type(current).__name__}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""


def _unique_mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise yaml.constructor.ConstructorError(None, None, f"the key {twice!r} is given twice",
                                                node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_yaml(text: str, where: str):
    """Parse YAML text (safe, duplicate keys refused), or one line naming `where` and why."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())[:160]}") from None


def _bad():
    raise ValueError


_VARIABLE_LENGTH = {"model.teachers", "model.teacher_weights"}


def _update(obj: Any, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            hint = "a unit name: " + ", ".join(UNITS) if prefix == "vsm." else ", ".join(sorted(names))
            raise ConfigError(f"unknown setting {where!r}: expected {hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(where, current, value))


def from_dict(data: dict, preset: str | None = None) -> Config:
    """Build a config: the preset layer (`preset`, else the one `data` names, else erkt), then
    every value in `data` over it (the `preset` key included: it names the layer)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a configuration must be a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    cfg = default_config(preset or str(data.get("preset", "erkt")))
    _update(cfg, data, "")
    return cfg.validate()


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file, or one line saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text: pass a YAML file such as a run's "
                          "config.yaml") from None
    data = _load_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a {type(data).__name__}, not a mapping of "
                          "sections (vsm, data, model, loss, optim, run)")
    return data


def load_config(path: str | Path) -> Config:
    return from_dict(read_config_file(path))


def save_config(cfg: Config, path: str | Path) -> None:
    from .io import atomic_write_text
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _nested(key: str, value: Any) -> dict:
    parts = key.strip().split(".")
    if parts[0] == "preset":
        raise ConfigError("choose the preset with --preset, not an override")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], validate: bool = True) -> Config:
    """Apply `section.key=value` strings (`vsm.cutmix.p=0.5`, `data.batch_size=64`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        _update(cfg, _nested(key, value), "")
    return cfg.validate() if validate else cfg


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def resolve_config(default_preset: str = "erkt", config_path: str | Path | None = None,
                   preset: str | None = None, overrides=(), flags: dict | None = None,
                   base: dict | None = None) -> Config:
    """The one configuration resolver (every command and the benchmark use it):

        defaults < preset < config file < --set overrides < dedicated flags

    The preset is `preset` if given, else the one the file names, else `default_preset`; every
    value in the file then wins over it. `base` (a checkpoint's stored configuration) sits below
    the file. `flags` maps dotted keys to values (None: not given).
    """
    data = _merge(base or {}, read_config_file(config_path) if config_path else {})
    if preset is not None:
        data = {k: v for k, v in data.items() if k != "preset"}
    cfg = default_config(preset or str(data.get("preset") or default_preset))
    _update(cfg, data, "")
    apply_overrides(cfg, overrides, validate=False)  # validated once, with every layer applied
    for key, value in (flags or {}).items():
        if value is not None:
            _update(cfg, _nested(key, value), "")
    return cfg.validate()


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs between two to_dict()s."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
