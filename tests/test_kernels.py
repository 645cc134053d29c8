"""The fused DIST Triton kernel against the loss's PyTorch definition, and the dispatch in
dali_erkt.losses.

Triton kernels run here through Triton's CPU interpreter. The comparisons run in ONE subprocess
started with TRITON_INTERPRET=1, not in the pytest process: triton.jit decides interpreted vs
compiled when a kernel module is imported, so a flag set at the top of this file would be too late
if any earlier test had imported the kernel module, and setting it process-wide could change how
other tests' torch/Triton code behaves. The subprocess imports this file and calls `_worker()`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Main grid: non-powers of two, the paper's (30, C) shapes, a 2-row batch, a 128 batch.
SHAPES = [(30, 7), (30, 45), (2, 3), (128, 50)]
TAUS = [1.0, 2.0, 4.0]
GRID = [dict(name=f"{B}x{C}-tau{tau:g}-sq{int(sq)}-{dt}", B=B, C=C, tau=tau, sq=sq, dtype=dt)
        for (B, C) in SHAPES for tau in TAUS for sq in (True, False) for dt in ("float32", "float16")]
EXTRA = [
    dict(name="multichunk-300x45", B=300, C=45, tau=2.0, sq=True, dtype="float32"),  # 3 row chunks
    dict(name="wide-4x1000", B=4, C=1000, tau=2.0, sq=True, dtype="float32"),  # 1024-wide tile
    dict(name="one-row-1x5", B=1, C=5, tau=2.0, sq=True, dtype="float32"),  # every column constant
    dict(name="bf16-30x45", B=30, C=45, tau=2.0, sq=True, dtype="bfloat16"),
    dict(name="mixed-s16-t32", B=30, C=45, tau=2.0, sq=True, dtype="float16", t_dtype="float32"),
    dict(name="noncontig-30x45", B=30, C=45, tau=2.0, sq=True, dtype="float32", transposed=True),
    dict(name="const-rows-12x9", B=12, C=9, tau=2.0, sq=True, dtype="float32", kind="const_rows"),
    dict(name="equal-30x45", B=30, C=45, tau=2.0, sq=True, dtype="float32", kind="equal"),
    dict(name="big-logits-30x45", B=30, C=45, tau=1.0, sq=True, dtype="float32", scale=60.0),
    dict(name="inter-only-30x45", B=30, C=45, tau=2.0, sq=True, dtype="float32", weights=(1.0, None)),
]
CASES = GRID + EXTRA

# Stated tolerances. Both sides compute in fp32 from the same input values, so the loss terms
# agree to fp32 rounding whatever the input dtype. The gradient is returned in the input dtype:
# bound by a fraction of the largest gradient entry (a couple of ulps of that dtype), plus a floor.
TERM_ATOL, TERM_RTOL = 1e-5, 1e-5
GRAD_REL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
GRAD_FLOOR = 1e-7


from dali_erkt import kernels, losses  # noqa: E402


def _inputs(case):
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))  # stable across processes
    B, C = case["B"], case["C"]
    scale = case.get("scale", 3.0)
    S = scale * torch.randn(B, C, generator=gen)
    T = scale * torch.randn(B, C, generator=gen)
    if case.get("kind") == "const_rows":
        S = S[:1].expand(B, C).clone()  # every column of p_s and p_t is constant
        T = T[:1].expand(B, C).clone()
    elif case.get("kind") == "equal":
        T = S.clone()
    S = S.to(getattr(torch, case["dtype"]))
    T = T.to(getattr(torch, case.get("t_dtype", case["dtype"])))
    if case.get("transposed"):
        S = S.t().contiguous().t()  # same values, strides (1, B)
    return S, T


def _run_case(case, impl):
    S, T = _inputs(case)
    S.requires_grad_(True)
    inter, intra = losses.dist_terms(S, T, tau=case["tau"], tau_squared=case["sq"], impl=impl)
    w_inter, w_intra = case.get("weights", (0.7, 1.3))
    # Unequal weights check each term's upstream gradient; w_intra None leaves intra out of the
    # graph, so its upstream gradient arrives as None (materialised as zeros).
    loss = w_inter * inter if w_intra is None else w_inter * inter + w_intra * intra
    (grad,) = torch.autograd.grad(loss, S)
    return inter, intra, grad


def _worker():
    """Runs in the interpreter subprocess: kernel vs twin on every case, JSON on stdout."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dali_erkt.kernels import dist_loss
    out = {"interpreted": dist_loss.interpreted(), "available_cpu": kernels.triton_available("cpu"),
           "cases": {}}
    for case in CASES:
        ki, kj, kg = _run_case(case, "triton")
        ri, rj, rg = _run_case(case, "torch")
        out["cases"][case["name"]] = dict(
            d_inter=abs(ki.item() - ri.item()), d_intra=abs(kj.item() - rj.item()),
            inter=ri.item(), intra=rj.item(), term_dtypes=[str(ki.dtype), str(kj.dtype)],
            d_grad=float((kg.float() - rg.float()).abs().max()), g_max=float(rg.float().abs().max()),
            grad_dtype=str(kg.dtype), ref_grad_dtype=str(rg.dtype),
            grad_strides=list(kg.stride()), finite=bool(torch.isfinite(kg.float()).all()))
    # Dispatch under the interpreter: auto still picks the twin for CPU tensors, even if enabled.
    kernels.set_triton_dist_enabled(True)
    S, T = _inputs(CASES[0])
    out["auto_cpu_enabled"] = losses.dist_impl(S, T, "auto")
    # The kernel gives T no gradient, so a T that needs one is refused rather than silently cut.
    try:
        losses.dist_terms(S, T.requires_grad_(True), impl="triton")
        out["t_grad_refused"] = False
    except ValueError:
        out["t_grad_refused"] = True
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def interp():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_kernels; test_kernels._worker()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_interpreter_runs_kernels(interp):
    assert interp["interpreted"] is True
    assert interp["available_cpu"] is True


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_twin(interp, case):
    r = interp["cases"][case["name"]]
    assert r["term_dtypes"] == ["torch.float32", "torch.float32"]
    assert r["d_inter"] <= TERM_ATOL + TERM_RTOL * abs(r["inter"]), r
    assert r["d_intra"] <= TERM_ATOL + TERM_RTOL * abs(r["intra"]), r
    assert r["finite"], r
    assert r["grad_dtype"] == r["ref_grad_dtype"] == f"torch.{case['dtype']}"
    assert r["d_grad"] <= GRAD_FLOOR + GRAD_REL[case["dtype"]] * r["g_max"], r
    if case.get("transposed"):
        assert r["grad_strides"] == [1, case["B"]]  # grad keeps S's layout


