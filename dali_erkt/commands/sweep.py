"""`sweep`: the paper's study for several seeds, as ordinary run folders in one sweep folder.

    SWEEP/seed-<s>/split                      dali-erkt split (the seed draws the split too)
    SWEEP/seed-<s>/teachers/<arch>            dali-erkt train-teacher, one per teacher
    SWEEP/seed-<s>/students/<name>            dali-erkt distill, one per configuration
    SWEEP/seed-<s>/cache-<views>              the teacher logit cache the students replay: one per
                                              set of views and teachers (`teacher_cache.config_key`)
    SWEEP/seed-<s>/ensemble.json              Table 6: the ensemble's OA per weight (no training)

Every step is a command and its settings (`Step`), run in this process through the command's
library function; `--print-commands` prints each as the `dali-erkt` line that runs the same. A
finished step (its done file) is skipped and a started one resumed, so a killed sweep goes on
where it stopped. Each role gets its own settings and start: teachers the shared settings less the
student-only ones, plus their own (`--teacher-epochs`, `--teacher-lr`, `--teacher-preset`,
`--teacher-set`); each model its own weights file (`--weights ARCH=FILE`, `--weights-dir`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from .common import FLAG_KEYS
from . import data as data_commands, train

B3_WEIGHTS = (0.1, 0.3, 0.5, 0.7, 0.9)
TABLES = {  # the named tables: what each one varies
    "6": "EfficientNet-B3's weight (the first teacher's)",
    "7": "the loss ratio R",
    "9": "the ablation: Base, DIST, ERKT",
    "kd": "the KD method on one teacher cache: DIST, KD, DKD",
}
# The keyword arguments of a training command that resolve its configuration.
_CONFIG_ARGS = {"config_path", "preset", "overrides", *FLAG_KEYS}


@dataclass
class Step:
    kind: str  # split | teacher | student
    command: str  # the dali-erkt command: split | train-teacher | distill
    folder: Path  # done when it holds `done`
    done: str
    # The keyword arguments of the command's library function (`commands.data.split`,
    # `commands.train.train_teacher`, `commands.train.distill`), by the command line's names.
    args: dict = field(default_factory=dict)


def b3_weights(w: float, n_teachers: int) -> tuple[float, ...]:
    """Table 6's teacher weights: `w` for the first teacher (EfficientNet-B3 in the paper), the
    rest shared equally by the others, rounded to 4 digits (the same weights train the students
    and combine the ensemble in ensemble.json)."""
    if n_teachers < 2:
        raise ConfigError(f"--table 6 varies the first teacher's weight against the others: it "
                          f"needs at least two teachers (model.teachers has {n_teachers})")
    return (w,) + (round((1 - w) / (n_teachers - 1), 4),) * (n_teachers - 1)


def table_grid(table: str, teachers) -> list[tuple[str, dict]]:
    """(name, distill settings) of a named table's students."""
    if table == "6":
        return [(f"b3-{w}", {"overrides": (
            f"model.teacher_weights=[{','.join(str(x) for x in b3_weights(w, len(teachers)))}]",)})
            for w in B3_WEIGHTS]
    if table == "7":
        return [(f"ratio-{r}", {"overrides": (f"loss.ratio={r}",)}) for r in (0.0, 0.5, 1.0, 1.5, 2.0)]
    if table == "9":
        return [("base", {"no_teacher": True, "preset": "base"}), ("dist", {"preset": "base"}),
                ("erkt", {"preset": "erkt"})]
    if table == "kd":  # the KD and DKD papers' temperature 4; DIST keeps its default (2)
        return [("dist", {"overrides": ("loss.kind=dist",)}),
                ("kd", {"overrides": ("loss.kind=kd", "loss.tau=4")}),
                ("dkd", {"overrides": ("loss.kind=dkd", "loss.tau=4")})]
    raise ConfigError(f"--table {table}: choose one of {', '.join(TABLES)}")


def grid(vary, table: str | None, teachers=()) -> list[tuple[str, dict]]:
    """(name, distill settings) for each student configuration: a named table's, or the product
    of the --vary axes (`preset=base,erkt` varies the preset, any other key a setting; a list
    value is bracketed: `model.teacher_weights=[0.2,0.8],[0.8,0.2]`)."""
    if table is not None:
        return table_grid(table, teachers)
    axes = []
    for item in vary:
        key, _, values = item.partition("=")
        if not key or not values:
            raise ConfigError(f"--vary {item!r} must look like KEY=V1,V2,...")
        axes.append([(key.strip(), v) for v in _values(values)])
    if not axes:
        return [("default", {})]
    out = []
    for combo in itertools.product(*axes):
        settings = {"overrides": tuple(f"{k}={v}" for k, v in combo if k != "preset")}
        settings.update({"preset": v for k, v in combo if k == "preset"})
        out.append((",".join(f"{k}={v}" for k, v in combo), settings))
    return out


