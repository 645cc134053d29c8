"""The RTX 2060 path (fp16 autocast + GradScaler + torch.compile) through the project's own step,
proven as far as a CPU can: `make_train_step` with a `Supervised` task, a model compiled by
`runtime.compiled` (inductor, mode "default"), fp16 autocast on the CPU, an enabled
`torch.amp.GradScaler("cpu")` from `Runtime.grad_scaler()`, and the optimizer `make_optimizer`
builds for CUDA (fused AdamW), here on CPU parameters.

- an overflowing fp16 backward (the scale raised to 2**40) gives non-finite gradients (inf in
  fp16, NaN where infs meet in the reductions): the scaler skips the step (parameters and the
  optimizer's step counts unchanged) and halves its scale; back at 2**16 the next step trains;
- after the first step nothing recompiles (dynamo's counters, and error_on_recompile);
- the scaler's step and update read no tensor value back to the host (aten._local_scalar_dense,
  the op behind .item(), bool() and float(), counted under a TorchDispatchMode); the same counter
  sees one read per step with the foreach AdamW (the CPU path's optimizer), so it can see them;
- fp16-compiled, bf16-eager and fp32-eager runs of the same steps from the same weights give the
  same loss curve within stated tolerances.

The model is a small conv-BN-ReLU net, not a timm one: inductor's CPU compile of resnet10t's
forward and backward took 82 s on the 2-core CI machine against about 25 s for this net, and
none of the properties above depends on depth. `resolve_runtime` refuses fp16 on the CPU (it is
a GPU setting), so the Runtime is built directly.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dali_erkt.data.loader import Batch
from dali_erkt.engine import Supervised, make_optimizer, make_train_step
from dali_erkt.runtime import Runtime, compiled

CPU = torch.device("cpu")
STEPS, OVERFLOW_AT = 8, 5  # steps in all; the step whose backward overflows (0-based)
LR = 1e-2
# Per-step loss relative to fp32 eager, up to the overflow step: fp16 keeps 10 mantissa bits,
# bf16 7; measured on the 2-core CI machine: fp16 <= 2.0e-4, bf16 <= 4.1e-4 (torch 2.14.1).
REL_TOL = {"fp16": 2e-3, "bf16": 1e-2}

def tiny_net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    ).to(memory_format=torch.channels_last)


def batches(n: int, size: int = 32, classes: int = 4) -> list[Batch]:
    """Fixed CutMix-shaped batches of 8 (channels-last fp32 images, as the loader gives the CPU)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        images = torch.randn(8, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, classes, (8,), generator=g)
        out.append(Batch(images, labels, labels.roll(1), torch.rand(8, generator=g) * 0.5,
                         torch.arange(8) + 8 * i))
    return out


class HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense: every read of a tensor's value into Python (.item(),
    bool(), float(), int()) goes through it. Ops that never reach the dispatcher from Python are
    not seen; on CUDA, torch.cuda.set_sync_debug_mode is the full check (tests below, -m gpu)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountingScaler:
    """The real GradScaler, its step() and update() run under HostReads; all else delegated.
    `per_step`: the scaler's own reads per step (those inside optimizer.step, which the scaler
    calls, counted apart in `optimizer_reads`)."""

    def __init__(self, scaler):
        self.scaler, self.reads, self.per_step, self.optimizer_reads = scaler, HostReads(), [], []

    def __getattr__(self, name):
        return getattr(self.scaler, name)

    def step(self, optimizer):
        inner, plain_step = [0], optimizer.step

        def counted_step(*args, **kwargs):
            before = self.reads.count
            try:
                return plain_step(*args, **kwargs)
            finally:
                inner[0] += self.reads.count - before
        before = self.reads.count
        with self.reads, mock.patch.object(optimizer, "step", counted_step):
            out = self.scaler.step(optimizer)
        self._pending = (self.reads.count - before - inner[0], inner[0])
        return out

    def update(self, new_scale=None):
        before = self.reads.count
        with self.reads:
            self.scaler.update(new_scale)
        self.per_step.append(self._pending[0] + self.reads.count - before)
        self.optimizer_reads.append(self._pending[1])


def counters_now() -> dict:
    from torch._dynamo.utils import counters
    return {"frames_ok": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"],
            "aot_autograd": counters["aot_autograd"]["total"]}


