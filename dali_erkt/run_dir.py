"""A run folder and every file in it, owned by one object (as timm's CheckpointSaver owns its run).

    config.yaml    the fully resolved configuration (`--config` it to rerun)
    log.jsonl      one line per epoch, rewritten whole from the checkpointed history
    log.csv        the same, one row per epoch (what timm's summary.csv users expect)
    last.pt        everything needed to continue (a `RunState`: model, optimizer, scaler, RNG,
                   history, best)
    best.pt        the same at the best test OA so far
    summary.json   last-epoch OA and best OA, each with its epoch
    tensorboard/   with run.tensorboard: TensorBoard event files, one per epoch (every number of
                   that epoch's log.jsonl record, per-class accuracy, best OA, at step = epoch),
                   the resolved configuration as text (at the start epoch) and the final
                   confusion matrix as an image (at the last epoch)

Every file is written atomically (a temporary file, fsync, rename): a kill at any moment leaves
the old complete file or the new complete one. Checkpoints are written best.pt first, then
last.pt, then the log: a kill between them leaves last.pt one epoch behind, and the resumed run
redoes that epoch exactly (and writes best.pt again), so no state is ever lost. Temporary files a
kill left behind are removed when the folder is opened. Only the main process (rank 0) writes,
and one process at a time: it holds an OS lock on `run.lock` (with its pid inside) from opening
the folder (or creating it) to the end of the run; a second writer is refused in one line naming
the holder. The lock goes with the process: a killed run's `run.lock` is taken over by the next.

TensorBoard's event files are written through the same atomic writes: each is complete when it
appears, named by its epoch (`events.out.tfevents.epoch-000007`), so a resumed or redone epoch
replaces its file instead of adding a second point at that step, and epochs a kill left without
a file are written from the checkpointed history at the next save. Each file is made by
`torch.utils.tensorboard.SummaryWriter` in a temporary folder and copied into place.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .checkpoint import save_checkpoint
from .config import Config, save_config, to_dict
from .errors import ConfigError, DataError
from .io import atomic_write, atomic_write_text, make_folder, remove_stale_temporaries, writing
from .run_state import RunState, read_run

TENSORBOARD_NEEDS = ('run.tensorboard (--tensorboard) needs the tensorboard package: '
                     'pip install "dali-erkt[tensorboard]"')
CONFUSION_TAG = "confusion_matrix"
EVENTS = "events.out.tfevents.epoch-"  # + the epoch, 6 digits (+ .config, .confusion)
EPOCH_EVENTS = EVENTS + "[0-9]" * 6  # an epoch's scalars


def summary_writer_class():
    """torch's SummaryWriter, or one ConfigError line naming the extra to install."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_NEEDS) from None
    return SummaryWriter


