"""The teacher logit cache on the CPU: a run that fills it and one that replays it are the same
run; a replay with other ensemble weights equals an uncached run with them; a key mismatch, a
half-filled cache and a short disk are handled."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dali_erkt.checkpoint import load_checkpoint
from dali_erkt.cli import main
from dali_erkt.models import TeacherEnsemble
from dali_erkt.synthetic import make_scenes

SIZE, ARCH = 32, "resnet10t"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = make_scenes(root / "data", classes=3, per_class=10, size=SIZE)
    assert cli("split", data, "--train-ratio", 0.5, "--out", root / "split").exit_code == 0
    for k, arch in enumerate(("resnet10t", "resnet14t")):
        r = cli("train-teacher", "--split", root / "split", "--arch", arch, "--out", root / "t" / arch,
                "--device", "cpu", "--image-size", SIZE, "--batch-size", 5, "--epochs", 2, "--lr", 0.01,
                "--seed", k, "--no-progress")
        assert r.exit_code == 0, r.output
    return root


def distill(root, out, *extra):
    args = ["distill", "--split", root / "split", "--teachers", root / "t", "--out", out, "--device", "cpu",
            "--image-size", SIZE, "--batch-size", 5, "--epochs", 2, "--lr", 2e-4, "--no-progress",
            "--set", "model.teachers=[resnet10t,resnet14t]", "--set", f"model.arch={ARCH}", *extra]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()], r


def no_teacher_forward(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a teacher forward ran during a replay")
    monkeypatch.setattr(TeacherEnsemble, "member_logits", refuse)
    monkeypatch.setattr(TeacherEnsemble, "forward", refuse)


def test_replay_is_the_filling_run_without_teachers(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    weights = ["--set", "model.teacher_weights=[0.5,0.5]"]
    filled, r = distill(setup, tmp_path / "fill", "--teacher-cache", cache, *weights)
    assert "2 epochs x 15 views x 3 classes x 2 teachers x 2 bytes = 0.0 MB" in r.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["key.json", "r0-t0.f16", "r0-t1.f16", "r0-test.f16",
                                                        "r0-test.json", "r0.json"]
    assert (cache / "r0-t0.f16").stat().st_size == 2 * 15 * 3 * 2  # epochs x views x classes x fp16
    no_teacher_forward(monkeypatch)
    replayed, _ = distill(setup, tmp_path / "replay", "--teacher-cache", cache, *weights)
    for a, b in zip(filled, replayed):
        for part in ("loss", "ce", "inter", "intra", "oa", "agreement"):
            assert b[part] == pytest.approx(a[part], rel=1e-3), part
    a = load_checkpoint(tmp_path / "fill" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "replay" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same targets: the same run, bit for bit


def test_replay_with_other_weights_equals_an_uncached_run(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    distill(setup, tmp_path / "fill", "--teacher-cache", cache, "--set", "model.teacher_weights=[0.5,0.5]")
    uncached, _ = distill(setup, tmp_path / "plain", "--set", "model.teacher_weights=[0.8,0.2]")
    no_teacher_forward(monkeypatch)
    replayed, _ = distill(setup, tmp_path / "replay", "--teacher-cache", cache,
                          "--set", "model.teacher_weights=[0.8,0.2]", "--set", "model.combine=probs")
    # The uncached run's teacher logits are fp32, the cache's fp16 (rounding: about 5e-4 relative
    # of a logit). Measured at the paper's lr 2e-4: losses within 1e-5 (epoch 1) and 6e-5 (epoch 2)
    # relative. (At lr 1e-3 training amplifies it to about 1e-2 by epoch 2: a chaotic trajectory.)
    for tol, a, b in zip((1e-3, 1e-3), uncached, replayed):
        for part in ("loss", "ce", "inter", "intra"):
            assert b[part] == pytest.approx(a[part], rel=tol), part
        assert b["agreement"] == pytest.approx(a["agreement"], abs=1 / 15)  # 15 test images


def test_cached_rows_are_the_teachers_logits_of_the_same_views(setup, tmp_path):
    """Row i of epoch e holds the members' logits of the i-th view of epoch e, within fp16 rounding."""
    from dali_erkt.config import resolve_config
    from dali_erkt.data.dataset import load_split
    from dali_erkt.data.loader import DaliLoader
    from dali_erkt.models import build_ensemble
    from dali_erkt.teacher_cache import TeacherCache

    cache = tmp_path / "cache"
    distill(setup, tmp_path / "fill", "--teacher-cache", cache, "--set", "model.teacher_weights=[0.5,0.5]")
    split = load_split(setup / "split")
    cfg = resolve_config("erkt", flags={"data.image_size": SIZE, "data.batch_size": 5,
                                        "model.teachers": ("resnet10t", "resnet14t"),
                                        "model.teacher_weights": (0.5, 0.5)})
    ens = build_ensemble(cfg.model.teachers, [setup / "t" / a / "last.pt" for a in cfg.model.teachers],
                         cfg.model.teacher_weights, "probs", split.classes)
    key = json.loads((cache / "key.json").read_text())
    rows = TeacherCache(cache, key, teachers=2, positions=15, classes=3).read_epoch(1)
    loader = DaliLoader.from_split(split, "train", cfg, device="cpu", train=True)
    loader.set_epoch(1)
    z = torch.cat([ens.member_logits(b.images.float()) for b in loader], dim=1)
    err = (torch.from_numpy(rows).float() - z).abs()
    assert (err <= z.abs() * 2 ** -11 + 1e-6).all(), err.max()  # half an fp16 step


