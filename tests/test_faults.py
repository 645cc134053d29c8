"""The fault suite: what a new user meets when things go wrong, from the command line.

For each fault: a non-zero exit, one `error:` line naming the cause and no traceback; the run
folder consistent (every checkpoint in it loads, no temporary file left); and after a kill, the
resumed run equal to an uninterrupted one. Kills are real (`kill -9` of a `dali-erkt` process at
random moments) and placed (a worker that ends its own process with `os._exit` at a chosen point
of a checkpoint write, which is what a kill there leaves behind).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from dali_erkt.checkpoint import load_checkpoint, save_checkpoint
from dali_erkt.synthetic import make_scenes

from cli_helpers import cli, mount_tmpfs, one_error_line, umount

SIZE, ARCH, EPOCHS = 32, "resnet10t", 3
BIN = Path(sys.executable).parent / "dali-erkt"


def consistent(run: Path, killed: bool = False):
    """Every checkpoint loads, no temporary file is left (a kill may leave one, which the next
    --resume removes), summary and log agree with last.pt."""
    if not killed:
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    state = load_checkpoint(run / "last.pt") if (run / "last.pt").exists() else None
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            ck = load_checkpoint(run / name)
            assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["epochs"] == len(state["history"])
        if summary["best_epoch"] > 0:
            assert load_checkpoint(run / "best.pt")["epoch"] == summary["best_epoch"]
    if state is not None and (run / "log.jsonl").exists():
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [r["epoch"] for r in state["history"]][:len(log)]
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    scenes = make_scenes(root / "data", classes=2, per_class=12, size=SIZE)
    assert cli("split", scenes, "--train-ratio", 0.5, "--out", root / "split").exit_code == 0
    return root


def train_args(data, out, *extra):
    return ["train-teacher", "--split", data / "split", "--arch", ARCH, "--out", out, "--device", "cpu",
            "--image-size", SIZE, "--batch-size", 4, "--epochs", EPOCHS, "--lr", 0.01, "--no-progress",
            "--set", "data.num_threads=1", *extra]


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted run every killed-and-resumed one must equal."""
    r = cli(*train_args(data, data / "reference"))
    assert r.exit_code == 0, r.output
    return load_checkpoint(data / "reference" / "last.pt")


