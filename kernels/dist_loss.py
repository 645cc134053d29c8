"""Fused DIST loss: both softmaxes, the inter and intra Pearson terms, and dL/dS in one launch each way.

Why: at the paper's batch of 30 the KD step is launch-bound (bench/RESULTS.md, "H100 anchors") and the torch twin
(`dali_erkt.losses.dist_terms_torch`) is ~30 small launches forward and more backward. Here the forward is ONE
program that streams the (B, C) logits in row chunks held in registers; the backward is one launch
of cdiv(B, BLOCK_R) programs (one for B <= BLOCK_R). No host sync anywhere, so it can sit inside a
CUDA graph.

Importing this module imports triton. Whether the kernels run compiled or in Triton's CPU
interpreter is fixed at import time by TRITON_INTERPRET (triton.jit reads it when decorating).

Backward derivation (g_* = upstream grads of the two scalars, k = tau^2 or 1, eps = 1e-8):
  Pearson of vectors a, b of length n: abar = a - mean(a), N = abar.bbar, D = |abar||bbar| + eps,
  rho = N / D. Centering is a symmetric projection P, so dN/da = P b = bbar and
  d|abar|/da = abar/|abar| (0 when |abar| = 0, as torch's norm backward), which gives
      drho/da = bbar / D - (N |bbar| / (|abar| D^2)) abar.
  inter = k/B sum_b (1 - rho_b) over rows, intra = k/C sum_c (1 - rho_c) over columns, so
      G[b, c] = dL/dp_s[b, c] = -(g_inter k / B) drho_b/da[c] - (g_intra k / C) drho_c/da[b].
  Row terms are local to a row chunk; column terms need whole-column statistics, which the forward
  saves as four length-C vectors (mean_s, mean_t, alpha = 1/D_c, beta = N_c|bbar_c|/(|abar_c| D_c^2)),
  so that drho_c/da[b] = alpha_c (p_t[b,c] - mean_t[c]) - beta_c (p_s[b,c] - mean_s[c]).
  Softmax of z/tau: dL/dz[b, :] = p_s[b, :] * (G[b, :] - sum_j G[b, j] p_s[b, j]) / tau.
  All means are corrected two-pass means (_centre_mean), so constant rows/columns centre to 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one register tile (BLOCK_R x BLOCK_C). 4096 fp32 over 8 warps is 16 values per thread
# per live tensor: room for the ~8 live tiles without spilling. Not tuned on a GPU yet.
TILE = 4096
MAX_COLS = 8192  # one row must fit a tile; beyond this the twin is the better tool anyway
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _probs(ptr, s_b, s_c, rows, cols, mask2d, cmask2d, tau):
    """softmax(x / tau) of a row chunk in fp32; padded columns get probability 0."""
    x = tl.load(ptr + rows[:, None] * s_b + cols[None, :] * s_c, mask=mask2d, other=0.0)
    # Divide (not multiply by 1/tau) to round like the twin's S / tau.
    x = tl.where(cmask2d, x.to(tl.float32) / tau, float("-inf"))
    # Padded rows loaded 0 in every real column, so their max is finite: no NaN from -inf - -inf.
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _chunk_probs(s_ptr, s_sb, s_sc, t_ptr, t_sb, t_sc, rows, cols, cmask2d, B, tau):
    """Student and teacher probabilities of one row chunk, with its row and 2-D masks."""
    rmask = rows < B
    mask2d = rmask[:, None] & cmask2d
    ps = _probs(s_ptr, s_sb, s_sc, rows, cols, mask2d, cmask2d, tau)
    pt = _probs(t_ptr, t_sb, t_sc, rows, cols, mask2d, cmask2d, tau)
    return rmask, mask2d, ps, pt


@triton.jit
def _centre_mean(x, mask, n, axis: tl.constexpr):
    """Mean along `axis`, refined by the mean of the residuals (corrected two-pass).

    A constant vector then centres to exact zeros, as the exact maths says: with eps = 1e-8 in
    the Pearson denominator, a one-ulp residue there would be amplified by up to 1/eps in the
    gradient.
    """
    m = tl.sum(x, axis=axis) / n
    if axis == 1:
        r = tl.where(mask, x - m[:, None], 0.0)
    else:
        r = tl.where(mask, x - m[None, :], 0.0)
    return m + tl.sum(r, axis=axis) / n


@triton.jit
def _row_pearson(ps, pt, cmask2d, C, eps):
    """Per-row centred tiles and Pearson pieces (N, |abar|, |bbar|, D) across the C real columns."""
    a = tl.where(cmask2d, ps - _centre_mean(ps, cmask2d, C, 1)[:, None], 0.0)
    b = tl.where(cmask2d, pt - _centre_mean(pt, cmask2d, C, 1)[:, None], 0.0)
    n = tl.sum(a * b, axis=1)
    na = tl.sqrt(tl.sum(a * a, axis=1))
    nb = tl.sqrt(tl.sum(b * b, axis=1))
    return a, b, n, na, nb, na * nb + eps


@triton.jit
def _dist_fwd_kernel(s_ptr, t_ptr, inter_ptr, intra_ptr, stats_ptr, B, C,
                     s_sb, s_sc, t_sb, t_sc, tau, scale, eps,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    cmask2d = cmask[None, :]
    r0 = tl.arange(0, BLOCK_R)

    # Pass 1: column sums (for the column means) and the per-row inter term.
    col_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    col_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    inter_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, B, BLOCK_R):
        rmask, mask2d, ps, pt = _chunk_probs(s_ptr, s_sb, s_sc, t_ptr, t_sb, t_sc, start + r0,
                                             cols, cmask2d, B, tau)
        col_s += tl.sum(tl.where(rmask[:, None], ps, 0.0), axis=0)
        col_t += tl.sum(tl.where(rmask[:, None], pt, 0.0), axis=0)
        a, b, n, na, nb, d = _row_pearson(ps, pt, cmask2d, C, eps)
        inter_acc += tl.where(rmask, 1.0 - n / d, 0.0)
    mean_s = col_s / B
    mean_t = col_t / B

    # Pass 2: centred column products. Two passes (recomputing the cheap softmax) rather than one
    # pass of raw moments, whose cancellation costs digits when a column barely varies.
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    res_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    res_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, B, BLOCK_R):
        rmask, mask2d, ps, pt = _chunk_probs(s_ptr, s_sb, s_sc, t_ptr, t_sb, t_sc, start + r0,
                                             cols, cmask2d, B, tau)
        a = tl.where(mask2d, ps - mean_s[None, :], 0.0)
        b = tl.where(mask2d, pt - mean_t[None, :], 0.0)
        acc_n += tl.sum(a * b, axis=0)
        acc_a += tl.sum(a * a, axis=0)
        acc_b += tl.sum(b * b, axis=0)
        res_a += tl.sum(a, axis=0)
        res_b += tl.sum(b, axis=0)
    # Corrected two-pass (as _centre_mean): remove the first mean's rounding residue from the
    # means and the centred moments, so a constant column gives exact zeros (see _centre_mean).
    mean_s += res_a / B
    mean_t += res_b / B
    acc_n -= res_a * res_b / B
    na = tl.sqrt(tl.maximum(acc_a - res_a * res_a / B, 0.0))
    nb = tl.sqrt(tl.maximum(acc_b - res_b * res_b / B, 0.0))
    d = na * nb + eps
    intra_sum = tl.sum(tl.where(cmask, 1.0 - acc_n / d, 0.0), axis=0)

    tl.store(inter_ptr, tl.sum(inter_acc, axis=0) / B * scale)
    tl.store(intra_ptr, intra_sum / C * scale)
    # Column statistics for the backward (see the module docstring).
    tl.store(stats_ptr + cols, mean_s, mask=cmask)
    tl.store(stats_ptr + C + cols, mean_t, mask=cmask)
    tl.store(stats_ptr + 2 * C + cols, 1.0 / d, mask=cmask)
    safe_na = tl.where(na > 0, na, 1.0)
    tl.store(stats_ptr + 3 * C + cols, tl.where(na > 0, acc_n * nb / (safe_na * d * d), 0.0), mask=cmask)


@triton.jit
def _dist_bwd_kernel(s_ptr, t_ptr, g_inter_ptr, g_intra_ptr, stats_ptr, gs_ptr, B, C,
                     s_sb, s_sc, t_sb, t_sc, g_sb, g_sc, tau, scale, eps,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    cmask2d = cmask[None, :]
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask, mask2d, ps, pt = _chunk_probs(s_ptr, s_sb, s_sc, t_ptr, t_sb, t_sc, rows, cols, cmask2d,
                                         B, tau)

    # Upstream grads are read on the device: no .item() sync, graph-capturable.
    w_inter = tl.load(g_inter_ptr).to(tl.float32) * scale / B
    w_intra = tl.load(g_intra_ptr).to(tl.float32) * scale / C

    a, b, n, na, nb, d = _row_pearson(ps, pt, cmask2d, C, eps)
    safe_na = tl.where(na > 0, na, 1.0)
    beta_r = tl.where(na > 0, n * nb / (safe_na * d * d), 0.0)
    drho_row = b / d[:, None] - a * beta_r[:, None]

    mean_s = tl.load(stats_ptr + cols, mask=cmask, other=0.0)
    mean_t = tl.load(stats_ptr + C + cols, mask=cmask, other=0.0)
    alpha_c = tl.load(stats_ptr + 2 * C + cols, mask=cmask, other=0.0)
    beta_c = tl.load(stats_ptr + 3 * C + cols, mask=cmask, other=0.0)
    drho_col = alpha_c[None, :] * (pt - mean_t[None, :]) - beta_c[None, :] * (ps - mean_s[None, :])

    g = tl.where(mask2d, -w_inter * drho_row - w_intra * drho_col, 0.0)
    gz = ps * (g - tl.sum(g * ps, axis=1)[:, None]) / tau
    tl.store(gs_ptr + rows[:, None] * g_sb + cols[None, :] * g_sc,
             gz.to(gs_ptr.dtype.element_ty), mask=mask2d)


def _blocks(B: int, C: int) -> tuple[int, int, int]:
    block_c = max(2, triton.next_power_of_2(C))
    block_r = max(1, min(triton.next_power_of_2(B), max(TILE, block_c) // block_c))
    num_warps = 4 if block_r * block_c <= 2048 else 8
    return block_r, block_c, num_warps


def check_inputs(S: torch.Tensor, T: torch.Tensor) -> None:
    """Raise if the fused kernel cannot take these tensors (the twin takes more)."""
    if S.ndim != 2 or S.shape != T.shape:
        raise ValueError(f"S and T must be (B, C) of one shape, got {tuple(S.shape)} and {tuple(T.shape)}")
    if S.shape[0] < 1 or S.shape[1] < 1:
        raise ValueError(f"empty logits {tuple(S.shape)}")
    if S.shape[1] > MAX_COLS:
        raise ValueError(f"C = {S.shape[1]} > {MAX_COLS}: use the torch twin")
    if S.dtype not in SUPPORTED_DTYPES or T.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtypes {S.dtype}, {T.dtype}: the kernel takes float16, bfloat16 or float32")
    if S.device != T.device:
        raise ValueError(f"S on {S.device}, T on {T.device}")


class DistTermsFunction(torch.autograd.Function):
    """(S, T) -> (inter, intra) fp32 scalars; gradient for S only (the teacher is frozen)."""

    @staticmethod
    def forward(ctx, S, T, tau: float, tau_squared: bool, eps: float):
        B, C = S.shape
        block_r, block_c, num_warps = _blocks(B, C)
        scale = float(tau) * float(tau) if tau_squared else 1.0
        inter = torch.empty((), device=S.device, dtype=torch.float32)
        intra = torch.empty((), device=S.device, dtype=torch.float32)
        stats = torch.empty((4, C), device=S.device, dtype=torch.float32)
        _dist_fwd_kernel[(1,)](S, T, inter, intra, stats, B, C,
                               S.stride(0), S.stride(1), T.stride(0), T.stride(1),
                               float(tau), scale, float(eps),
                               BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        ctx.save_for_backward(S, T, stats)
        ctx.params = (float(tau), scale, float(eps), block_r, block_c, num_warps)
        return inter, intra

    @staticmethod
    def backward(ctx, g_inter, g_intra):
        S, T, stats = ctx.saved_tensors
        tau, scale, eps, block_r, block_c, num_warps = ctx.params
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        B, C = S.shape
        grad_s = torch.empty_like(S)  # keeps S's dtype (and strides, passed below)
        _dist_bwd_kernel[(triton.cdiv(B, block_r),)](
            S, T, g_inter.contiguous(), g_intra.contiguous(), stats, grad_s, B, C,
            S.stride(0), S.stride(1), T.stride(0), T.stride(1), grad_s.stride(0), grad_s.stride(1),
            tau, scale, eps, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        return grad_s, None, None, None, None


def dist_terms_triton(S: torch.Tensor, T: torch.Tensor, tau: float = 2.0, tau_squared: bool = True,
                      eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's (inter, intra), as `dali_erkt.losses.dist_terms_torch` (T gets no gradient)."""
    check_inputs(S, T)
    if T.requires_grad and torch.is_grad_enabled():
        raise ValueError("the fused DIST kernel gives no gradient to T: detach the teacher logits "
                         "(or use the torch definition)")
    return DistTermsFunction.apply(S, T, float(tau), bool(tau_squared), float(eps))


@triton.jit
def _probe_kernel(x_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def probe(device: torch.device) -> bool:
    """Compile and run a trivial kernel on `device`: True when it gives the right answer."""
    x = torch.zeros(16, device=device, dtype=torch.float32)
    _probe_kernel[(1,)](x, N=16)
    return bool((x == 1.0).all().item())


def interpreted() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter."""
    return type(_dist_fwd_kernel).__name__ == "InterpretedFunction"
