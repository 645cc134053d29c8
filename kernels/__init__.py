"""Hand-written GPU kernels (shipped as `dali_erkt.kernels`). A kernel imports nothing from the
package: the PyTorch definition it computes lives where it is used (the DIST loss in
`dali_erkt.losses`), which calls the kernel only where it is enabled, and tests compare the two.

API:
  dist_terms_triton(S, T, tau=2.0, tau_squared=True, eps=1e-8) -> (inter, intra)
  dist_kernel_accepts(S, T) -> bool      the kernel can run on these tensors here
  triton_available(device=None) -> bool
  set_triton_dist_enabled(flag) / triton_dist_enabled() -> bool
  time_fwd_bwd(fns, B, C, device, iters) -> dict     (kernels/timing.py)

The kernel is off by default (env DALI_ERKT_TRITON_DIST=1 or set_triton_dist_enabled(True) turn it
on): a kernel becomes the default only after a benchmark shows it clearly faster (README.md).
Triton is imported lazily, so importing this package never needs it.
"""
from __future__ import annotations

import functools
import os

import torch

from .timing import time_fwd_bwd

__all__ = ["dist_terms_triton", "dist_kernel_accepts", "triton_available",
           "set_triton_dist_enabled", "triton_dist_enabled", "time_fwd_bwd", "ENV_ENABLE_DIST"]

ENV_ENABLE_DIST = "DALI_ERKT_TRITON_DIST"
# None: follow the environment variable; True/False: override it (set_triton_dist_enabled).
_dist_enabled: bool | None = None


def set_triton_dist_enabled(flag: bool | None) -> None:
    """Let the DIST loss use the fused kernel (True), forbid it (False), or follow the env (None)."""
    global _dist_enabled
    _dist_enabled = flag


def triton_dist_enabled() -> bool:
    if _dist_enabled is not None:
        return _dist_enabled
    return os.environ.get(ENV_ENABLE_DIST, "").strip().lower() in ("1", "true", "yes", "on")


def _dist_loss_module():
    """Import the Triton module on first use; None when triton cannot be imported."""
    try:
        from . import dist_loss
    except Exception:  # ImportError, or a broken triton install failing at import
        return None
    return dist_loss


@functools.lru_cache(maxsize=None)
def _can_run(device_type: str) -> bool:
    mod = _dist_loss_module()
    if mod is None:
        return False
    # Interpreted kernels take CPU tensors; compiled ones need a CUDA device.
    if mod.interpreted() != (device_type == "cpu"):
        return False
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        return mod.probe(torch.device(device_type))
    except Exception:  # no driver, unsupported GPU, compiler failure: report, don't raise
        return False


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when Triton kernels can run on `device` (default: CUDA if present, else the CPU).

    Compiled kernels run on CUDA; on the CPU only Triton's interpreter runs them
    (TRITON_INTERPRET=1 set before the first kernel import). The answer comes from compiling and
    running a trivial kernel once per device type, and is cached.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _can_run(torch.device(device).type)


def dist_kernel_accepts(S: torch.Tensor, T: torch.Tensor) -> bool:
    """True when the fused DIST kernel runs on these tensors here (device, shapes, dtypes)."""
    if not triton_available(S.device):
        return False
    try:
        _dist_loss_module().check_inputs(S, T)
    except (ValueError, TypeError):
        return False
    return True


def dist_terms_triton(S: torch.Tensor, T: torch.Tensor, tau: float = 2.0, tau_squared: bool = True,
                      eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's (inter, intra) fp32 terms of student logits S and teacher logits T, (B, C), by the
    fused kernel; gradient for S only. Raises RuntimeError where the kernel cannot run."""
    if not triton_available(S.device):
        raise RuntimeError(f"the fused DIST kernel cannot run on {S.device} (CUDA with triton "
                           "needed, or TRITON_INTERPRET=1 for CPU tensors)")
    return _dist_loss_module().dist_terms_triton(S, T, tau, tau_squared, eps)