def assert_same_run(state, ref):
    for part in ("model",):
        for k, v in ref[part].items():
            assert torch.equal(state[part][k], v), k
    for a, b in zip(state["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    strip = lambda h: [{k: v for k, v in r.items() if "second" not in k and "per_s" not in k} for r in h]
    assert strip(state["history"]) == strip(ref["history"])


# ---- data ------------------------------------------------------------------------------------

def test_symlink_loop_is_refused_naming_it(data, tmp_path):
    tree = make_scenes(tmp_path / "d", classes=2, per_class=3, size=SIZE)
    (tree / "farmland" / "loop").symlink_to("..")
    for command in (["check-data", tree], ["split", tree, "--train-ratio", 0.5, "--out", tmp_path / "s"]):
        one_error_line(cli(*command), "farmland/loop links back to", "loop")
    assert not (tmp_path / "s").exists()


def test_a_file_reached_twice_is_refused(tmp_path):
    tree = make_scenes(tmp_path / "d", classes=2, per_class=3, size=SIZE)
    (tree / "farmland" / "other").symlink_to(tree / "forest")
    one_error_line(cli("check-data", tree), "are the same file")


def test_one_class_and_a_class_without_test_images(tmp_path):
    tree = make_scenes(tmp_path / "d", classes=1, per_class=4, size=SIZE)
    one_error_line(cli("split", tree, "--train-ratio", 0.5, "--out", tmp_path / "s"), "at least two")
    tree = make_scenes(tmp_path / "e", classes=2, per_class=3, size=SIZE)
    for extra in sorted((tree / "forest").iterdir())[1:]:
        extra.unlink()
    one_error_line(cli("split", tree, "--train-ratio", 0.5, "--out", tmp_path / "s"),
                   "class 'forest' (1 image) with no", "image")


def test_a_file_gone_bad_after_the_split_is_named(data, tmp_path):
    tree = make_scenes(tmp_path / "d", classes=2, per_class=6, size=SIZE)
    assert cli("split", tree, "--train-ratio", 0.5, "--out", tmp_path / "s").exit_code == 0
    assert cli(*train_args(data, tmp_path / "ok", "--epochs", 1)[:0],
               *["train-teacher", "--split", tmp_path / "s", "--arch", ARCH, "--out", tmp_path / "ok",
                 "--device", "cpu", "--image-size", SIZE, "--batch-size", 4, "--epochs", 1,
                 "--no-progress"]).exit_code == 0
    victim = sorted((tree / "forest").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated after the split checked it
    r = cli("train-teacher", "--split", tmp_path / "s", "--arch", ARCH, "--out", tmp_path / "t",
            "--device", "cpu", "--image-size", SIZE, "--batch-size", 2, "--epochs", 1, "--no-progress")
    one_error_line(r, str(victim), "write the split again")
    r = cli("evaluate", "--split", tmp_path / "s", "--checkpoint", tmp_path / "ok" / "last.pt",
            "--out", tmp_path / "ev", "--device", "cpu")
    one_error_line(r, str(victim))


def test_preview_leaves_unreadable_files_out(tmp_path):
    from conftest import write_bad_files
    tree = make_scenes(tmp_path / "d", classes=2, per_class=2, size=SIZE)
    write_bad_files(tree / "farmland")
    r = cli("preview", tree, "--rows", 6, "--samples", 10, "--device", "cpu", "--out", tmp_path / "g.png")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert r.stderr.count("left out of the grid") == 3 and (tmp_path / "g.png").is_file()


def test_webp_counts_and_other_files_are_named(tmp_path):
    from PIL import Image
    tree = make_scenes(tmp_path / "d", classes=2, per_class=2, size=SIZE)
    Image.open(sorted((tree / "forest").iterdir())[0]).save(tree / "forest" / "extra.webp")
    (tree / "forest" / "notes.txt").write_text("field notes\n")
    r = cli("check-data", tree, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["checked"] == 5, r.output
    assert "skipped 1 file that is not an image (forest/notes.txt)" in r.stderr


# ---- crash safety ----------------------------------------------------------------------------

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from dali_erkt import checkpoint, io
    from dali_erkt.cli import main

    # FAULT = "<file name>:<n-th write of it>:<moment>", moment one of
    #   torn:   half of the temporary file written, then the process dies
    #   renamed-not: the temporary file complete, not yet renamed
    #   renamed: right after the rename
    name, nth, moment = os.environ["FAULT"].split(":")
    nth, count = int(nth), {"n": 0}
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == name:
            count["n"] += 1
            if count["n"] == nth and moment == "renamed-not":
                os._exit(137)
            real_replace(src, dst)
            if count["n"] == nth and moment == "renamed":
                os._exit(137)
            return
        real_replace(src, dst)

    real_write = io.atomic_write

    def atomic_write(path, write):
        def torn(tmp):
            write(tmp)
            with open(tmp, "r+b") as fh:
                fh.truncate(os.path.getsize(tmp) // 2)
            os._exit(137)
        torn_now = moment == "torn" and os.path.basename(str(path)) == name and count["n"] + 1 == nth
        real_write(path, torn if torn_now else write)

    os.replace = replace
    io.atomic_write = checkpoint.atomic_write = atomic_write
    sys.exit(main(sys.argv[1:]))
''')

PLACED = [  # (file, n-th write, moment): every place a kill can hit the run folder's writes
    ("config.yaml", 1, "renamed-not"),  # before the first checkpoint
    ("best.pt", 1, "torn"),  # during the first checkpoint write
    ("best.pt", 2, "renamed"),  # between best.pt and last.pt
    ("last.pt", 2, "renamed-not"),
    ("last.pt", 2, "renamed"),  # between last.pt and the log
    ("log.jsonl", 3, "renamed"),  # after the last epoch, before summary.json
    ("summary.json", 1, "renamed-not"),
]


def run_worker(tmp_path, fault, args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, FAULT=fault)  # the same threads as the reference run: the same sums
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("fault", PLACED, ids=[f"{f}-{n}-{m}" for f, n, m in PLACED])
def test_placed_kill_then_resume_equals_the_uninterrupted_run(data, reference, tmp_path, fault):
    out = tmp_path / "run"
    killed = run_worker(tmp_path, ":".join(map(str, fault)), train_args(data, out))
    assert killed.returncode == 137, killed.stderr[-2000:]
    r = cli(*train_args(data, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert_same_run(consistent(out), reference)
    assert (out / "summary.json").is_file()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(data, reference, tmp_path):
    """Real kills of a real process, three times in one run, at random moments; each resume
    continues, and the finished run equals the uninterrupted one."""
    out, rng = tmp_path / "run", random.Random(7)
    args = [str(BIN)] + [str(a) for a in train_args(data, out)]
    env = dict(os.environ)  # the same threads as the reference run: the same float sums
    for attempt in range(3):
        cmd = args + (["--resume"] if (out / "config.yaml").exists() else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        consistent(out, killed=True) if (out / "last.pt").exists() else None
    r = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    if "has finished all" in r.stderr:  # the last kill came after the run had completed
        assert r.returncode == 2
    else:
        assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(consistent(out), reference)


def test_divergence_stops_with_finite_weights_kept(data, tmp_path):
    r = cli(*train_args(data, tmp_path / "run", "--lr", "1e30"))
    line = one_error_line(r, "NaN or infinite", code=3)
    assert "use --precision fp32" not in line  # the run is fp32 already
    if (tmp_path / "run" / "last.pt").exists():
        consistent(tmp_path / "run")


# ---- checkpoints -----------------------------------------------------------------------------

def test_hostile_and_mismatched_checkpoints(data, reference, tmp_path):
    split = data / "split"
    ev = ["evaluate", "--split", split, "--out", tmp_path / "ev", "--device", "cpu", "--checkpoint"]
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    one_error_line(cli(*ev, tmp_path / "noise.safetensors"), "weights only")
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    one_error_line(cli(*ev, tmp_path / "noise.pt"), "not a torch checkpoint")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"arch": ARCH, "model": Evil()}, tmp_path / "evil.pt")
    one_error_line(cli(*ev, tmp_path / "evil.pt"), "needs code to load")
    assert not marker.exists()
    # No class names, or other classes than the split's.
    state = dict(reference)
    save_checkpoint(tmp_path / "noclasses.pt", {k: v for k, v in state.items() if k != "classes"})
    one_error_line(cli(*ev, tmp_path / "noclasses.pt"), "records no class names")
    save_checkpoint(tmp_path / "other.pt", dict(state, classes=["a", "b", "c"]))
    one_error_line(cli(*ev, tmp_path / "other.pt"), "3 classes", "not this split's 2")
    distill = ["distill", "--split", split, "--out", tmp_path / "s", "--device", "cpu", "--epochs", 1,
               "--image-size", SIZE, "--set", f"model.teachers=[{ARCH}]", "--set", "model.teacher_weights=[1]"]
    one_error_line(cli(*distill, "--teacher", tmp_path / "other.pt"), "not this split's")
    # A teacher of another architecture than model.teachers names.
    one_error_line(cli(*distill[:-4], "--set", "model.teachers=[resnet18]", "--set",
                       "model.teacher_weights=[1]", "--teacher", data / "reference" / "last.pt"),
                   "is a resnet10t checkpoint, but resnet18 was asked for")


def test_resume_refuses_what_does_not_fit(data, reference, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(data, out, "--epochs", 1)).exit_code == 0
    # Distill --resume of a train-teacher run.
    r = cli("distill", "--split", data / "split", "--out", out, "--resume", "--teacher",
            data / "reference" / "last.pt", "--set", f"model.teachers=[{ARCH}]", "--set",
            "model.teacher_weights=[1]", "--set", f"model.arch={ARCH}", "--allow-changes")
    one_error_line(r, "is a teacher run", "train-teacher")
    # An optimizer state from another model.
    state = load_checkpoint(out / "last.pt")
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    torch.nn.Linear(3, 2)(torch.ones(1, 3)).sum().backward()
    save_checkpoint(out / "last.pt", dict(state, optimizer=other.state_dict()))
    one_error_line(cli(*train_args(data, out, "--resume", "--allow-changes")), "optimizer state")
    # A model state whose classifier does not fit the classes.
    bad = dict(state, model={k: (v[:1] if k.startswith("fc.") else v) for k, v in state["model"].items()})
    save_checkpoint(out / "last.pt", bad)
    one_error_line(cli(*train_args(data, out, "--resume", "--allow-changes")), "last.pt has a 1-class classifier")


# ---- resources and files ---------------------------------------------------------------------

def test_out_is_an_existing_file(data, tmp_path):
    (tmp_path / "taken").write_text("mine\n")
    one_error_line(cli(*train_args(data, tmp_path / "taken")), "is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "mine\n"


def test_files_get_the_umask_mode(data, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli(*train_args(data, tmp_path / "run", "--epochs", 1)).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("size", ["2m", "80m"])
def test_full_disk_is_one_line_and_keeps_what_was_written(data, tmp_path, size):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, size):
        pytest.skip("needs root and permission to mount a tmpfs (a small full disk)")
    try:
        # Fill the disk but for a little, so the run fails part-way through its writes.
        (disk / "filler").write_bytes(b"\0" * 1)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - 600_000))
        r = cli(*train_args(data, disk / "run"))
        one_error_line(r, "cannot write", "No space left on device", code=3)
        if (disk / "run").exists():
            consistent(disk / "run")
    finally:
        umount(disk)


def test_read_only_output_folder(data, tmp_path):
    disk = tmp_path / "ro"
    if not mount_tmpfs(disk, "4m", "ro"):
        pytest.skip("needs root and permission to mount a read-only tmpfs")
    try:
        one_error_line(cli(*train_args(data, disk / "run")), "cannot write", "Read-only", code=3)
    finally:
        umount(disk)


# ---- configuration and command line ----------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (["--set", "optim.weight_decay=-1"], ["optim.weight_decay = -1.0 must be >= 0"]),
    (["--lr", "nan"], ["optim.lr = nan"]),
    (["--set", "data.num_threads=0"], ["data.num_threads = 0"]),
    (["--set", "data.prefetch=0"], ["data.prefetch = 0"]),
    (["--config", "LIST"], ["holds a list, not a mapping"]),
    (["--config", "NOISE"], ["is not text"]),
])
def test_bad_settings_are_one_line(data, tmp_path, extra, words):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "noise.yaml").write_bytes(bytes(range(256)))
    extra = [{"LIST": tmp_path / "list.yaml", "NOISE": tmp_path / "noise.yaml"}.get(x, x) for x in extra]
    one_error_line(cli(*train_args(data, tmp_path / "run", *extra)), *words)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_preview_on_cuda_without_cuda(data, tmp_path):
    one_error_line(cli("preview", data / "data", "--device", "cuda", "--out", tmp_path / "g.png"),
                   "CUDA is not available")


def test_pretrained_without_network_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub answers at once, as with no network
    one_error_line(cli(*train_args(data, tmp_path / "run", "--pretrained")),
                   "could not fetch timm's pretrained weights", "--weights")


# ---- the last line of defence: a bug is one line and a traceback file; signals say what is kept

def test_an_unexpected_exception_is_one_line_and_a_traceback_file(data, tmp_path, monkeypatch):
    from dali_erkt import engine

    def bug(*args, **kwargs):
        raise KeyError("the_bug")

    monkeypatch.setattr(engine, "train_one_epoch", bug)  # after the run folder is made
    out = tmp_path / "run"
    r = cli(*train_args(data, out))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("internal error:")]
    assert r.exit_code == 4 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "KeyError: 'the_bug'" in lines[0] and "please report it" in lines[0]
    saved = Path(lines[0].split("the traceback is in ")[1].split(";")[0])
    assert saved.parent == out and "Traceback" in saved.read_text() and "the_bug" in saved.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_ends_in_one_line_and_resume_continues(data, reference, tmp_path, sig, code, name):
    out = tmp_path / "run"
    args = [str(BIN)] + [str(a) for a in train_args(data, out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # wait for the first epoch's checkpoint, then interrupt the second epoch
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:  # the run ended before the signal: nothing to check here
        pytest.skip("the run finished before the signal arrived")
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"interrupted ({name}): {out} holds its last complete epoch") \
        and "--resume" in lines[0], lines[0]
    r = cli(*train_args(data, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert_same_run(consistent(out), reference)


@pytest.mark.parametrize("tensor", ["bn1.running_var", "conv1.0.weight"])
def test_weights_with_a_non_finite_tensor_are_named_at_load(data, tmp_path, tensor):
    import timm
    state = timm.create_model(ARCH, num_classes=2).state_dict()
    state[tensor] = state[tensor].clone().fill_(float("inf") if "var" in tensor else float("nan"))
    torch.save(state, tmp_path / "w.pt")
    r = cli(*train_args(data, tmp_path / "run", "--weights", tmp_path / "w.pt"))
    one_error_line(r, str(tmp_path / "w.pt"), f"NaN or infinite values in {tensor}")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_non_finite_buffers_are_never_checkpointed(data, tmp_path, monkeypatch):
    """BatchNorm's running statistics are checked before every save, as the parameters are."""
    from dali_erkt import engine
    real = engine.train_one_epoch

    def poison_buffers(step, batches, task, rt, log_every, bar):
        out = real(step, batches, task, rt, log_every, bar)
        calls.append(1)
        if len(calls) == 2:  # epoch 2's running statistics overflow
            for module in poisoned:
                module.running_var.fill_(float("inf"))
        return out

    calls, poisoned = [], []
    real_setup = engine.setup

    def setup(*args, **kwargs):
        s = real_setup(*args, **kwargs)
        poisoned.extend(m for m in s.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        return s

    monkeypatch.setattr(engine, "setup", setup)
    monkeypatch.setattr(engine, "train_one_epoch", poison_buffers)
    r = cli(*train_args(data, tmp_path / "run"))
    one_error_line(r, "weights became NaN or infinite", "epoch 2", code=3)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


# ---- one writer per run folder, and results never started over ------------------------------

def test_a_second_writer_is_refused_naming_the_first(data, tmp_path):
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "run.lock", "w") as held:  # another process's lock, as RunDir takes it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        r = subprocess.run([str(BIN)] + [str(a) for a in train_args(data, out)], capture_output=True,
                           text=True, timeout=300)
        one_error_line(r, f"{out} is being written by another dali-erkt process (pid 4242)")
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written beside it
    r = cli(*train_args(data, out, "--epochs", 1))  # the holder gone: the folder is usable
    assert r.exit_code == 0, r.output
    assert not (out / "run.lock").exists()  # released and removed at the run's end


def test_two_runs_started_together_leave_one_run(data, tmp_path):
    out = tmp_path / "run"
    args = [[str(BIN)] + [str(a) for a in train_args(data, out, "--seed", s)] for s in (1, 2)]
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for a in args]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], errs
    loser = errs[[p.returncode for p in procs].index(2)]
    assert "is being written by another dali-erkt process" in loser or "already holds a run" in loser
    seed = yaml.safe_load((out / "config.yaml").read_text())["run"]["seed"]
    assert load_checkpoint(out / "last.pt")["config"]["run"]["seed"] == seed  # one run's files
    assert load_checkpoint(out / "best.pt")["config"]["run"]["seed"] == seed


def test_results_without_last_pt_are_not_started_over(data, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(data, out, "--epochs", 1)).exit_code == 0
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli(*train_args(data, out, "--epochs", 1, "--resume"))
    one_error_line(r, "holds results (log.jsonl, summary.json) but no last.pt")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---- the divergence guard: only a state that computes finite outputs is kept ----------------

def test_finite_weights_with_infinite_logits_are_not_evaluated(data, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(data, run, "--epochs", 1)).exit_code == 0
    state = load_checkpoint(run / "last.pt")
    state["model"]["fc.weight"].fill_(3e38)  # finite, but x @ w overflows
    save_checkpoint(run / "last.pt", state)
    r = cli("evaluate", "--split", data / "split", "--checkpoint", run / "last.pt", "--out",
            tmp_path / "ev", "--device", "cpu")
    one_error_line(r, str(run / "last.pt"), "NaN or infinite logits", code=3)
    assert not (tmp_path / "ev").exists() or not list((tmp_path / "ev").iterdir())


def test_a_state_with_infinite_logits_is_never_saved(data, tmp_path, monkeypatch):
    """Epoch 2's weights compute infinite logits (simulated: the model's eval-mode output is
    scaled by inf from the second evaluation on): the run stops, keeping epoch 1's checkpoints."""
    import dali_erkt.engine as engine
    calls = []

    class Overflowing(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) * float("inf")

    def predict(model, loader, rt):
        calls.append(1)
        return real(Overflowing(model) if len(calls) >= 2 else model, loader, rt)

    real = engine.predict
    monkeypatch.setattr(engine, "predict", predict)
    run = tmp_path / "run"
    r = cli(*train_args(data, run))
    one_error_line(r, "NaN or infinite logits", "epoch 2", "last good checkpoint", code=3)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert load_checkpoint(run / "best.pt")["epoch"] == 1
    consistent(run)


def test_demo_into_a_read_only_folder_is_one_line(tmp_path):
    disk = tmp_path / "ro"
    if not mount_tmpfs(disk, "4m", "ro"):
        pytest.skip("needs root and permission to mount a read-only tmpfs")
    try:
        one_error_line(cli("demo", "--out", disk / "demo"), "cannot write", "Read-only", code=3)
    finally:
        umount(disk)


def test_weights_with_integer_keys_are_one_line(data, tmp_path):
    torch.save({1: torch.zeros(3)}, tmp_path / "int-keys.pt")
    r = cli(*train_args(data, tmp_path / "run", "--weights", tmp_path / "int-keys.pt"))
    one_error_line(r, "int-keys.pt is not a state dict", "key 1 is not a tensor name")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_last_batch_of_one_image_is_refused_before_training(data, tmp_path):
    # 12 training images in batches of 11 leave one image, which BatchNorm cannot train on.
    r = cli(*train_args(data, tmp_path / "run", "--batch-size", 11, "--set", "data.drop_last=false"))
    one_error_line(r, "last training batch of one image", "--batch-size 12")
    assert not (tmp_path / "run" / "last.pt").exists()
    assert cli(*train_args(data, tmp_path / "ok", "--batch-size", 12, "--epochs", 1,
                           "--set", "data.drop_last=false")).exit_code == 0
