"""A run folder and every file in it, owned by one object (as timm's CheckpointSaver owns its run).

    config.yaml    the fully resolved configuration (`--config` it to rerun)
    log.jsonl      one line per epoch, rewritten whole from the checkpointed history
    log.csv        the same, one row per epoch (what timm's summary.csv users expect)
    last.pt        everything needed to continue (a `RunState`: model, optimizer, scaler, RNG,
                   history, best)
    best.pt        the same at the best test OA so far
    summary.json   last-epoch OA and best OA, each with its epoch

Every file is written atomically (a temporary file, fsync, rename): a kill at any moment leaves
the old complete file or the new complete one. Checkpoints are written best.pt first, then
last.pt, then the log: a kill between them leaves last.pt one epoch behind, and the resumed run
redoes that epoch exactly (and writes best.pt again), so no state is ever lost. Temporary files a
kill left behind are removed when the folder is opened. Only the main process (rank 0) writes,
and one process at a time: it holds an OS lock on `run.lock` (with its pid inside) from opening
the folder (or creating it) to the end of the run; a second writer is refused in one line naming
the holder. The lock goes with the process: a killed run's `run.lock` is taken over by the next.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .checkpoint import save_checkpoint
from .config import Config, save_config
from .errors import ConfigError, WriteError
from .io import atomic_write_text, remove_stale_temporaries
from .run_state import RunState, read_run


class RunDir:
    def __init__(self, path, main: bool = True):
        self.path = Path(path)
        self.main = main
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.config, self.log, self.summary = (self.path / "config.yaml", self.path / "log.jsonl",
                                               self.path / "summary.json")
        self._lock = None  # the open lock file while this process writes the folder

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
        try:
            lock = open(path, "a+")
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}; choose a writable --out") \
                from None
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
        if resume and self.last.exists():
            return self.load_last()
        if self.last.exists():
            raise ConfigError(f"{self.path} already holds a run ({self.last.name}): pass --resume to "
                              "continue it or choose another --out")
        results = [f.name for f in (self.log, self.summary) if f.exists()]
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
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}; free some space, "
                                 "or choose a writable --out") from None
            self._hold_lock()
            save_config(cfg, self.config)

    def save(self, state: RunState, is_best: bool) -> None:
        """best.pt (on a new best), then last.pt (the same state), then the log."""
        if not self.main:
            return
        record = state.to_checkpoint()
        if is_best:
            save_checkpoint(self.best, record)
        save_checkpoint(self.last, record)
        self.write_log(state.history)

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

    def write_summary(self, summary: dict) -> None:
        if self.main:
            atomic_write_text(self.summary, json.dumps(summary, indent=2) + "\n")
