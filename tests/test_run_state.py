"""RunState: one record for a run's state; a round trip, the schema-1 migration, and a defect in
any field read back as one line naming the file."""
from __future__ import annotations

import pytest
import torch

from dali_erkt.checkpoint import save_checkpoint
from dali_erkt.config import default_config, to_dict
from dali_erkt.errors import CheckpointError
from dali_erkt.run_state import SCHEMA, RunState, read_run, stored_config


def record(**changes) -> dict:
    state = RunState(kind="student", arch="resnet10t", classes=["a", "b"],
                     model={"w": torch.ones(2)}, config=to_dict(default_config()), epoch=2,
                     optimizer={"state": {}, "param_groups": []}, scaler={},
                     history=[{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}],
                     best={"oa": 0.5, "epoch": 2}, rng={"torch": torch.zeros(3, dtype=torch.uint8)})
    return {**state.to_checkpoint(), **changes}


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "last.pt", record())
    state = read_run(tmp_path / "last.pt", resume=True)
    assert (state.epoch, state.best, state.classes) == (2, {"oa": 0.5, "epoch": 2}, ["a", "b"])
    assert state.to_checkpoint()["schema"] == SCHEMA == 2
    assert stored_config(tmp_path / "last.pt") == default_config()


def test_schema_1_migrates(tmp_path):
    """The previous layout: no schema field, a 0-based epoch, a config without later settings."""
    old = record(epoch=1)
    del old["schema"]
    del old["config"]["loss"]["kind"], old["config"]["loss"]["dkd_beta"]
    save_checkpoint(tmp_path / "old.pt", old)
    state = read_run(tmp_path / "old.pt", resume=True)
    assert state.epoch == 2 == len(state.history)
    cfg = state.stored_config()
    assert cfg.loss.kind == "dist" and cfg.loss.dkd_beta == 8.0  # today's defaults filled in


@pytest.mark.parametrize("changes, message", [
    ({"epoch": "1"}, r"malformed 'epoch' \('1'; expected a whole number\)"),
    ({"epoch": 5}, r"malformed 'epoch' .*the number of epoch records \(2\)"),
    ({"history": None}, r"malformed 'history'"),
    ({"best": {"oa": "x", "epoch": 1}}, r"malformed 'best'"),
    ({"kind": "other"}, r"malformed 'kind'"),
    ({"classes": []}, r"records no class names"),
    ({"model": {"w": 3}}, r"'model' is not a state dict of tensors"),
    ({"schema": 9}, r"run-state schema 9; this version reads 1 and 2"),
    ({"rng": None}, r"malformed 'rng'"),
])
def test_a_defect_is_one_line_naming_the_file(tmp_path, changes, message):
    save_checkpoint(tmp_path / "last.pt", record(**changes))
    with pytest.raises(CheckpointError, match=message) as err:
        read_run(tmp_path / "last.pt", resume=True)
    assert str(tmp_path / "last.pt") in str(err.value) and "\n" not in str(err.value)


def test_resume_needs_the_whole_state(tmp_path):
    state = record()
    del state["optimizer"]
    save_checkpoint(tmp_path / "last.pt", state)
    assert read_run(tmp_path / "last.pt").arch == "resnet10t"  # enough to evaluate
    with pytest.raises(CheckpointError, match=r"no 'optimizer'\): cannot resume"):
        read_run(tmp_path / "last.pt", resume=True)


def test_stored_config_refused_in_one_line(tmp_path):
    bad = record()
    bad["config"]["optim"]["lr"] = -1.0
    save_checkpoint(tmp_path / "last.pt", bad)
    with pytest.raises(CheckpointError, match=r"holds a configuration this version refuses "
                                              r"\(optim.lr = -1.0 must be a positive number\)"):
        stored_config(tmp_path / "last.pt")