def epoch_scalars(record: dict, classes=None) -> dict:
    """The TensorBoard scalars of one log.jsonl record: every number in it (its key is the tag;
    `epoch` is the step), and its per-class accuracies as `per_class/<class>` (a class without
    test images, None, is left out)."""
    values = {k: float(v) for k, v in record.items()
              if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    per_class = record.get("per_class")
    if isinstance(per_class, list):
        names = list(classes) if classes is not None and len(classes) == len(per_class) else \
            [str(k) for k in range(len(per_class))]
        values.update({f"per_class/{name}": float(v) for name, v in zip(names, per_class)
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return values


class RunDir:
    def __init__(self, path, main: bool = True, tensorboard: bool = False):
        self.path = Path(path)
        self.main = main
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.config, self.log, self.summary = (self.path / "config.yaml", self.path / "log.jsonl",
                                               self.path / "summary.json")
        self._lock = None  # the open lock file while this process writes the folder
        self.board = self.path / "tensorboard"
        # Checked on every rank, so that all of them stop at the start, before any collective.
        self._writer = summary_writer_class() if tensorboard else None
        self._start, self._epochs = 0, None  # the epoch the run (re)starts from; optim.epochs
        self._classes = None  # the run's class names (per-class scalars are named by them)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder's lock and remove its file (a killed process's lock is released by
        the OS; its file, left behind, is taken over by the next writer)."""
        if self._lock is not None:
            (self.path / "run.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def _hold_lock(self) -> None:
        """One writer per run folder: refuse, in one line, a folder another process writes."""
        if self._lock is not None:
            return
        path = self.path / "run.lock"
        with writing(path, "choose a writable --out"):
            lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not path.exists() or os.stat(path).st_ino != os.fstat(lock.fileno()).st_ino:
                raise OSError  # the holder removed it as we opened it: a new writer owns the folder
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ConfigError(f"{self.path} is being written by another dali-erkt process (pid "
                              f"{holder}): wait for it to end, or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def open(self, resume: bool, log) -> RunState | None:
        """The state to resume from, or None for a new run. A new run refuses a folder that
        already holds one (never overwrite results); --resume of a run killed before its first
        checkpoint starts it."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a folder: choose another --out")
        if self.main and self.path.is_dir():
            self._hold_lock()  # before anything is removed or read: another writer's files stay
            remove_stale_temporaries(self.path)
            remove_stale_temporaries(self.board)
        if resume and self.last.exists():
            state = self.load_last()
            self._start, self._classes = state.epoch, list(state.classes)
            return state
        if self.last.exists():
            raise ConfigError(f"{self.path} already holds a run ({self.last.name}): pass --resume to "
                              "continue it or choose another --out")
        results = [f.name for f in (self.log, self.summary) if f.exists()]
        if self.board.is_dir() and next(self.board.glob(EPOCH_EVENTS), None) is not None:
            results.append(f"{self.board.name}/ epoch events")  # each written after its last.pt
        if results:  # written only after last.pt: its checkpoint was removed, not never written
            raise ConfigError(f"{self.path} holds results ({', '.join(results)}) but no {self.last.name} "
                              "to continue from: it is not started again over them; choose another "
                              "--out, or remove the folder to train afresh")
        if resume:
            log(f"resume: {self.path} holds no checkpoint yet: starting the run")
        return None

    def load_last(self) -> RunState:
        """The state to resume from, checked to be a complete run checkpoint."""
        return read_run(self.last, resume=True)

    def write_config(self, cfg: Config) -> None:
        """Take the folder's lock, then write config.yaml (creating the folder)."""
        if self.main:
            make_folder(self.path)
            self._hold_lock()
            save_config(cfg, self.config)
            self._epochs = cfg.optim.epochs
            if self._writer is not None:
                text = yaml.safe_dump(to_dict(cfg), sort_keys=False)  # config.yaml's text
                # Indented: TensorBoard renders text as Markdown, and this keeps it verbatim.
                self._events(f"{self._start:06d}.config", lambda w: w.add_text(
                    "config", "".join(f"    {line}\n" for line in text.splitlines()), self._start))

    def save(self, state: RunState, is_best: bool) -> None:
        """best.pt (on a new best), then last.pt (the same state), then the log (and with
        run.tensorboard the epoch's events)."""
        if not self.main:
            return
        self._classes = list(state.classes)
        record = state.to_checkpoint()
        if is_best:
            save_checkpoint(self.best, record)
        save_checkpoint(self.last, record)
        self.write_log(state.history)

    def write_confusion(self, cm, classes, epoch: int) -> None:
        """With run.tensorboard, the confusion matrix of the last epoch (rows = true classes) as
        an image at step `epoch`; other epochs' are not kept (a figure per epoch costs time)."""
        if self.main and self._writer is not None and self._epochs is not None \
                and epoch >= self._epochs:
            self._confusion_events(cm, classes, epoch)

    def write_log(self, history: list) -> None:
        """log.jsonl and log.csv, rewritten whole from the checkpointed history (no duplicates
        after a resume)."""
        if not self.main:
            return
        atomic_write_text(self.log, "".join(json.dumps(r) + "\n" for r in history))
        columns = list(dict.fromkeys(k for r in history for k in r if not isinstance(r[k], list)))
        rows = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r.get(c)) for c in columns)
                                      for r in history]
        atomic_write_text(self.path / "log.csv", "\n".join(rows) + "\n")
        if self._writer is not None:
            self._epoch_events(history)

    # -- TensorBoard ------------------------------------------------------------------------------

    def _events(self, name: str, fill) -> None:
        """One complete event file `tensorboard/events.out.tfevents.epoch-<name>`: `fill(writer)`
        adds its summaries to a SummaryWriter in a temporary folder; the file it writes is
        copied into place atomically."""
        def write(tmp: str) -> None:
            with tempfile.TemporaryDirectory(prefix="dali-erkt-tensorboard-") as folder:
                writer = self._writer(log_dir=folder)
                try:
                    fill(writer)
                finally:
                    writer.close()
                (made,) = [p for p in Path(folder).iterdir() if "tfevents" in p.name]
                shutil.copyfile(made, tmp)
        atomic_write(self.board / f"{EVENTS}{name}", write)

    def _epoch_events(self, history: list) -> None:
        """The last record's event file, and any earlier record's that is missing (a run killed
        before writing it, or one that turns run.tensorboard on at --resume)."""
        best = None
        for n, record in enumerate(history):
            if isinstance(record.get("oa"), (int, float)) and (best is None or record["oa"] > best):
                best = record["oa"]  # as the engine keeps it: a strictly higher OA is a new best
            epoch = record["epoch"]
            name = f"{epoch:06d}"
            if n + 1 < len(history) and (self.board / f"{EVENTS}{name}").exists():
                continue
            values = epoch_scalars(record, self._classes)
            if best is not None:
                values["best_oa"] = best

            def fill(writer, values=values, epoch=epoch):
                for tag, value in values.items():
                    writer.add_scalar(tag, value, epoch)
            self._events(name, fill)

    def _confusion_events(self, cm, classes, epoch: int) -> None:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        from .metrics import overall_accuracy
        from .reports.confusion import confusion_figure
        cm = np.asarray(cm)
        oa = overall_accuracy(cm)
        score = "n/a" if np.isnan(oa) else f"{oa:.2%}"
        fig = confusion_figure(cm, list(classes), f"epoch {epoch} - OA {score} ({int(cm.sum())} samples)")
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        image = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8
        self._events(f"{epoch:06d}.confusion",
                     lambda w: w.add_image(CONFUSION_TAG, image, epoch, dataformats="HWC"))

    def write_summary(self, summary: dict) -> None:
        if self.main:
            atomic_write_text(self.summary, json.dumps(summary, indent=2) + "\n")


