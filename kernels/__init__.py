"""Hand-written GPU kernels with plain PyTorch twins (shipped as `dali_erkt.kernels`).

Public API:
  dist_terms(S, T, tau=2.0, tau_squared=True, impl="auto") -> (inter, intra)
  triton_available(device=None) -> bool
  set_triton_dist_enabled(flag) / triton_dist_enabled() -> bool
  resolve_dist_impl(S, T, impl="auto") -> "torch" | "triton"
  benchmark_dist(B, C, device, iters) -> dict   (kernels/timing.py)

Default: the torch twin. "auto" takes the fused Triton kernel only for CUDA tensors when triton can
run AND the kernel is enabled (env DALI_ERKT_TRITON_DIST=1 or set_triton_dist_enabled(True)): a kernel
becomes the default only after the benchmark shows it is clearly faster (kernels/README.md).
Triton is imported lazily, so importing this package never needs it.
"""
from __future__ import annotations

import functools
import os

import torch

from .reference import EPS, dist_terms_reference
from .timing import benchmark_dist

__all__ = ["dist_terms", "dist_terms_reference", "triton_available", "set_triton_dist_enabled",
           "triton_dist_enabled", "resolve_dist_impl", "benchmark_dist", "ENV_ENABLE_DIST"]

ENV_ENABLE_DIST = "DALI_ERKT_TRITON_DIST"
# None: follow the environment variable; True/False: override it (set_triton_dist_enabled).
_dist_enabled: bool | None = None


def set_triton_dist_enabled(flag: bool | None) -> None:
    """Let impl="auto" use the fused DIST kernel (True), forbid it (False), or follow the env (None)."""
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


def resolve_dist_impl(S: torch.Tensor, T: torch.Tensor, impl: str = "auto") -> str:
    """Which implementation dist_terms(S, T, impl=impl) will run: "torch" or "triton"."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl != "auto":
        return impl
    if not (S.is_cuda and T.is_cuda and triton_dist_enabled()):
        return "torch"
    mod = _dist_loss_module()
    if mod is None or not triton_available(S.device):
        return "torch"
    try:
        mod.check_inputs(S, T)
    except (ValueError, TypeError):
        return "torch"  # shapes/dtypes the kernel does not take: the twin does
    if T.requires_grad and torch.is_grad_enabled():
        return "torch"  # the kernel gives T no gradient; the twin does
    return "triton"


def dist_terms(S: torch.Tensor, T: torch.Tensor, tau: float = 2.0, tau_squared: bool = True,
               impl: str = "auto", eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST inter- and intra-class terms (fp32 scalars) of student logits S and teacher logits T, (B, C).

    impl: "torch" (the twin, kernels.reference), "triton" (the fused kernel; gradient for S only,
    raises if it cannot run here) or "auto" (see resolve_dist_impl; the twin unless enabled).
    """
    if resolve_dist_impl(S, T, impl) == "torch":
        return dist_terms_reference(S, T, tau, tau_squared, eps)
    mod = _dist_loss_module()
    if mod is None:
        raise RuntimeError("impl='triton' but triton cannot be imported")
    if not triton_available(S.device):
        raise RuntimeError(f"impl='triton' but Triton kernels cannot run on {S.device} "
                           "(CUDA needed, or TRITON_INTERPRET=1 for CPU tensors)")
    return mod.dist_terms_triton(S, T, tau, tau_squared, eps)