def run(precision: str, compile_: bool, fused: bool = True, overflow: bool = False) -> dict:
    """STEPS steps of the project's train step from the same weights on the same batches."""
    torch._dynamo.reset()
    rt = Runtime(device=CPU, precision=precision, compile=compile_, compile_mode="default")
    model = tiny_net()
    opt = make_optimizer(model, LR, 0.05, torch.device("cuda" if fused else "cpu"))
    scaler = CountingScaler(rt.grad_scaler())
    step = make_train_step(compiled(model, rt), Supervised(), opt, scaler, rt)
    out = {"losses": [], "scales": [], "scaler": scaler, "counters": []}
    for i, batch in enumerate(batches(1) * STEPS):  # one batch: the loss falls
        if overflow and i == OVERFLOW_AT:
            scaler.scaler.update(2.0 ** 40)  # fp16 overflows in backward at this scale
            out["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            out["opt_before"] = [s["step"].clone() for s in opt.state.values()]
        if overflow and i == OVERFLOW_AT + 1:
            scaler.scaler.update(2.0 ** 16)  # back to a scale that fits: this step trains
        if i == 1:  # after the first (compiling) step: any later compile is a recompilation
            out["after_first"] = counters_now()
            recompile_guard = mock.patch.object(torch._dynamo.config, "error_on_recompile", True)
            recompile_guard.start()
        parts = step(batch)
        out["losses"].append(parts["loss"].item())
        out["scales"].append(scaler.get_scale() if scaler.is_enabled() else None)
        if overflow and i == OVERFLOW_AT:
            out["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            out["grads"] = [p.grad for p in model.parameters()]
            out["opt_after"] = [s["step"].clone() for s in opt.state.values()]
        if overflow and i == OVERFLOW_AT + 1:
            out["after_next"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recompile_guard.stop()
    out["counters"] = counters_now()
    return out


@pytest.fixture(scope="module")
def fp16():
    return run("fp16", compile_=True, overflow=True)


def test_runtime_enables_the_scaler_for_fp16_only():
    scalers = {p: Runtime(device=CPU, precision=p).grad_scaler() for p in ("fp16", "bf16", "fp32")}
    assert scalers["fp16"].is_enabled() and scalers["fp16"].get_scale() == 2.0 ** 16
    assert not scalers["bf16"].is_enabled() and not scalers["fp32"].is_enabled()


def test_fp16_autocast_runs_the_convolutions_in_fp16():
    model = tiny_net()
    with Runtime(device=CPU, precision="fp16").autocast():
        first = model[0](batches(1)[0].images)
    assert first.dtype == torch.float16


def test_overflow_skips_the_step_and_lowers_the_scale(fp16):
    assert all(not torch.isfinite(g).all() for g in fp16["grads"]), "scale 2**40 should overflow"
    params = [k for k in fp16["before"] if "running" not in k and "num_batches" not in k]
    for k in params:  # weights and biases untouched by the skipped step
        assert torch.equal(fp16["before"][k], fp16["after"][k]), k
    assert all(torch.equal(a, b) for a, b in zip(fp16["opt_before"], fp16["opt_after"]))
    assert fp16["scales"][OVERFLOW_AT] == 2.0 ** 39  # 2**40 times the backoff factor 0.5
    # Every other step ran at 2**16 (no natural overflow, no growth in 8 steps).
    assert set(fp16["scales"][:OVERFLOW_AT] + fp16["scales"][OVERFLOW_AT + 1:]) == {2.0 ** 16}
    # The next step trains again: finite losses, the weights move.
    assert all(torch.isfinite(torch.tensor(fp16["losses"])))
    assert all(not torch.equal(fp16["after"][k], fp16["after_next"][k]) for k in params)


def test_no_recompilation_after_the_first_step(fp16):
    first, last = fp16["after_first"], fp16["counters"]
    assert first["frames_ok"] >= 1 and first["unique_graphs"] >= 1 and first["aot_autograd"] >= 1
    assert last == first, f"compiled again after the first step: {first} -> {last}"


def test_scaler_reads_nothing_back_to_the_host(fp16):
    assert fp16["scaler"].per_step == [0] * STEPS
    assert fp16["scaler"].optimizer_reads == [0] * STEPS  # fused AdamW reads nothing back either


def test_the_counter_sees_the_foreach_optimizers_host_read():
    # Positive control: with the CPU path's foreach AdamW the scaler checks found_inf with .item()
    # once per step (GradScaler._maybe_opt_step), and the foreach AdamW reads each parameter's
    # step count (one per parameter tensor). Eager: the counter, not compile, is under test.
    out = run("fp16", compile_=False, fused=False)
    assert out["scaler"].per_step == [1] * STEPS
    assert out["scaler"].optimizer_reads == [len(list(tiny_net().parameters()))] * STEPS


def test_loss_curve_matches_bf16_and_fp32(fp16):
    ref = run("fp32", compile_=False)["losses"]
    bf16 = run("bf16", compile_=False)["losses"]
    assert len(ref) == len(fp16["losses"]) == STEPS
    # Compared up to the overflow step (its loss comes before its skipped update): after it the
    # fp16 run is one update behind by design.
    for name, losses in (("fp16", fp16["losses"]), ("bf16", bf16)):
        rel = [abs(a - b) / b for a, b in zip(losses[:OVERFLOW_AT + 1], ref[:OVERFLOW_AT + 1])]
        assert max(rel) <= REL_TOL[name], f"{name} vs fp32: {rel}"
    # Shape: the loss falls step by step in all three (one batch, lr 1e-2).
    for losses in (ref, bf16, fp16["losses"][:OVERFLOW_AT + 1]):
        assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_scaler_step_does_not_synchronise():
    """On CUDA: the scaler's step and update with fused AdamW under sync debug mode 'error'
    (any synchronising CUDA call raises)."""
    rt = Runtime(device=torch.device("cuda"), precision="fp16", compile=False)
    model = tiny_net().cuda()
    opt = make_optimizer(model, LR, 0.05, rt.device)
    scaler = rt.grad_scaler()
    b = batches(1)[0]
    b = Batch(*(t.cuda() for t in b))
    for i in range(3):
        with rt.autocast():
            loss = Supervised().losses(model, b.images.half(), b)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if i:  # the first step creates the scaler's and optimizer's state
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert scaler.get_scale() == 2.0 ** 16