def test_key_mismatch_half_filled_cache_and_short_disk(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = ["cache-teachers", "--split", setup / "split", "--teachers", setup / "t", "--teacher-cache",
            cache, "--device", "cpu", "--image-size", SIZE, "--batch-size", 5,
            "--set", "model.teachers=[resnet10t,resnet14t]", "--set", "model.teacher_weights=[0.5,0.5]"]
    r = cli(*args, "--epochs", 1)
    assert r.exit_code == 0 and json.loads(r.stdout)["filled"] == 1, r.output
    # Killed half-way: a second epoch's rows written but never marked complete are not read.
    with open(cache / "r0-t0.f16", "ab") as fh:
        fh.write(np.full(15 * 3, 7.0, dtype=np.float16).tobytes())
    assert json.loads((cache / "r0.json").read_text()) == {"complete": [0]}
    r = cli(*args, "--epochs", 2)
    assert r.exit_code == 0 and json.loads(r.stdout)["filled"] == 1, r.output  # epoch 2 only
    rows = np.memmap(cache / "r0-t0.f16", dtype=np.float16, mode="r").reshape(2, 15, 3)
    assert not (rows[1] == 7.0).all()
    # The distillation then replays both epochs and runs no teacher.
    monkeypatch.setattr(TeacherEnsemble, "member_logits", lambda *a: pytest.fail("teacher ran"))
    distill(setup, tmp_path / "s", "--teacher-cache", cache, "--set", "model.teacher_weights=[0.3,0.7]")
    monkeypatch.undo()
    # Another seed makes other views: refused in one line naming the field.
    r = cli(*args, "--epochs", 2, "--seed", 3)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "was filled with another seed (0 vs 3 now)" in r.stderr
    # A disk too small for the cache is refused before anything is written.
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 10))
    r = cli(*[tmp_path / "new" if a == cache else a for a in args], "--epochs", 2)
    assert r.exit_code == 2 and "needs 0.00 GB but" in r.stderr and not (tmp_path / "new" / "r0.json").exists()


def test_a_read_only_cache_folder_is_one_line(setup, tmp_path):
    from cli_helpers import mount_tmpfs, umount
    disk = tmp_path / "ro"
    if not mount_tmpfs(disk, "1m", "ro"):
        pytest.skip("needs root and permission to mount a read-only tmpfs")
    try:
        teachers = ["--teachers", setup / "t", "--device", "cpu", "--image-size", SIZE,
                    "--batch-size", 5, "--epochs", 1, "--set", "model.teachers=[resnet10t,resnet14t]",
                    "--set", "model.teacher_weights=[0.5,0.5]"]
        for command in (["cache-teachers", "--split", setup / "split", *teachers],
                        ["distill", "--split", setup / "split", "--out", tmp_path / "s", "--no-progress",
                         "--set", f"model.arch={ARCH}", *teachers]):
            r = cli(*command, "--teacher-cache", disk / "cache")
            lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert r.exit_code == 3 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"cannot write {disk / 'cache'}" in lines[0] and "Read-only" in lines[0]
            assert "--teacher-cache" in lines[0]
    finally:
        umount(disk)


