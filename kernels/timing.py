"""Timing of kernels against their PyTorch definitions (called by bench/throughput.py)."""
from __future__ import annotations

import torch


def _time(fn, S, T, iters: int, warmup: int) -> float:
    """Mean milliseconds of one forward + backward (grad w.r.t. S), timed with CUDA events."""
    def step():
        out = fn(S, T)
        # autograd.grad, not .backward(): no S.grad accumulation kernel in the timed loop.
        torch.autograd.grad(out, (S,), [torch.ones_like(o) for o in out])

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


def time_fwd_bwd(fns: dict, B: int, C: int, device="cuda", iters: int = 200, warmup: int = 20,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Eager forward + backward of each `fns[name](S, T) -> tuple of tensors` on the same (B, C)
    logits: {"<name>_ms": mean ms or None, "max_abs_diff": outputs and dL/dS against the first
    function, "note": ...}. Nothing is timed off CUDA (CUDA events need a GPU); a function that
    raises gets None and its error in the note."""
    device = torch.device(device)
    out = {"B": B, "C": C, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "iters": iters, "max_abs_diff": None, "note": ""}
    out.update({f"{name}_ms": None for name in fns})
    if device.type != "cuda" or not torch.cuda.is_available():
        out["note"] = "no CUDA device: nothing timed"
        return out
    gen = torch.Generator(device=device).manual_seed(seed)
    S = (3 * torch.randn(B, C, device=device, generator=gen)).to(dtype).requires_grad_(True)
    T = (3 * torch.randn(B, C, device=device, generator=gen)).to(dtype)
    results, notes = [], []
    for name, fn in fns.items():
        try:
            out[f"{name}_ms"] = _time(fn, S, T, iters, warmup)
        except Exception as exc:
            notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        terms = fn(S, T)
        (g,) = torch.autograd.grad(sum(terms), S)
        results.append([t.float() for t in terms] + [g.float()])
    if len(results) > 1:
        out["max_abs_diff"] = max(float((a - b).abs().max()) for r in results[1:]
                                  for a, b in zip(results[0], r))
    out["note"] = "; ".join(notes) or "eager forward + backward, mean over iters, CUDA events"
    return out
