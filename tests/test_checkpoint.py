"""Checkpoints: atomic saves, loads that never run code, strict weight loading with one-line errors."""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dali_erkt.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from dali_erkt.models import create_model


def _touch(path):
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this runs `_touch`: the marker file shows whether a loader executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


class SneakyDict(collections.OrderedDict):
    """A dict subclass that looks like a state dict but needs this module's code to unpickle."""


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return create_model("resnet18", 3)


# ---- save / load -----------------------------------------------------------------------------

def test_round_trip_with_optimizer_state(tmp_path, small):
    opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
    small(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"model": small.state_dict(), "optimizer": opt.state_dict(), "arch": "resnet18",
             "epoch": 7, "best_oa": 0.95, "history": [0.5, 0.7], "flags": {"ema": False, "note": None}}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert same_state(back["model"], state["model"])
    assert back["epoch"] == 7 and back["best_oa"] == 0.95 and back["history"] == [0.5, 0.7]
    assert back["flags"] == {"ema": False, "note": None}
    opt.load_state_dict(back["optimizer"])


def test_save_refuses_objects_that_need_code(tmp_path):
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "c.pt", {"args": argparse.Namespace(lr=1)})
    assert "Namespace" in one_line(err) and "args" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [lambda m: {"model": {}, "x": Payload(m)},
                                  lambda m: SneakyDict(w=torch.ones(1), x=Payload(m))])
def test_load_refuses_pickled_code_without_running_it(tmp_path, make):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(make(marker), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "only plain-tensor checkpoints" in one_line(err) and "needs code" in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_weights(create_model("resnet18", 3), path)
    assert not marker.exists()
    # The file really does run code when loaded unsafely: the check above is meaningful.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("corrupt", [lambda b: b[: len(b) // 2], lambda b: b[:100], lambda b: b"",
                                     lambda b: b"not a checkpoint at all"])
def test_corrupt_or_missing_files(tmp_path, corrupt):
    save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(1000)})
    (tmp_path / "bad.pt").write_bytes(corrupt((tmp_path / "good.pt").read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pt")
    assert "only plain-tensor checkpoints" in one_line(err)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that fails part-way (here: the disk fills while the file is flushed) leaves the
    old checkpoint whole, no temporary file, and one error line."""
    import errno
    import os

    from dali_erkt import io

    path = tmp_path / "c.pt"
    save_checkpoint(path, {"v": torch.tensor(1)})

    def half_then_full(fd):
        os.truncate(f"/proc/self/fd/{fd}", os.fstat(fd).st_size // 2)  # half of it is on disk ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full

    monkeypatch.setattr(io.os, "fsync", half_then_full)
    with pytest.raises(OSError, match="cannot write .*c.pt: No space left on device"):
        save_checkpoint(path, {"v": torch.tensor(2)})
    monkeypatch.undo()
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# ---- load_weights ----------------------------------------------------------------------------

def test_load_weights_from_our_checkpoint_and_bare_state_dict(tmp_path, small):
    save_checkpoint(tmp_path / "ours.pt", {"model": small.state_dict(), "arch": "resnet18"})
    torch.save(small.state_dict(), tmp_path / "bare.pth")
    for name in ("ours.pt", "bare.pth"):
        fresh = create_model("resnet18", 3)
        assert load_weights(fresh, tmp_path / name, arch="resnet18") == (len(small.state_dict()), [])
        assert same_state(fresh.state_dict(), small.state_dict())


def test_safetensors_round_trip(tmp_path, small):
    save_file(small.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = create_model("resnet18", 3)
    load_weights(fresh, tmp_path / "w.safetensors", arch="resnet18")
    assert same_state(fresh.state_dict(), small.state_dict())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh, tmp_path / "bad.safetensors")
    one_line(err)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, small, prefix):
    wrapped = {prefix + k: v for k, v in small.state_dict().items()}
    save_checkpoint(tmp_path / "c.pt", {"model": wrapped, "arch": "resnet18"})
    fresh = create_model("resnet18", 3)
    load_weights(fresh, tmp_path / "c.pt")
    assert same_state(fresh.state_dict(), small.state_dict())


def test_arch_mismatch(tmp_path, small):
    save_checkpoint(tmp_path / "c.pt", {"model": small.state_dict(), "arch": "resnet18"})
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet18", 3), tmp_path / "c.pt", arch="efficientnet_b0")
    assert one_line(err) == f"checkpoint {tmp_path / 'c.pt'} is for resnet18, expected efficientnet_b0"
    # A pretrained tag names the same architecture.
    load_weights(create_model("resnet18", 3), tmp_path / "c.pt", arch="resnet18.a1_in1k")


def test_class_count_mismatch(tmp_path):
    ten = create_model("resnet18", 10)
    save_checkpoint(tmp_path / "c.pt", {"model": ten.state_dict(), "arch": "resnet18"})
    three = create_model("resnet18", 3)
    with pytest.raises(CheckpointError) as err:
        load_weights(three, tmp_path / "c.pt", arch="resnet18")
    msg = one_line(err)
    assert "10-class" in msg and "3 classes" in msg
    head = three.fc.weight.clone()
    assert load_weights(three, tmp_path / "c.pt", allow_head_mismatch=True)[1] == ["fc.weight", "fc.bias"]
    assert torch.equal(three.fc.weight, head)
    assert torch.equal(three.conv1.weight, ten.conv1.weight)
    # A backbone saved without its classifier loads the same way.
    headless = {k: v for k, v in ten.state_dict().items() if not k.startswith("fc.")}
    save_checkpoint(tmp_path / "headless.pt", headless)
    assert load_weights(three, tmp_path / "headless.pt", allow_head_mismatch=True)[1] == ["fc.weight", "fc.bias"]
    with pytest.raises(CheckpointError, match="2 missing keys"):
        load_weights(three, tmp_path / "headless.pt")


def test_missing_and_unexpected_keys(tmp_path, small):
    state = dict(small.state_dict())
    for key in ("layer1.0.conv1.weight", "layer2.0.bn1.bias"):
        del state[key]
    save_checkpoint(tmp_path / "missing.pt", {"model": state})
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet18", 3), tmp_path / "missing.pt", arch="resnet18")
    msg = one_line(err)
    assert "2 missing keys" in msg and "layer1.0.conv1.weight" in msg and "unexpected keys" not in msg
    state = dict(small.state_dict(), **{"extra.weight": torch.ones(1)})
    save_checkpoint(tmp_path / "extra.pt", {"model": state})
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet18", 3), tmp_path / "extra.pt")
    assert "1 unexpected keys (extra.weight)" in one_line(err)


def test_non_state_dict_contents(tmp_path):
    save_checkpoint(tmp_path / "list.pt", [torch.ones(1)])
    save_checkpoint(tmp_path / "mixed.pt", {"epoch": 3, "w": torch.ones(1)})
    for name in ("list.pt", "mixed.pt"):
        with pytest.raises(CheckpointError, match="state dict") as err:
            load_weights(create_model("resnet18", 3), tmp_path / name)
        one_line(err)


def test_random_bytes_are_always_one_checkpoint_error(tmp_path):
    """Noise fails inside torch's unpickler in many ways (UnpicklingError, RuntimeError,
    IndexError, ...): every one is a CheckpointError naming the file."""
    import random
    rng = random.Random(0)
    for i in range(200):
        path = tmp_path / f"noise{i}.pt"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(512)))
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