# ---- files read back are validated: a damaged cache is one line naming the file -----------------

def _filled(folder):
    from dali_erkt.teacher_cache import TeacherCache
    cache = TeacherCache(folder, {"k": 1}, teachers=2, positions=4, classes=3)
    for epoch in range(2):
        cache.write_epoch(epoch, np.full((2, 4, 3), epoch, dtype=np.float16))
    cache.write_test(np.zeros((2, 5, 3), dtype=np.float16))
    return cache


def _reopen(folder):
    from dali_erkt.teacher_cache import TeacherCache
    cache = TeacherCache(folder, {"k": 1}, teachers=2, positions=4, classes=3)
    cache.read_test()
    for epoch in range(2):
        cache.read_epoch(epoch)
    return cache


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _nan_row(path):
    rows = np.fromfile(path, dtype=np.float16)
    rows[5] = np.nan
    rows.tofile(path)


DAMAGE = [
    ("key.json", lambda p: p.write_text('{"k": 1'), "key.json is damaged (not readable JSON"),
    ("key.json", lambda p: p.write_text("[1, 2]"), "key.json is damaged (it holds a list"),
    ("key.json", lambda p: p.unlink(), "holds logit files but no key.json"),
    ("r0.json", lambda p: p.write_text('{"complete": "all"}'), "r0.json is damaged ('complete' is \"all\""),
    ("r0.json", lambda p: p.write_bytes(b"\xff\xfe"), "r0.json is damaged (not readable JSON"),
    ("r0.json", lambda p: p.write_text('{"complete": [0, 1, 2]}'), "r0-t0.f16 is damaged (r0.json marks epoch 3"),
    ("r0-t1.f16", lambda p: _truncate(p, 30), "r0-t1.f16 is damaged (r0.json marks epoch 2 complete but the file holds 30 bytes"),
    ("r0-t1.f16", _nan_row, "r0-t1.f16 is damaged (epoch 1 holds NaN or infinite logits)"),
    ("r0-test.json", lambda p: p.write_text('{"shape": [2, 5, 4]}'), "r0-test.json is damaged ('shape' is [2, 5, 4], not [2, images, 3])"),
    ("r0-test.json", lambda p: p.write_text('{"shape": [2, 6, 3]}'), "r0-test.f16 is damaged (it holds 30 values, not the [2, 6, 3]"),
]


@pytest.mark.parametrize("name, damage, message", DAMAGE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGE)])
def test_a_damaged_cache_file_is_named_in_one_line(tmp_path, name, damage, message):
    from dali_erkt.errors import DataError
    _filled(tmp_path / "c")
    _reopen(tmp_path / "c")  # undamaged, it reads back
    damage(tmp_path / "c" / name)
    with pytest.raises(DataError) as err:
        _reopen(tmp_path / "c")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert "delete the cache folder" in str(err.value) or "delete the folder" in str(err.value)


def test_a_damaged_cache_stops_distill_in_one_line(setup, tmp_path):
    cache = tmp_path / "cache"
    distill(setup, tmp_path / "fill", "--teacher-cache", cache, "--set", "model.teacher_weights=[0.5,0.5]")
    (cache / "key.json").write_text("{")
    r = cli("distill", "--split", setup / "split", "--teachers", setup / "t", "--out", tmp_path / "again",
            "--device", "cpu", "--image-size", SIZE, "--batch-size", 5, "--epochs", 2, "--no-progress",
            "--set", "model.teachers=[resnet10t,resnet14t]", "--set", "model.teacher_weights=[0.5,0.5]",
            "--set", f"model.arch={ARCH}", "--teacher-cache", cache)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"teacher cache file {cache / 'key.json'} is damaged" in lines[0]
