"""Several processes on the CPU: `torchrun --nproc_per_node 2` with the gloo backend, through the
real `dali-erkt train-teacher` command. The ranks train on disjoint shards whose union is the
epoch, only rank 0 writes the run folder, the weights are equal across ranks at the end, and the
run resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dali_erkt.checkpoint import load_checkpoint
from dali_erkt.data.dataset import load_split, make_split, save_split
from dali_erkt.synthetic import make_scenes

# Runs inside each torchrun process: records the indices each rank trains on and its final
# weights, then runs the real command line.
WORKER = textwrap.dedent('''
    import os, sys, torch
    from dali_erkt import engine
    from dali_erkt.cli import main

    rank, out = int(os.environ["RANK"]), os.environ["TRACE_DIR"]
    real_step, real_setup = engine.make_train_step, engine.setup

    def traced_step(*args, **kwargs):
        step = real_step(*args, **kwargs)
        def run(batch):
            with open(f"{out}/indices-{rank}.txt", "a") as fh:
                fh.write(" ".join(map(str, batch.indices.tolist())) + "\\n")
            return step(batch)
        return run

    def traced_setup(*args, **kwargs):
        s = real_setup(*args, **kwargs)
        traced_setup.model = s.model
        return s

    engine.make_train_step, engine.setup = traced_step, traced_setup
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        if exc.code:
            raise
    torch.save({k: v.clone() for k, v in traced_setup.model.state_dict().items()},
               f"{out}/weights-{rank}.pt")
''')

SIZE, BATCH = 32, 4


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    root = make_scenes(tmp_path_factory.mktemp("scenes"), classes=4, per_class=12, size=SIZE)
    return save_split(make_split(root, 0.5, seed=0), tmp_path_factory.mktemp("split"))


def torchrun(tmp_path, trace: Path, *args) -> subprocess.CompletedProcess:
    trace.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, TRACE_DIR=str(trace), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_disjoint_shards_with_equal_weights_and_resume(split_dir, tmp_path):
    split = load_split(split_dir)
    out = tmp_path / "run"
    common = ["train-teacher", "--split", split_dir, "--arch", "resnet10t", "--out", out, "--device",
              "cpu", "--image-size", SIZE, "--batch-size", BATCH, "--no-progress",
              "--set", "data.num_threads=1", "--set", "data.prefetch=1"]
    r = torchrun(tmp_path, tmp_path / "trace1", *common, "--epochs", 1)
    assert r.returncode == 0, r.stderr[-3000:]

    # Disjoint shards whose union is the epoch (24 training images, 2 ranks x 3 batches of 4).
    shards = [[int(i) for line in (tmp_path / "trace1" / f"indices-{k}.txt").read_text().splitlines()
               for i in line.split()] for k in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(split.train) // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(split.train)))

    # One set of files, written by rank 0 alone; the log counts the whole epoch once.
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.csv",
                                                     "log.jsonl", "summary.json"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["train_images"] == len(split.train) and "oa" in log[0]

    # DDP keeps the parameters equal across ranks; the checkpoint holds rank 0's.
    w0, w1 = (torch.load(tmp_path / "trace1" / f"weights-{k}.pt") for k in (0, 1))
    ckpt = load_checkpoint(out / "last.pt")["model"]
    for name, p in create_named_parameters(w0):
        assert torch.equal(p, w1[name]), name
        assert torch.equal(p, ckpt[name]), name

    # The run resumes under torchrun too (one more epoch, asked for explicitly).
    r = torchrun(tmp_path, tmp_path / "trace2", *common, "--epochs", 2, "--resume", "--allow-changes")
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    shards = [[int(i) for line in (tmp_path / "trace2" / f"indices-{k}.txt").read_text().splitlines()
               for i in line.split()] for k in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(len(split.train)))


def create_named_parameters(state: dict):
    """The parameters of a state dict (BatchNorm's running statistics are each rank's own)."""
    return [(k, v) for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                "num_batches_tracked"))]