def test_degenerate_cases_have_known_values(interp):
    # One row: each column has one sample, so its Pearson is 0/eps = 0 and intra is exactly tau^2.
    assert interp["cases"]["one-row-1x5"]["intra"] == pytest.approx(4.0)
    # Constant columns on both sides: same, intra = tau^2.
    assert interp["cases"]["const-rows-12x9"]["intra"] == pytest.approx(4.0)
    # Identical logits: both correlations are 1, both terms 0.
    eq = interp["cases"]["equal-30x45"]
    assert abs(eq["inter"]) < 1e-5 and abs(eq["intra"]) < 1e-5


def test_interpreter_dispatch(interp):
    assert interp["auto_cpu_enabled"] == "torch"
    assert interp["t_grad_refused"] is True


# ---- twin and dispatch in this process (no Triton needed) --------------------------------------

def _loop_dist(S, T, tau, sq, eps=1e-8):
    """DIST written row by row and column by column in float64, independent of the twin's code."""
    p_s = torch.softmax(S.double() / tau, 1)
    p_t = torch.softmax(T.double() / tau, 1)

    def rho(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm() + eps))

    B, C = S.shape
    inter = sum(1 - rho(p_s[i], p_t[i]) for i in range(B)) / B
    intra = sum(1 - rho(p_s[:, j], p_t[:, j]) for j in range(C)) / C
    k = tau * tau if sq else 1.0
    return k * inter, k * intra