def _values(text: str) -> list[str]:
    """A --vary axis's values: split at the commas outside brackets (`[0.2,0.8],[0.8,0.2]`)."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return values + [text[start:]]


# Settings only a distillation uses: never passed to a teacher's train-teacher step.
STUDENT_ONLY = ("model.arch", "model.teachers", "model.teacher_weights", "model.combine", "loss.")
# Set per role by --weights / --weights-dir / --pretrained, not by --set.
_START_KEYS = ("model.weights", "model.weights_sha256", "model.pretrained")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _student_only(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in STUDENT_ONLY)


def _check_overrides(flag: str, overrides) -> None:
    for item in overrides:
        if _key(item) in _START_KEYS:
            raise ConfigError(f"{flag} {item!r}: a sweep starts each role from --weights ARCH=FILE, "
                              "--weights-dir DIR or --pretrained, not from --set model.weights")
        if flag == "--teacher-set" and _student_only(_key(item)):
            raise ConfigError(f"--teacher-set {item!r}: {_key(item)} is a student's setting (a "
                              "teacher trains its own arch with CE); give it with --set")


def weights_mapping(items) -> dict[str, str]:
    """--weights ARCH=FILE items (ARCH a teacher's or the student's arch, or `student`) as a dict."""
    out = {}
    for item in items:
        arch, _, path = item.partition("=")
        arch, path = arch.strip(), path.strip()
        if not arch or not path:
            raise ConfigError(f"--weights {item!r} must look like ARCH=FILE (a teacher's or the "
                              "student's arch, or student=FILE for the student alone)")
        if arch in out:
            raise ConfigError(f"--weights names {arch} twice: give one file per arch")
        out[arch] = path
    return out


def start_point(role: str, arch: str, mapping: dict, weights_dir, pretrained: bool) -> dict:
    """Where a role's model starts, as its command's keyword arguments: a local file (`weights`:
    --weights student=FILE for the student, then --weights ARCH=FILE, then DIR/<arch>.safetensors,
    .pth or .pt in --weights-dir), else the hub (`pretrained`), else random initialisation. With
    --weights-dir and without --pretrained, an arch without a file there is refused."""
    path = (mapping.get("student") if role == "student" else None) or mapping.get(arch)
    if path is None and weights_dir is not None:
        found = [Path(weights_dir) / f"{arch}{s}" for s in WEIGHT_SUFFIXES
                 if (Path(weights_dir) / f"{arch}{s}").is_file()]
        if len(found) > 1:
            raise ConfigError(f"--weights-dir {weights_dir} holds {len(found)} files for {arch} "
                              f"({', '.join(p.name for p in found)}): keep one")
        if found:
            path = str(found[0])
        elif not pretrained:
            raise ConfigError(f"--weights-dir {weights_dir} has no {arch}.safetensors, .pth or .pt "
                              f"for the {role} {arch}: add it, or pass --pretrained for the hub's")
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"weights file {path} (the {role} {arch}) does not exist")
        return {"weights": path}
    return {"pretrained": True} if pretrained else {}


def plan(data, train_ratio: float, seeds, out, *, vary=(), table=None, options=None,
         teacher_options=None, weights=(), weights_dir=None) -> list[Step]:
    """Every step of the sweep, in order, each one's configuration resolved and validated.
    `options` (keyword arguments of the training commands: `overrides`, `epochs`, `device`,
    `progress`, `pretrained`, ...) go to every teacher and student, except the student-only
    settings (`STUDENT_ONLY`), which teachers never get; `teacher_options` (`epochs`, `lr`,
    `preset`, `overrides`) go to the teachers only, over `options`. `weights` (--weights
    ARCH=FILE items), `weights_dir` and `pretrained` choose each role's start (`start_point`)."""
    options = dict(options or {})
    if options.get("seed") is not None:
        raise ConfigError("sweep seeds its runs with --seeds (a seed draws the split and seeds "
                          "every run of it), not --seed")
    options.pop("seed", None)
    pretrained = bool(options.pop("pretrained", False))
    teacher_options = _drop_empty(dict(teacher_options or {}))
    common = tuple(options.pop("overrides", ()))
    teacher_set = tuple(teacher_options.pop("overrides", ()))
    _check_overrides("--set", common)
    _check_overrides("--teacher-set", teacher_set)
    for item in vary:
        _check_overrides("--vary", [item])
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise ConfigError(f"--weights-dir {weights_dir} is not a folder")
    mapping = weights_mapping(weights)
    teachers = _config({**options, "overrides": common}).model.teachers
    to_teachers = tuple(o for o in common if not _student_only(_key(o))) + teacher_set
    # A teacher's own setting wins over a shared dedicated flag of the same key (--lr, --epochs).
    own = {_key(o) for o in teacher_set}
    shared = {k: v for k, v in options.items() if FLAG_KEYS.get(k) not in own}
    students = grid(list(vary), table, teachers)
    steps, archs = [], set(teachers)
    for seed in seeds:
        root = Path(out) / f"seed-{seed}"
        split = root / "split"
        steps.append(Step("split", "split", split, "split.yaml", {
            "data": str(data), "train_ratio": train_ratio, "seed": seed, "out_dir": str(split)}))
        for arch in teachers:
            folder = root / "teachers" / arch
            args = _drop_empty({"split_dir": str(split), "arch": arch, "out_dir": str(folder),
                                "seed": seed, **shared, **teacher_options, "overrides": to_teachers,
                                **start_point("teacher", arch, mapping, weights_dir, pretrained)})
            _teacher_config(args)
            steps.append(Step("teacher", "train-teacher", folder, "summary.json", args))
        for name, extra in students:
            folder = root / "students" / name
            args = _drop_empty({"split_dir": str(split), "teacher_dir": str(root / "teachers"),
                                "out_dir": str(folder), "seed": seed, **options, **extra,
                                "overrides": common + tuple(extra.get("overrides", ()))})
            cfg = _config(args)
            archs.add(cfg.model.arch)
            args.update(start_point("student", cfg.model.arch, mapping, weights_dir, pretrained))
            if not args.get("no_teacher"):
                args["teacher_cache"] = str(root / f"cache-{cache_tag(cfg)}")
            steps.append(Step("student", "distill", folder, "summary.json", args))
    unused = sorted(set(mapping) - archs - {"student"})
    if unused:
        raise ConfigError(f"--weights {unused[0]}=...: {unused[0]} is no teacher's or student's arch "
                          f"in this sweep ({', '.join(sorted(archs))}); use one of those, or student=FILE")
    return steps


