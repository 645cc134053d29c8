"""`report`: one row per configuration over its seeds: mean +- std of the last-epoch and best OA,
the training loss beside them, teacher-student agreement, per-class accuracy, and curves; in a
sweep also the teachers' ensemble, the reference the students are judged against.

A configuration is a run folder's path below `seed-<s>/` in a sweep (`students/erkt` over every
seed), or a run folder's own name elsewhere. Every file read is validated (`run_dir.read_summary`,
`run_dir.read_log`): another tool's or a damaged file is named in one line.

The ensemble (sweep folders only: `seed-<s>/teachers/<arch>/last.pt`): one row per set of teachers,
weights and `combine` the seed's students distil from (their config.yaml), its OA per seed from
the teachers' test logits: read from one of the seed's teacher caches (`cache-*`) that holds them
for exactly these checkpoints, this split's test images and the teachers' own image size and
normalisation, else computed by running the teachers over the test split (slower).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ..config import load_config
from ..errors import ConfigError, DataError
from ..io import atomic_write, atomic_write_text
from ..reports.curves import write_curves
from ..run_dir import read_log, read_summary

_SEED = re.compile(r"seed-\d+")


def find_runs(paths) -> dict[str, list[Path]]:
    """Configuration name -> its finished run folders (those with a summary.json)."""
    groups: dict[str, list[Path]] = {}
    for top in map(Path, paths):
        if not top.exists():
            raise ConfigError(f"{top} does not exist: give sweep folders or run folders")
        for summary in sorted(top.rglob("summary.json")) if top.is_dir() else []:
            run = summary.parent
            parts = run.parts
            seeds = [i for i, p in enumerate(parts) if _SEED.fullmatch(p)]
            name = "/".join(parts[seeds[-1] + 1:]) if seeds else run.name
            groups.setdefault(name, []).append(run)
    if not groups:
        raise ConfigError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return groups


def read_run(run: Path) -> tuple[dict, list[dict]]:
    """A finished run's summary and log, each validated, and checked against each other."""
    summary, log = read_summary(run / "summary.json"), read_log(run / "log.jsonl")
    if summary["epochs"] != len(log):
        raise DataError(f"{run / 'summary.json'} counts {summary['epochs']} epochs but "
                          f"{run / 'log.jsonl'} holds {len(log)}: the run folder is not one "
                          "finished run; rerun it, or leave it out")
    return summary, log


def _mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std; the std is None (unknown) over fewer than two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarise(name: str, runs: list[Path], loaded: dict | None = None) -> dict:
    pairs = [(loaded or {}).get(r) or read_run(r) for r in runs]
    summaries, logs = [s for s, _ in pairs], [h for _, h in pairs]
    row = {"configuration": name, "seeds": len(runs), "kind": summaries[0]["kind"],
           "arch": summaries[0]["arch"], "epochs": summaries[0]["epochs"]}
    for key, values in (("last_oa", [s["last_oa"] for s in summaries]),
                        ("best_oa", [s["best_oa"] for s in summaries]),
                        ("agreement", [s.get("agreement") for s in summaries]),
                        ("train_loss", [h[-1]["loss"] for h in logs]),
                        ("train_ce", [h[-1].get("ce") for h in logs])):
        row[key], row[key + "_std"] = _mean_std(values)
    row["best_epochs"] = [s["best_epoch"] for s in summaries]
    classes = summaries[0]["classes"]
    row["per_class"] = {c: _mean_std([(s.get("per_class") or {}).get(c) for s in summaries])
                        for c in classes}
    return row


# -- the teachers' ensemble ---------------------------------------------------------------------

def _seed_root(run: Path) -> Path | None:
    """The sweep's seed folder of a student run (`seed-<s>/students/<name>`), else None."""
    if run.parent.name == "students" and _SEED.fullmatch(run.parent.parent.name):
        return run.parent.parent
    return None


def _test_sha256(split) -> str:
    """The test split's hash as the teacher cache's key records it (`test_sha256`)."""
    return hashlib.sha256("".join(f"{p}\t{y}\n" for p, y in split.test).encode()).hexdigest()


