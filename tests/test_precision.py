"""Device and precision choice; the CUDA decision is a pure function, so it is tested here on CPU."""
from __future__ import annotations

import pytest
import torch

from dali_erkt.config import ConfigError
from dali_erkt.precision import (autocast_context, choose_precision, make_grad_scaler, precision_for,
                                 resolve_device)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device_type,capability,requested,bf16,want", [
    ("cpu", None, "auto", None, "fp32"),
    ("cpu", None, "fp32", None, "fp32"),
    ("cpu", None, "bf16", None, "bf16"),
    ("cuda", (7, 5), "auto", False, "fp16"),  # Turing (RTX 2060): fp16 + GradScaler
    ("cuda", (7, 5), "auto", True, "fp16"),  # bf16 "supported" only through emulation
    ("cuda", (7, 0), "auto", None, "fp16"),
    ("cuda", (8, 0), "auto", True, "bf16"),  # Ampere
    ("cuda", (9, 0), "auto", True, "bf16"),  # Hopper
    ("cuda", 9, "auto", None, "bf16"),
    ("cuda", (8, 6), "auto", False, "fp16"),
    ("cuda", (9, 0), "fp16", True, "fp16"),  # explicit requests are honoured
    ("cuda", (9, 0), "fp32", True, "fp32"),
    ("cuda", (7, 5), "bf16", True, "bf16"),
    ("cuda", (7, 5), "fp32", False, "fp32"),
])
def test_precision_matrix(device_type, capability, requested, bf16, want):
    assert precision_for(device_type, capability, requested, bf16) == want


@pytest.mark.parametrize("args", [("cpu", None, "fp16"), ("cuda", (6, 1), "bf16", False),
                                  ("cpu", None, "half"), ("cuda", (8, 0), "fp8")])
def test_refused_requests_are_one_line(args):
    with pytest.raises(ConfigError) as err:
        precision_for(*args)
    assert "\n" not in str(err.value)


def test_fp16_on_cpu_names_the_alternatives():
    with pytest.raises(ConfigError, match="use bf16 or fp32"):
        choose_precision(torch.device("cpu"), "fp16")
    with pytest.raises(ConfigError, match="use bf16 or fp32"):
        autocast_context("cpu", "fp16")


def test_choose_precision_on_cpu():
    assert choose_precision(torch.device("cpu")) == "fp32"
    assert choose_precision("cpu", "bf16") == "bf16"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_request_without_cuda(name):
    with pytest.raises(ConfigError) as err:
        resolve_device(name)
    assert "\n" not in str(err.value) and "CUDA is not available" in str(err.value)


def test_autocast_context_and_scaler_on_cpu():
    a = torch.randn(4, 4)
    with autocast_context("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    for precision in ("fp32", "bf16"):
        scaler = make_grad_scaler(torch.device("cpu"), precision)
        assert not scaler.is_enabled()
        loss = torch.tensor(3.0)
        assert scaler.scale(loss) is loss or torch.equal(scaler.scale(loss), loss)


@needs_cuda
@pytest.mark.gpu
def test_on_this_gpu():
    device = resolve_device("cuda")
    major = torch.cuda.get_device_capability(device)[0]
    want = "bf16" if major >= 8 and torch.cuda.is_bf16_supported() else "fp16"
    assert choose_precision(device) == want
    assert make_grad_scaler(device, "fp16").is_enabled()
    assert not make_grad_scaler(device, "bf16").is_enabled()
    a = torch.randn(8, 8, device=device)
    with autocast_context(device, "fp16"):
        assert (a @ a).dtype == torch.float16
    with pytest.raises(ConfigError, match="visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
