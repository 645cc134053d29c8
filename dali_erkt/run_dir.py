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
kill left behind are removed when the folder is opened. Only the main process (rank 0) writes.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import save_checkpoint
from .config import Config, save_config
from .errors import ConfigError
from .io import atomic_write_text, remove_stale_temporaries
from .run_state import RunState, read_run


class RunDir:
    def __init__(self, path, main: bool = True):
        self.path = Path(path)
        self.main = main
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.config, self.log, self.summary = (self.path / "config.yaml", self.path / "log.jsonl",
                                               self.path / "summary.json")

    def open(self, resume: bool, log) -> RunState | None:
        """The state to resume from, or None for a new run. A new run refuses a folder that
        already holds one (never overwrite results); --resume of a run killed before its first
        checkpoint starts it."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a folder: choose another --out")
        if self.main:
            remove_stale_temporaries(self.path)
        if resume and self.last.exists():
            return self.load_last()
        if self.last.exists():
            raise ConfigError(f"{self.path} already holds a run ({self.last.name}): pass --resume to "
                              "continue it or choose another --out")
        if resume:
            log(f"resume: {self.path} holds no checkpoint yet: starting the run")
        return None

    def load_last(self) -> RunState:
        """The state to resume from, checked to be a complete run checkpoint."""
        return read_run(self.last, resume=True)

    def write_config(self, cfg: Config) -> None:
        if self.main:
            save_config(cfg, self.config)  # creates the folder

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
