"""Device and mixed-precision choice: which dtype autocast uses, and whether a GradScaler runs.

Ampere and newer GPUs get bf16 (fp32's range, no loss scaling). Turing and older, such as the
paper's RTX 2060, have fast fp16 but no fast bf16, so they get fp16 with a GradScaler.
"""
from __future__ import annotations

import contextlib
import re

import torch

from .config import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"run.device = {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device = {name!r} but CUDA is not available here (no GPU visible "
                          f"or torch {torch.__version__} built without CUDA): use cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"run.device = {name!r} but only {count} CUDA device(s) are visible: "
                          f"use cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def precision_for(device_type: str, capability=None, requested: str = "auto",
                  bf16_supported: bool | None = None) -> str:
    """The precision for a device, as a pure function (testable without a GPU).

    `capability` is the CUDA compute capability, (major, minor) or major alone; `bf16_supported`
    defaults to "capability major >= 8".
    """
    if requested not in ("auto",) + PRECISIONS:
        raise ConfigError(f"run.precision = {requested!r}: use auto, fp32, fp16 or bf16")
    if device_type != "cuda":
        if requested == "fp16":
            raise ConfigError(f"run.precision = fp16 is not supported on {device_type}: "
                              "use bf16 or fp32")
        return "fp32" if requested == "auto" else requested
    major = capability[0] if isinstance(capability, (tuple, list)) else capability
    major = 0 if major is None else int(major)
    if bf16_supported is None:
        bf16_supported = major >= 8
    if requested == "auto":
        # torch reports bf16 as supported on Turing through slow emulation: require Ampere too.
        return "bf16" if bf16_supported and major >= 8 else "fp16"
    if requested == "bf16" and not bf16_supported:
        raise ConfigError("run.precision = bf16 is not supported on this GPU: use fp16 or fp32")
    return requested


def choose_precision(device, requested: str = "auto") -> str:
    """"fp32", "fp16" or "bf16" for `device`, reading the GPU's capability where it is CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return precision_for(device.type, None, requested)
    return precision_for("cuda", torch.cuda.get_device_capability(device), requested,
                         torch.cuda.is_bf16_supported())


def autocast_context(device, precision: str):
    """The autocast context for `precision` (a no-op context for fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ConfigError(f"precision {precision!r}: use fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 is not supported on {device.type}: use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def make_grad_scaler(device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 on CUDA (fp16's range needs it; bf16 and fp32 do not)."""
    device = torch.device(device)
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=enabled)