@pytest.mark.parametrize("tau,sq", [(1.0, True), (2.0, True), (4.0, False)])
def test_twin_matches_loop_definition(tau, sq):
    g = torch.Generator().manual_seed(3)
    S, T = 3 * torch.randn(17, 6, generator=g), 3 * torch.randn(17, 6, generator=g)
    inter, intra = losses.dist_terms_torch(S, T, tau, sq)
    li, lj = _loop_dist(S, T, tau, sq)
    assert inter.dtype == intra.dtype == torch.float32
    assert float(inter) == pytest.approx(li, abs=1e-5)
    assert float(intra) == pytest.approx(lj, abs=1e-5)


def test_twin_half_inputs_fp32_terms_half_grad():
    S = torch.randn(30, 45).half().requires_grad_(True)
    T = torch.randn(30, 45).half()
    inter, intra = losses.dist_terms_torch(S, T)
    assert inter.dtype == intra.dtype == torch.float32
    (g,) = torch.autograd.grad(inter + intra, S)
    assert g.dtype == torch.float16 and torch.isfinite(g).all()


def test_auto_falls_back_to_twin_on_cpu(monkeypatch):
    monkeypatch.setenv(kernels.ENV_ENABLE_DIST, "1")
    monkeypatch.setattr(kernels, "_dist_enabled", True)
    assert kernels.triton_dist_enabled()
    S = torch.randn(30, 45, requires_grad=True)
    T = torch.randn(30, 45)
    assert losses.dist_impl(S, T, "auto") == "torch"
    # The Triton module must not even be looked up for CPU tensors.
    monkeypatch.setattr(kernels, "_dist_loss_module", lambda: pytest.fail("triton path taken"))
    got = losses.dist_terms(S, T, impl="auto")
    want = losses.dist_terms_torch(S, T)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kernel_disabled_by_default(monkeypatch):
    monkeypatch.delenv(kernels.ENV_ENABLE_DIST, raising=False)
    monkeypatch.setattr(kernels, "_dist_enabled", None)
    assert kernels.triton_dist_enabled() is False
    monkeypatch.setenv(kernels.ENV_ENABLE_DIST, "1")
    assert kernels.triton_dist_enabled() is True
    kernels.set_triton_dist_enabled(False)  # the module flag overrides the environment
    assert kernels.triton_dist_enabled() is False


def test_bad_impl_rejected():
    S = torch.randn(4, 3)
    with pytest.raises(ValueError):
        losses.dist_terms(S, S, impl="cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the compiled-mode answer")
def test_without_the_interpreter_cpu_tensors_get_no_kernel():
    """Compiled Triton kernels need CUDA: in this process (no TRITON_INTERPRET) the CPU answer is
    no, the kernel refuses CPU tensors in one clear error, and the loss never picks it."""
    assert kernels.triton_available("cpu") is False
    S = torch.randn(4, 3)
    assert kernels.dist_kernel_accepts(S, S) is False
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        losses.dist_terms(S, S, impl="triton")
    kernels.set_triton_dist_enabled(True)
    try:
        assert losses.dist_impl(S, S, "auto") == "torch"
    finally:
        kernels.set_triton_dist_enabled(None)


def test_timing_on_cpu_returns_none_timings():
    fns = {"torch": lambda S, T: losses.dist_terms(S, T, impl="torch"),
           "triton": lambda S, T: losses.dist_terms(S, T, impl="triton")}
    r = kernels.time_fwd_bwd(fns, 30, 45, "cpu", iters=3)
    assert r["torch_ms"] is None and r["triton_ms"] is None and r["max_abs_diff"] is None
    assert (r["B"], r["C"]) == (30, 45) and "no CUDA" in r["note"]