# -- reading a finished run's results back (validated: another tool's or a damaged file is named
# in one line) -----------------------------------------------------------------------------------

def _not_ours(path, why: str):
    return DataError(f"{path} is not a dali-erkt run's file ({why}): it is damaged or another "
                     "tool's; rerun that run, or leave its folder out")


def _number(value, lo=None, hi=None) -> bool:
    """A JSON number (not a bool) inside [lo, hi]; NaN fails."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi) and value == value


def read_summary(path) -> dict:
    """A run folder's summary.json, checked to hold what `RunDir.write_summary` writes."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _not_ours(path, "it does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _not_ours(path, f"not readable JSON: {(str(exc).splitlines() or [''])[0][:60]}") from None
    if not isinstance(data, dict):
        raise _not_ours(path, f"it holds a {type(data).__name__}, not an object")
    checks = (
        ("kind", lambda v: v in ("teacher", "student"), "teacher or student"),
        ("arch", lambda v: isinstance(v, str) and v != "", "a model name"),
        ("classes", lambda v: isinstance(v, list) and v != [] and all(isinstance(c, str) for c in v),
         "a list of class names"),
        ("epochs", lambda v: _number(v, 1) and isinstance(v, int), "a whole number >= 1"),
        ("last_oa", lambda v: _number(v, 0, 1), "an accuracy in [0, 1]"),
        ("best_oa", lambda v: v is None or _number(v, 0, 1), "an accuracy in [0, 1] or null"),
        ("best_epoch", lambda v: isinstance(v, int) and not isinstance(v, bool), "an epoch"),
        ("agreement", lambda v: v is None or _number(v, 0, 1), "a share in [0, 1] or null"),
        ("per_class", lambda v: v is None or (isinstance(v, dict) and all(
            x is None or _number(x, 0, 1) for x in v.values())), "accuracies per class or null"),
    )
    for key, ok, what in checks:
        if key not in data and key in ("agreement", "per_class"):
            continue
        if key not in data:
            raise _not_ours(path, f"no '{key}'")
        if not ok(data[key]):
            raise _not_ours(path, f"'{key}' is {json.dumps(data[key])[:40]}, not {what}")
    return data


def read_log(path) -> list[dict]:
    """A run folder's log.jsonl (one record per epoch, as `RunDir.write_log` writes), checked."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise _not_ours(path, "it does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _not_ours(path, f"not readable text: {(str(exc).splitlines() or [''])[0][:60]}") from None
    if not lines:
        raise _not_ours(path, "it is empty: no epoch is logged")
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise _not_ours(path, f"line {n} is not JSON") from None
        if not isinstance(record, dict):
            raise _not_ours(path, f"line {n} is not an object")
        if record.get("epoch") != n or isinstance(record.get("epoch"), bool):
            raise _not_ours(path, f"line {n} has epoch {json.dumps(record.get('epoch'))[:20]}, not {n}")
        for key in ("loss", "lr"):
            if not _number(record.get(key)) or abs(record[key]) == float("inf"):
                raise _not_ours(path, f"line {n} has no finite '{key}'")
        if "oa" in record and not _number(record["oa"], 0, 1):
            raise _not_ours(path, f"line {n} has 'oa' {json.dumps(record['oa'])[:20]}, not in [0, 1]")
        records.append(record)
    return records
