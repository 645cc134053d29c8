"""CPU threads: torch's intra-op threads and DALI's pipeline threads never ask for more threads
than the process's cores (runtime.thread_split, applied by resolve_runtime on the CPU device)."""
from __future__ import annotations

import pytest
import torch

from dali_erkt import runtime
from dali_erkt.config import RunConfig
from dali_erkt.runtime import resolve_runtime, thread_split


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    """resolve_runtime sets torch's (global) thread count: put it back for the other tests."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores,dali,want", [
    (2, 4, (1, 1)),  # the default data.num_threads on a 2-core machine: one each
    (2, 1, (1, 1)),
    (2, 2, (1, 1)),
    (1, 4, (1, 1)),  # one core: nothing to split
    (4, 4, (1, 3)),
    (16, 4, (12, 4)),
    (16, 16, (1, 15)),
    (16, 0, (8, 8)),  # 0: auto, half the cores
    (2, 0, (1, 1)),
    (3, 0, (2, 1)),
])
def test_thread_split(cores, dali, want):
    torch_threads, dali_threads = thread_split(cores, dali)
    assert (torch_threads, dali_threads) == want
    assert torch_threads >= 1 and dali_threads >= 1
    assert torch_threads + dali_threads <= max(cores, 2)


def test_cpu_runtime_sets_torch_threads_to_the_cores_dali_leaves(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    rt = resolve_runtime(RunConfig(device="cpu"), dali_threads=3)
    assert rt.dali_threads == 3 and torch.get_num_threads() == 5
    torch.set_num_threads(7)
    rt = resolve_runtime(RunConfig(device="cpu"))  # not asked (the commands): torch's left alone
    assert rt.dali_threads is None and torch.get_num_threads() == 7


def test_processes_sharing_the_machine_split_their_share(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    assert runtime.set_cpu_threads(torch.device("cpu"), 2, local_world=2) == 2
    assert torch.get_num_threads() == 2  # 8 cores / 2 processes = 4: 2 for DALI, 2 for torch


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    rt = resolve_runtime(RunConfig(device="cpu"), dali_threads=4)
    assert rt.dali_threads == 4 and torch.get_num_threads() == 3


def test_cuda_device_keeps_dali_threads_as_asked():
    assert runtime.set_cpu_threads(torch.device("cuda", 0), 6) == 6
    assert runtime.set_cpu_threads(torch.device("cuda", 0), None) is None
