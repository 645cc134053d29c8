"""A run's state, one record with one owner: what `last.pt` and `best.pt` hold, built, checked and
read back here only.

    RunState.to_checkpoint()      the plain dict a checkpoint file holds (tensors, numbers, strings)
    RunState.from_checkpoint(d)   that dict checked field by field (a defect is one line naming the
                                  file), older schemas migrated
    read_run(path)                a checkpoint file as a RunState
    RunState.stored_config()      the run's resolved configuration as a `Config`, validated

One epoch convention everywhere: epochs are counted from 1. `epoch` is the last completed epoch
(0: none), as `history[i]["epoch"]` and `best["epoch"]` are; the next epoch to run has 0-based
index `epoch`. Schema 1 (no "schema" field, before 2026-12) stored a 0-based `epoch`; it loads
and is migrated. It sits in layer 0 (beside `checkpoint`) so that `models.load_trained` reads
trained runs through it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import load_checkpoint
from .config import Config, from_dict
from .errors import CheckpointError, ConfigError

SCHEMA = 2
KINDS = ("teacher", "student")


@dataclass
class RunState:
    kind: str  # teacher (train-teacher) | student (distill)
    arch: str
    classes: list
    model: dict  # the model's state dict
    config: dict  # the run's resolved configuration (to_dict)
    epoch: int = 0  # the last completed epoch, counted from 1 (0: none yet)
    optimizer: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one record per epoch, "epoch" from 1
    best: dict = field(default_factory=lambda: {"oa": -1.0, "epoch": -1})  # epoch -1: none yet
    rng: dict = field(default_factory=dict)
    # The split trained on: {"folder": its folder, "sha256": `split_sha256`}; {} in runs written
    # before it was recorded (nothing to compare on resume).
    split: dict = field(default_factory=dict)
    path: str = ""  # where it was read from (for messages); not stored

    def to_checkpoint(self) -> dict:
        return {"schema": SCHEMA, "kind": self.kind, "arch": self.arch, "classes": list(self.classes),
                "epoch": self.epoch, "model": self.model, "optimizer": self.optimizer,
                "scaler": self.scaler, "history": self.history, "best": self.best, "rng": self.rng,
                "config": self.config, "split": self.split}

    @classmethod
    def from_checkpoint(cls, state, path, resume: bool = False) -> "RunState":
        """The record in a checkpoint's dict. `resume` also requires what continuing needs
        (optimizer, scaler, RNG, history)."""
        if not isinstance(state, dict) or not isinstance(state.get("arch"), str) \
                or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path} is not a dali-erkt run checkpoint (no 'arch' and 'model'): "
                                  "use last.pt or best.pt of a train-teacher or distill run")
        schema = state.get("schema", 1)
        if schema not in (1, SCHEMA):
            raise CheckpointError(f"{path} has run-state schema {schema!r}; this version reads 1 and "
                                  f"{SCHEMA}: use the dali-erkt version that wrote it")
        classes = state.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise CheckpointError(f"{path} records no class names: use last.pt or best.pt of a "
                                  "train-teacher or distill run")
        if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
            raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
        needed = ("kind", "epoch", "optimizer", "scaler", "history", "best", "rng", "config") \
            if resume else ()
        missing = [k for k in needed if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a dali-erkt run checkpoint (no {missing[0]!r}): "
                                  "cannot resume")
        kind = state.get("kind", "model")
        _expect(not resume or kind in KINDS, path, "kind", kind, "teacher or student")
        epoch = state.get("epoch", -1 if schema == 1 else 0)
        _expect(isinstance(epoch, int) and not isinstance(epoch, bool), path, "epoch", epoch,
                "a whole number")
        epoch += 1 if schema == 1 else 0  # schema 1 counted epochs from 0
        history = state.get("history", [])
        _expect(isinstance(history, list) and all(isinstance(r, dict) for r in history), path,
                "history", type(history).__name__, "a list of epoch records")
        _expect(0 <= epoch and (not resume or len(history) == epoch), path, "epoch", epoch,
                f"the number of epoch records ({len(history)})")
        best = state.get("best", {"oa": -1.0, "epoch": -1})
        _expect(isinstance(best, dict) and isinstance(best.get("oa"), (int, float))
                and isinstance(best.get("epoch"), int), path, "best", best, "{oa, epoch}")
        best = {"oa": float(best["oa"]), "epoch": best["epoch"]}
        config = state.get("config", {})
        _expect(isinstance(config, dict), path, "config", type(config).__name__, "a mapping")
        split = state.get("split", {})
        _expect(isinstance(split, dict) and all(isinstance(split.get(k, ""), str)
                                                for k in ("folder", "sha256")),
                path, "split", split, "{folder, sha256}")
        for name in ("optimizer", "scaler", "rng"):
            _expect(isinstance(state.get(name, {}), dict), path, name,
                    type(state.get(name)).__name__, "a mapping")
        return cls(kind=kind, arch=state["arch"], classes=list(classes), model=state["model"],
                   config=config, epoch=epoch, optimizer=state.get("optimizer", {}),
                   scaler=state.get("scaler", {}), history=history, best=best,
                   rng=state.get("rng", {}), split=split, path=str(path))

    def check_split(self, folder: str, sha256: str, allow_changes: bool, log) -> None:
        """Refuse, in one line naming both, resuming on a split whose lists differ from the one the
        run was trained on (`allow_changes`: go on, saying so). Runs that recorded none pass."""
        old = self.split.get("sha256")
        if not old or old == sha256:
            return
        was = f"{self.split.get('folder') or 'a split'} (SHA-256 {old[:12]}...)"
        now = f"{folder or 'this split'} ({sha256[:12]}...)"
        if allow_changes:
            log(f"resume: the split changed from {was} to {now}")
            return
        raise ConfigError(f"{self.path} was trained on split {was}, but --split {now} holds other "
                          f"lists: resume with --split {self.split.get('folder') or 'of the run'}, "
                          "or pass --allow-changes to go on with this split")

    def stored_config(self) -> Config:
        """The run's configuration, with today's defaults for settings added since it was written."""
        if not self.config:
            raise CheckpointError(f"{self.path} records no configuration: use last.pt or best.pt of "
                                  "a train-teacher or distill run")
        try:
            return from_dict(self.config)
        except ConfigError as exc:
            raise CheckpointError(f"{self.path} holds a configuration this version refuses ({exc})") \
                from None


def _expect(ok: bool, path, name: str, value, what: str) -> None:
    if not ok:
        text = repr(value)
        raise CheckpointError(f"{path} has a malformed {name!r} ({text[:40]}; expected {what}): "
                              "the file is damaged or was not written by dali-erkt")


def read_run(path, resume: bool = False) -> RunState:
    """A checkpoint file as a RunState (never runs code: `load_checkpoint`)."""
    return RunState.from_checkpoint(load_checkpoint(path), path, resume=resume)


def stored_config(path) -> Config:
    """The resolved configuration a run checkpoint was trained with."""
    return read_run(path).stored_config()