def cache_tag(cfg: Config) -> str:
    """The name of the cache a distillation with `cfg` reads and fills in its seed's folder: a
    hash of `teacher_cache.config_key` with the runtime resolved as the run will resolve it, so
    two students share a cache exactly when their views and teachers are the same (the split and
    the teachers' checkpoints are those of the seed)."""
    from ..runtime import choose_precision, launched_world, resolve_device
    from ..teacher_cache import config_key

    run = cfg.run
    try:
        device = resolve_device(run.device)
        device_type, precision = device.type, choose_precision(device, run.precision)
    except ConfigError:  # a device this machine lacks (printing for another): name what is asked
        device_type, precision = run.device.split(":")[0], run.precision
    key = config_key(cfg, precision, device_type, run.channels_last,
                     launched_world())
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def _config(args: dict) -> Config:
    """The configuration distill resolves from a student step's arguments (its weights file is
    checked by `start_point`, not hashed here)."""
    return train.student_config(no_teacher=bool(args.get("no_teacher")),
                          **{k: v for k, v in args.items() if k in _CONFIG_ARGS})


def _teacher_config(args: dict) -> Config:
    """The configuration train-teacher resolves from a teacher step's arguments."""
    return train.teacher_config(args["arch"], **{k: v for k, v in args.items() if k in _CONFIG_ARGS})


def _drop_empty(args: dict) -> dict:
    return {k: v for k, v in args.items() if v not in (None, ())}


def _function(command: str):
    """The library function a command line's command calls."""
    return {"split": data_commands.split, "train-teacher": train.train_teacher,
            "distill": train.distill}[command]


def run(steps: list[Step], line, log) -> dict:
    """Run each step not done yet in this process (resuming a started run); `line(command, args)`
    renders what runs for the log."""
    counts = {"done": 0, "ran": 0, "resumed": 0}
    for step in steps:
        if (step.folder / step.done).exists():
            counts["done"] += 1
            continue
        args = dict(step.args)
        if step.kind != "split" and (step.folder / "config.yaml").exists():
            args["resume"] = True
            counts["resumed"] += 1
        else:
            counts["ran"] += 1
        log(f"sweep: {line(step.command, args)}")
        result = _function(step.command)(**args)
        if step.kind == "split" and data_commands.skipped_line(result["skipped"]):
            log(data_commands.skipped_line(result["skipped"]))
    return counts


def ensemble_table(seed_root: Path, options=None) -> dict:
    """Table 6's ensemble OA per EfficientNet-B3 weight: the teachers' test logits read once (from
    the seed's teacher cache where it holds them, else computed: `report.member_test_logits`),
    then combined per weight (no training). Written to `ensemble.json`. `options` as `plan`'s."""
    from ..io import atomic_write_text
    from .report import ensemble_oa, member_test_logits

    options = {k: v for k, v in (options or {}).items() if k in _CONFIG_ARGS and k != "seed"}
    cfg = _config(options)
    teachers = cfg.model.teachers
    found = member_test_logits(seed_root, teachers, cfg.run.device)
    if found is None:
        raise ConfigError(f"{seed_root / 'teachers'} lacks a teacher's last.pt ({', '.join(teachers)}): "
                          "run the sweep's teacher steps first")
    members, labels = found[0], found[1]
    oa = {str(w): ensemble_oa(members, labels, b3_weights(w, len(teachers)), cfg.model.combine)[0]
          for w in B3_WEIGHTS}
    result = {"teachers": list(teachers), "ensemble_oa": oa}
    atomic_write_text(seed_root / "ensemble.json", json.dumps(result, indent=2) + "\n")
    return result
