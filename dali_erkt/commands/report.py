"""`report`: one row per configuration over its seeds: mean +- std of the last-epoch and best OA,
the training loss beside them, teacher-student agreement, per-class accuracy, and curves.

A configuration is a run folder's path below `seed-<s>/` in a sweep (`students/erkt` over every
seed), or a run folder's own name elsewhere.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..io import atomic_write, atomic_write_text
from ..reports.curves import write_curves


def find_runs(paths) -> dict[str, list[Path]]:
    """Configuration name -> its finished run folders (those with a summary.json)."""
    groups: dict[str, list[Path]] = {}
    for top in map(Path, paths):
        if not top.exists():
            raise ConfigError(f"{top} does not exist: give sweep folders or run folders")
        for summary in sorted(top.rglob("summary.json")) if top.is_dir() else []:
            run = summary.parent
            parts = run.parts
            seeds = [i for i, p in enumerate(parts) if re.fullmatch(r"seed-\d+", p)]
            name = "/".join(parts[seeds[-1] + 1:]) if seeds else run.name
            groups.setdefault(name, []).append(run)
    if not groups:
        raise ConfigError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return groups


def _mean_std(values) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(name: str, runs: list[Path]) -> dict:
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    logs = [[json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()] for r in runs]
    row = {"configuration": name, "seeds": len(runs), "kind": summaries[0]["kind"],
           "arch": summaries[0]["arch"], "epochs": summaries[0]["epochs"]}
    for key, values in (("last_oa", [s["last_oa"] for s in summaries]),
                        ("best_oa", [s["best_oa"] for s in summaries]),
                        ("agreement", [s.get("agreement") for s in summaries]),
                        ("train_loss", [h[-1]["loss"] for h in logs]),
                        ("train_ce", [h[-1]["ce"] for h in logs])):
        row[key], row[key + "_std"] = _mean_std(values)
    row["best_epochs"] = [s["best_epoch"] for s in summaries]
    classes = summaries[0]["classes"]
    row["per_class"] = {c: _mean_std([(s.get("per_class") or {}).get(c) for s in summaries])
                        for c in classes}
    return row


def _pm(mean, std, scale=100.0, digits=2) -> str:
    return "-" if mean is None else f"{mean * scale:.{digits}f} +- {std * scale:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | seeds | last-epoch OA % | best OA % (epochs) | agreement % | train loss | train CE |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['configuration']} | {r['seeds']} | {_pm(r['last_oa'], r['last_oa_std'])} | "
                     f"{_pm(r['best_oa'], r['best_oa_std'])} ({', '.join(map(str, r['best_epochs']))}) | "
                     f"{_pm(r['agreement'], r['agreement_std'], digits=1)} | "
                     f"{_pm(r['train_loss'], r['train_loss_std'], 1, 3)} | {_pm(r['train_ce'], r['train_ce_std'], 1, 3)} |")
    return "\n".join(lines)


def report(paths, out=None) -> dict:
    """Write report.md, report.csv, per_class.csv and one curves PNG per configuration."""
    groups = find_runs(paths)
    out = Path(out) if out else Path(paths[0]) / "report"
    rows = [summarise(name, runs) for name, runs in sorted(groups.items())]
    text = markdown(rows)
    atomic_write_text(out / "report.md", text + "\n\nOA: the test split's overall accuracy, mean +- "
                      "sample std over seeds; the last epoch's and the best epoch's (chosen on the "
                      "test split, so optimistic). Train loss and CE: the last epoch's means.\n")
    columns = ["configuration", "seeds", "kind", "arch", "epochs", "last_oa", "last_oa_std", "best_oa",
               "best_oa_std", "agreement", "agreement_std", "train_loss", "train_loss_std", "train_ce",
               "train_ce_std"]
    atomic_write(out / "report.csv", lambda tmp: _csv(tmp, columns, rows))
    per_class = [{"configuration": r["configuration"], "class": c, "mean": m, "std": s}
                 for r in rows for c, (m, s) in r["per_class"].items()]
    atomic_write(out / "per_class.csv", lambda tmp: _csv(tmp, ["configuration", "class", "mean", "std"], per_class))
    for name, runs in groups.items():
        histories = {r.parent.parent.name if re.fullmatch(r"seed-\d+", r.parent.parent.name) else r.name:
                     [json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()] for r in runs}
        write_curves(histories, out / f"curves-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}.png", name)
    return {"rows": rows, "markdown": text, "out": str(out)}


def _csv(tmp: str, columns, rows) -> None:
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

