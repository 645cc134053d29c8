"""`sweep`: the paper's study for several seeds, as ordinary run folders in one sweep folder.

    SWEEP/seed-<s>/split                      dali-erkt split (the seed draws the split too)
    SWEEP/seed-<s>/teachers/<arch>            dali-erkt train-teacher, one per teacher
    SWEEP/seed-<s>/students/<name>            dali-erkt distill, one per configuration
    SWEEP/seed-<s>/cache-<views>              the teacher logit cache the students replay
    SWEEP/seed-<s>/ensemble.json              Table 6: the ensemble's OA per weight (no training)

Every step is a command line (`--print-commands` prints them for a scheduler); a finished step
(its summary.json) is skipped and a started one resumed, so a killed sweep goes on where it
stopped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..config import resolve_config
from ..errors import ConfigError

B3_WEIGHTS = (0.1, 0.3, 0.5, 0.7, 0.9)
TABLES = {  # the paper's tables: (name, distill arguments)
    "6": [(f"b3-{w}", ["--set", f"model.teacher_weights=[{w},{round((1 - w) / 2, 4)},{round((1 - w) / 2, 4)}]"])
          for w in B3_WEIGHTS],
    "7": [(f"ratio-{r}", ["--set", f"loss.ratio={r}"]) for r in (0.0, 0.5, 1.0, 1.5, 2.0)],
    "9": [("base", ["--no-teacher", "--preset", "base"]), ("dist", ["--preset", "base"]),
          ("erkt", ["--preset", "erkt"])],
}
# Settings that change the views (and so the teacher cache's key), by prefix.
_VIEW_KEYS = ("vsm.", "data.", "run.seed", "preset", "--preset", "--image-size", "--batch-size")


@dataclass
class Step:
    kind: str  # split | teacher | student
    argv: list[str]  # dali-erkt's arguments
    folder: Path  # done when it holds `done`
    done: str

    def line(self) -> str:
        return shlex.join(["dali-erkt"] + self.argv)


def grid(vary: list[str], table: str | None) -> list[tuple[str, list[str]]]:
    """(name, distill arguments) for each student configuration."""
    if table is not None:
        if table not in TABLES:
            raise ConfigError(f"--table {table}: choose one of {', '.join(TABLES)}")
        return TABLES[table]
    axes = []
    for item in vary:
        key, _, values = item.partition("=")
        if not key or not values:
            raise ConfigError(f"--vary {item!r} must look like KEY=V1,V2,...")
        axes.append([(key, v) for v in values.split(",")])
    if not axes:
        return [("default", [])]
    return [(",".join(f"{k}={v}" for k, v in combo), [a for k, v in combo for a in ("--set", f"{k}={v}")])
            for combo in itertools.product(*axes)]


def plan(data, train_ratio: float, seeds, out, *, vary=(), table=None, options=()) -> list[Step]:
    """Every step of the sweep, in order. `options` are passed to every training command."""
    options = [str(o) for o in options]
    cfg = resolve_config("erkt", overrides=_sets(options))
    steps = []
    for seed in seeds:
        root = Path(out) / f"seed-{seed}"
        split = root / "split"
        steps.append(Step("split", ["split", str(data), "--train-ratio", str(train_ratio), "--seed",
                                    str(seed), "--out", str(split)], split, "split.yaml"))
        for arch in cfg.model.teachers:
            folder = root / "teachers" / arch
            steps.append(Step("teacher", ["train-teacher", "--split", str(split), "--arch", arch,
                                          "--out", str(folder), "--seed", str(seed), *options],
                              folder, "summary.json"))
        for name, extra in grid(list(vary), table):
            folder = root / "students" / name
            argv = ["distill", "--split", str(split), "--teachers", str(root / "teachers"), "--out",
                    str(folder), "--seed", str(seed), *options, *extra]
            if "--no-teacher" not in extra:
                pairs = [" ".join(extra[i:i + 2]) for i in range(0, len(extra) - 1, 2)]
                views = [pair.split(" ", 1)[1] if pair.startswith("--set ") else pair for pair in pairs]
                views = [v for v in views if v.startswith(_VIEW_KEYS)]
                tag = hashlib.sha256(" ".join(views).encode()).hexdigest()[:8] if views else "default"
                argv += ["--teacher-cache", str(root / f"cache-{tag}")]
            steps.append(Step("student", argv, folder, "summary.json"))
    return steps


def _sets(options: list[str]) -> list[str]:
    """The `--set` values among a command line's options."""
    return [options[i + 1] for i, o in enumerate(options) if o == "--set"]


def run(steps: list[Step], invoke, log) -> dict:
    """Run each step not done yet through `invoke(argv)` (resuming a started run)."""
    counts = {"done": 0, "ran": 0, "resumed": 0}
    for step in steps:
        if (step.folder / step.done).exists():
            counts["done"] += 1
            continue
        argv = list(step.argv)
        if step.kind != "split" and (step.folder / "config.yaml").exists():
            argv.append("--resume")
            counts["resumed"] += 1
        else:
            counts["ran"] += 1
        log(f"sweep: {shlex.join(['dali-erkt'] + argv)}")
        invoke(argv)
    return counts


def ensemble_table(seed_root: Path, options=(), device: str = "auto") -> dict:
    """Table 6's ensemble OA per EfficientNet-B3 weight: the teachers' test logits computed once,
    then combined per weight (no training). Written to `ensemble.json`."""
    import torch

    from ..checkpoint import load_checkpoint
    from ..data.dataset import load_split
    from ..data.loader import DaliLoader
    from ..io import atomic_write_text
    from ..models import build_ensemble, combine_logits, place
    from ..runtime import resolve_runtime
    from ..tasks import predict_members

    sets = _sets([str(o) for o in options])
    teachers = resolve_config("erkt", overrides=sets).model.teachers
    paths = [seed_root / "teachers" / a / "last.pt" for a in teachers]
    stored = load_checkpoint(paths[0])["config"]  # the teachers' image size and normalisation
    cfg = resolve_config("erkt", overrides=sets, base={"data": stored["data"]},
                         flags={"run.device": device})
    split = load_split(seed_root / "split")
    m = cfg.model
    ens = build_ensemble(m.teachers, paths, m.teacher_weights, m.combine, split.classes)
    rt = resolve_runtime(cfg.run)
    loader = DaliLoader.from_config(split.paths("test"), split.labels("test"), cfg, device=rt.device,
                                    train=False)
    members = predict_members(place(ens, rt.device, rt.channels_last), loader, rt).float()
    labels = torch.tensor(split.labels("test"), device=members.device)
    oa = {}
    for w in B3_WEIGHTS:
        weights = torch.tensor([w] + [(1 - w) / (len(teachers) - 1)] * (len(teachers) - 1),
                               device=members.device)
        logits = combine_logits(members, weights.view(-1, 1, 1), m.combine)
        oa[str(w)] = float((logits.argmax(1) == labels).float().mean())
    result = {"teachers": list(teachers), "ensemble_oa": oa}
    atomic_write_text(seed_root / "ensemble.json", json.dumps(result, indent=2) + "\n")
    return result
