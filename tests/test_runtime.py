"""The runtime: device and precision choice (the CUDA decision is a pure function, so it is
tested here on the CPU), autocast, the grad scaler, and the process group's backend."""
from __future__ import annotations

import pytest
import torch

from dali_erkt.config import RunConfig
from dali_erkt.errors import ConfigError
from dali_erkt.runtime import Runtime, choose_precision, precision_for, resolve_device, resolve_runtime

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
        resolve_runtime(RunConfig(device="cpu", precision="fp16"))


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


def test_autocast_and_scaler_on_cpu():
    a = torch.randn(4, 4)
    fp32 = resolve_runtime(RunConfig(device="cpu"))
    bf16 = resolve_runtime(RunConfig(device="cpu", precision="bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    with fp32.autocast():
        assert (a @ a).dtype == torch.float32
    with bf16.autocast():
        assert (a @ a).dtype == torch.bfloat16
    # CPU models take fp32 images under either precision (autocast casts them to bf16 itself).
    assert fp32.input_dtype == bf16.input_dtype == torch.float32
    for rt in (fp32, bf16):
        scaler = rt.grad_scaler()
        assert not scaler.is_enabled()
        loss = torch.tensor(3.0)
        assert torch.equal(scaler.scale(loss), loss)


def test_runtime_resolves_compile_and_rank():
    rt = resolve_runtime(RunConfig(device="cpu", compile="auto"))
    assert rt.compile is False and rt.world == 1 and rt.main  # auto compiles only on CUDA
    assert resolve_runtime(RunConfig(device="cpu", compile="on")).compile is True
    assert not resolve_runtime(RunConfig(device="cpu", compile="on")).uses_cuda_graphs


@needs_cuda
@pytest.mark.gpu
def test_on_this_gpu():
    device = resolve_device("cuda")
    major = torch.cuda.get_device_capability(device)[0]
    want = "bf16" if major >= 8 and torch.cuda.is_bf16_supported() else "fp16"
    assert choose_precision(device) == want
    fp16 = Runtime(device, precision="fp16")
    assert fp16.grad_scaler().is_enabled()
    assert not Runtime(device, precision="bf16").grad_scaler().is_enabled()
    assert fp16.input_dtype == torch.float16
    a = torch.randn(8, 8, device=device)
    with fp16.autocast():
        assert (a @ a).dtype == torch.float16
    with pytest.raises(ConfigError, match="visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