def _cached_test_logits(seed_root: Path, teachers, paths, split, data) -> tuple[np.ndarray, str] | None:
    """The members' test logits (K, images, classes) from a cache of this seed whose key matches
    these teachers' checkpoints, the split's test images and the teachers' data settings."""
    from ..io import file_sha256
    from ..teacher_cache import TeacherCache, positions_per_epoch

    shas = None
    for folder in sorted(seed_root.glob("cache-*")):
        try:
            key = json.loads((folder / "key.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # no key or an unreadable one: its logits are never read
        if not isinstance(key, dict) or not (folder / "r0-test.f16").is_file():
            continue
        shas = shas or [file_sha256(p) for p in paths]
        if not (key.get("teachers") == list(teachers) and key.get("teacher_sha256") == shas
                and key.get("test_sha256") == _test_sha256(split) and key.get("world") == 1
                and key.get("image_size") == data.image_size and key.get("mean") == list(data.mean)
                and key.get("std") == list(data.std)
                and isinstance(key.get("batch_size"), int) and isinstance(key.get("drop_last"), bool)):
            continue
        positions = positions_per_epoch(len(split.train), key["batch_size"], key["drop_last"], 0, 1)
        cache = TeacherCache(folder, key, teachers=len(teachers), positions=positions,
                             classes=len(split.classes))
        logits = cache.read_test()
        if logits is not None and logits.shape[1] == len(split.test):
            return logits.astype(np.float32), f"cache {folder.name}"
    return None


def _evaluated_test_logits(teachers, paths, split, teacher_cfg, device: str) -> np.ndarray:
    """The members' test logits computed by running the teachers (the teachers' data settings)."""
    from ..data.loader import DaliLoader
    from ..models import build_ensemble, place
    from ..runtime import resolve_runtime
    from ..teachers import predict_members

    teacher_cfg.run.device = device
    ens = build_ensemble(teachers, paths, [1.0] * len(teachers), "probs", split.classes)
    rt = resolve_runtime(teacher_cfg.run, teacher_cfg.data.num_threads)
    loader = DaliLoader.from_split(split, "test", teacher_cfg, device=rt, train=False)
    return predict_members(place(ens, rt.device, rt.channels_last), loader, rt).float().cpu().numpy()


def member_test_logits(seed_root: Path, teachers, device: str = "auto"):
    """(members' test logits, test labels, where they came from) for one seed's teachers, or
    None where a teacher's checkpoint is missing."""
    from ..data.dataset import load_split

    paths = [seed_root / "teachers" / a / "last.pt" for a in teachers]
    if not teachers or not all(p.is_file() for p in paths):
        return None
    split = load_split(seed_root / "split")
    teacher_cfg = load_config(paths[0].parent / "config.yaml")
    found = _cached_test_logits(seed_root, teachers, paths, split, teacher_cfg.data)
    if found is None:
        found = _evaluated_test_logits(teachers, paths, split, teacher_cfg, device), "evaluated"
    return found[0], np.asarray(split.labels("test")), found[1], split.classes


def ensemble_oa(members: np.ndarray, labels: np.ndarray, weights, combine: str) -> tuple[float, list]:
    """The ensemble's OA and per-class accuracy from its members' logits (K, images, classes)."""
    import torch

    from ..models import combine_logits

    w = torch.tensor(weights, dtype=torch.float32)
    preds = combine_logits(torch.from_numpy(members), (w / w.sum()).view(-1, 1, 1), combine).argmax(1).numpy()
    per_class = [float((preds[labels == c] == c).mean()) if (labels == c).any() else None
                 for c in range(members.shape[2])]
    return float((preds == labels).mean()), per_class


def ensemble_rows(groups: dict, device: str = "auto") -> list[dict]:
    """One row per (teachers, weights, combine) the sweep's students distil from, over the seeds."""
    wanted: dict[tuple, set] = {}  # (teachers, weights, combine) -> seed folders
    for runs in groups.values():
        for run in runs:
            root = _seed_root(run)
            if root is None or not (run / "config.yaml").is_file():
                continue
            m = load_config(run / "config.yaml").model
            if m.teachers:
                wanted.setdefault((tuple(m.teachers), tuple(m.teacher_weights), m.combine), set()).add(root)
    members: dict[tuple, tuple | None] = {}
    rows = []
    for teachers, weights, combine in sorted(wanted):
        per_seed, sources, per_class = {}, {}, []
        for root in sorted(wanted[(teachers, weights, combine)]):
            if (root, teachers) not in members:
                members[(root, teachers)] = member_test_logits(root, teachers, device)
            got = members[(root, teachers)]
            if got is None:
                continue
            logits, labels, sources[root.name], classes = got
            per_seed[root.name], accs = ensemble_oa(logits, labels, weights, combine)
            per_class.append(dict(zip(classes, accs)))
        if not per_seed:
            continue
        name = ["ensemble"]
        if len({t for t, _, _ in wanted}) > 1:
            name.append("+".join(teachers))
        if len([k for k in wanted if k[0] == teachers]) > 1:
            name.append(f"w=[{','.join(f'{x:g}' for x in weights)}]" +
                        ("" if len({c for _, _, c in wanted}) == 1 else f" {combine}"))
        mean, std = _mean_std(per_seed.values())
        row = {"configuration": " ".join(name), "seeds": len(per_seed), "kind": "ensemble",
               "arch": "+".join(teachers), "epochs": None, "last_oa": mean, "last_oa_std": std,
               "best_epochs": [], "teachers": list(teachers), "teacher_weights": list(weights),
               "combine": combine, "oa_per_seed": per_seed, "source": sources,
               "per_class": {c: _mean_std([p.get(c) for p in per_class]) for c in per_class[0]}}
        for key in ("best_oa", "agreement", "train_loss", "train_ce"):
            row[key] = row[key + "_std"] = None
        rows.append(row)
    return rows


# -- writing --------------------------------------------------------------------------------------

def _pm(mean, std, scale=100.0, digits=2) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} +- " + ("n/a" if std is None else f"{std * scale:.{digits}f}")


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | seeds | last-epoch OA % | best OA % (epochs) | agreement % | train loss | train CE |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        epochs = f" ({', '.join(map(str, r['best_epochs']))})" if r["best_epochs"] else ""
        lines.append(f"| {r['configuration']} | {r['seeds']} | {_pm(r['last_oa'], r['last_oa_std'])} | "
                     f"{_pm(r['best_oa'], r['best_oa_std'])}{epochs} | "
                     f"{_pm(r['agreement'], r['agreement_std'], digits=1)} | "
                     f"{_pm(r['train_loss'], r['train_loss_std'], 1, 3)} | {_pm(r['train_ce'], r['train_ce_std'], 1, 3)} |")
    return "\n".join(lines)


NOTE = ("OA: the test split's overall accuracy, mean +- sample std over seeds (n/a: one seed); the "
        "last epoch's and the best epoch's (chosen on the test split, so optimistic). Train loss and "
        "CE: the last epoch's means. ensemble: the teachers' ensemble with the students' weights, "
        "from the teachers' test logits (`source` in report.json: a teacher cache, or evaluated).")


def report(paths, out=None, device: str = "auto", ensemble: bool = True) -> dict:
    """Write report.md, report.csv, report.json, per_class.csv and one curves PNG per
    configuration; every run's files are read (and validated) before anything is written."""
    groups = find_runs(paths)
    out = Path(out) if out else Path(paths[0]) / "report"
    loaded = {run: read_run(run) for runs in groups.values() for run in runs}
    rows = (ensemble_rows(groups, device) if ensemble else []) + \
        [summarise(name, runs, loaded) for name, runs in sorted(groups.items())]
    text = markdown(rows)
    atomic_write_text(out / "report.md", text + "\n\n" + NOTE + "\n")
    atomic_write_text(out / "report.json", json.dumps({"rows": rows}, indent=1) + "\n")
    columns = ["configuration", "seeds", "kind", "arch", "epochs", "last_oa", "last_oa_std", "best_oa",
               "best_oa_std", "agreement", "agreement_std", "train_loss", "train_loss_std", "train_ce",
               "train_ce_std"]
    atomic_write(out / "report.csv", lambda tmp: _csv(tmp, columns, rows))
    per_class = [{"configuration": r["configuration"], "class": c, "mean": m, "std": s}
                 for r in rows for c, (m, s) in r["per_class"].items()]
    atomic_write(out / "per_class.csv", lambda tmp: _csv(tmp, ["configuration", "class", "mean", "std"], per_class))
    for name, runs in groups.items():
        histories = {r.parent.parent.name if _SEED.fullmatch(r.parent.parent.name) else r.name:
                     loaded[r][1] for r in runs}
        write_curves(histories, out / f"curves-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}.png", name)
    return {"rows": rows, "markdown": text, "out": str(out)}


def _csv(tmp: str, columns, rows) -> None:
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
