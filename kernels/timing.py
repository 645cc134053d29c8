"""Timing of the fused DIST kernel against its torch twin (called by bench/throughput.py)."""
from __future__ import annotations

import torch


def _time_fwd_bwd(fn, S, T, iters: int, warmup: int) -> float:
    """Mean milliseconds of one forward + backward (grad w.r.t. S), timed with CUDA events."""
    ones = torch.ones((), device=S.device)

    def step():
        inter, intra = fn(S, T)
        # autograd.grad, not .backward(): no S.grad accumulation kernel in the timed loop.
        torch.autograd.grad((inter, intra), (S,), (ones, ones))

    for _ in range(warmup):
        step()
    torch.cuda.synchronize(S.device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def benchmark_dist(B: int, C: int, device="cuda", iters: int = 200, tau: float = 2.0,
                   tau_squared: bool = True, dtype: torch.dtype = torch.float32, warmup: int = 20,
                   seed: int = 0) -> dict:
    """Time eager forward + backward of dist_terms with impl="torch" and impl="triton".

    Returns a dict: B, C, device, dtype, iters, triton_available, torch_ms, triton_ms, speedup
    (torch_ms / triton_ms), max_abs_diff (terms and grad, kernel vs twin on the same inputs) and note.
    Timings are None off CUDA (CUDA events need a GPU); triton entries are None when triton can't run.
    """
    from . import dist_terms, triton_available  # late: this module is imported by the package

    device = torch.device(device)
    out = {"B": B, "C": C, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "iters": iters, "triton_available": False, "torch_ms": None, "triton_ms": None,
           "speedup": None, "max_abs_diff": None, "note": ""}
    if device.type != "cuda" or not torch.cuda.is_available():
        out["note"] = "no CUDA device: nothing timed"
        return out
    gen = torch.Generator(device=device).manual_seed(seed)
    S = (3 * torch.randn(B, C, device=device, generator=gen)).to(dtype).requires_grad_(True)
    T = (3 * torch.randn(B, C, device=device, generator=gen)).to(dtype)

    def run(impl):
        return lambda s, t: dist_terms(s, t, tau, tau_squared, impl=impl)

    out["torch_ms"] = _time_fwd_bwd(run("torch"), S, T, iters, warmup)
    out["triton_available"] = triton_available(device)
    if not out["triton_available"]:
        out["note"] = "triton cannot run here: kernel not timed"
        return out
    out["triton_ms"] = _time_fwd_bwd(run("triton"), S, T, iters, warmup)
    out["speedup"] = out["torch_ms"] / out["triton_ms"]
    diffs = []
    for impl in ("torch", "triton"):
        inter, intra = dist_terms(S, T, tau, tau_squared, impl=impl)
        (g,) = torch.autograd.grad(inter + intra, S)
        diffs.append((inter, intra, g.float()))
    out["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(*diffs))
    out["note"] = "eager forward + backward, mean over iters, CUDA events"
    return out
