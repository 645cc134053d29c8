"""The training recipe, one linear loop of named phases, for distillation and for fine-tuning a
teacher alike:

    set-up (model, optimizer, loaders) -> for each epoch: train_one_epoch -> evaluate -> save

What differs between the two is the task: `Distillation` (CE + the KD loss `loss.kind` chooses,
DIST by default, against the frozen teacher ensemble's logits, live or cached) or `Supervised`
(CutMix cross-entropy, how each teacher is fine-tuned). A task turns a batch into named loss
parts; the loop sums whatever parts it returns. The run folder (`RunDir`) owns every file the run
writes; what a checkpoint holds is a `RunState`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checkpoint import load_state, load_weights
from .config import Config, differences, to_dict
from .data.dataset import Split, split_sha256
from .data.loader import DaliLoader
from .errors import CheckpointError, ConfigError, TrainingError
from .evaluation import predict, scores
from .io import file_sha256
from .metrics import agreement
from .models import create_model, place
from .run_dir import RunDir
from .run_state import RunState
from .tasks import Distillation, Supervised  # noqa: F401 (the loop's tasks)
from .runtime import Runtime, all_reduce_mean, barrier, compiled

# --------------------------------------------------------------------------------------------
# Pieces of the loop.
# --------------------------------------------------------------------------------------------

def cosine_lr(base: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of `epoch` (0-based): cosine from `base` to 0 over the run."""
    if schedule == "constant":
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / epochs))


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    """AdamW; fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=torch.device(device).type == "cuda")


def make_train_step(model, task, optimizer, scaler, rt: Runtime):
    """One optimisation step on a `Batch`; returns the task's loss parts as device tensors."""
    def step(batch) -> dict:
        if rt.uses_cuda_graphs:  # the previous step's graph outputs may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with rt.autocast():
            parts = task.losses(model, batch.images.to(rt.input_dtype), batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return parts
    return step


def initial_model(cfg: Config, num_classes: int, rt: Runtime, log) -> torch.nn.Module:
    """The model a new run starts from: random, timm's hub weights, or cfg.model.weights (whose
    recorded SHA-256 must still match)."""
    m = cfg.model
    torch.manual_seed(cfg.run.seed + rt.rank)
    model = create_model(m.arch, num_classes, pretrained=m.pretrained)
    if m.weights:
        try:
            digest = file_sha256(m.weights)
        except OSError:
            raise CheckpointError(f"weights file {m.weights} cannot be read: check the path") from None
        if m.weights_sha256 and digest != m.weights_sha256:
            raise CheckpointError(f"{m.weights} changed since this configuration recorded it "
                                  f"(SHA-256 {digest[:12]}... vs {m.weights_sha256[:12]}...): "
                                  "pass the original file or --weights again")
        loaded, skipped = load_weights(model, m.weights, arch=m.arch, allow_head_mismatch=True, note=log)
        log(f"weights: {loaded} tensors loaded from {m.weights}" +
            (f"; left at initialisation: {', '.join(skipped)}" if skipped else ""))
    return model


def train_one_epoch(step, batches, task, rt: Runtime, log_every: int, bar) -> tuple[dict, int]:
    """Run `step` over one epoch's batches; the loss parts' means (host floats) and the images seen."""
    sums = torch.zeros(len(task.parts), device=rt.device)  # summed on the device
    seen = steps = 0
    for batch in batches:
        parts = step(batch)
        sums += torch.stack([parts[k].detach().float() for k in task.parts])
        n = batch.labels.shape[0]
        seen, steps = seen + n, steps + 1
        bar.update(n)
        if steps % log_every == 0:  # the only host read inside the epoch
            _check_finite(sums, steps)
            bar.set_postfix(loss=f"{sums[0].item() / steps:.4f}")
    _check_finite(sums, steps)
    means = all_reduce_mean(rt, sums / max(steps, 1)).tolist()
    return dict(zip(task.parts, means)), seen * rt.world


def _check_finite(sums: torch.Tensor, steps: int) -> None:
    if not torch.isfinite(sums).all().item():
        raise TrainingError(f"the loss became NaN or infinite by step {steps}")


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What the loop works with, built once in `setup`."""
    model: torch.nn.Module  # the plain model (saved, evaluated)
    step: object  # the compiled, distributed training step
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: DaliLoader
    test_loader: DaliLoader


def setup(cfg: Config, split: Split, task, rt: Runtime, state: RunState | None, log,
          state_path="last.pt") -> Setup:
    """Set-up phase: the model (fresh or from `state`), optimizer, scaler, loaders, the step."""
    num_classes = len(split.classes)
    if state is None:
        model = initial_model(cfg, num_classes, rt, log)
    else:
        model = create_model(cfg.model.arch, num_classes)
        load_state(model, state.model, state_path)
    model = place(model, rt.device, rt.channels_last)
    optimizer = make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, rt.device)
    scaler = rt.grad_scaler()
    if state is not None:
        _load_optimizer(optimizer, state.optimizer)
        scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.rng["torch"])
        if rt.device.type == "cuda" and state.rng.get("cuda") is not None:
            torch.cuda.set_rng_state(state.rng["cuda"], rt.device)
    trained = model
    if rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    step = make_train_step(compiled(trained, rt), task, optimizer, scaler, rt)
    train, test = split_loaders(split, cfg, rt)
    if not train.drop_last and train.source.per_rank % cfg.data.batch_size == 1 and \
            any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        n, bs = train.source.per_rank, cfg.data.batch_size
        other = next(b for b in range(bs + 1, n + 2) if n % b != 1)
        raise ConfigError(f"data.drop_last=false leaves a last training batch of one image ({n} "
                          f"images, batch size {bs}), which BatchNorm cannot train on: use "
                          f"--batch-size {other}, or data.drop_last=true")
    task.prepare(rt)
    return Setup(model, step, optimizer, scaler, train, test)


def split_loaders(split: Split, cfg: Config, rt: Runtime) -> tuple[DaliLoader, DaliLoader]:
    """A run's loaders: the training part (this rank's shard, augmented) and the test part."""
    return (DaliLoader.from_split(split, "train", cfg, device=rt.device, train=True, rank=rt.rank,
                                  world=rt.world),
            DaliLoader.from_split(split, "test", cfg, device=rt.device, train=False))


def _load_optimizer(optimizer, saved: dict) -> None:
    """Load an optimizer state, refusing one whose moments do not fit this model's parameters."""
    try:
        optimizer.load_state_dict(saved)
        fits = all(t.shape == p.shape for p, st in optimizer.state.items() for t in st.values()
                   if torch.is_tensor(t) and t.ndim > 0)
    except (ValueError, KeyError, RuntimeError):
        fits = False
    if not fits:
        raise CheckpointError("the checkpoint's optimizer state belongs to another model: cannot resume")


def fit(cfg: Config, split: Split, out_dir, task, rt: Runtime, resume: bool = False,
        allow_changes: bool = False, progress: bool = True) -> dict:
    """Train cfg.model.arch on `split` for cfg.optim.epochs with `task`; return the summary."""
    log = main_logger(rt)
    with RunDir(out_dir, rt.main, cfg.run.tensorboard) as run:  # holds the folder's lock until the run ends
        state = run.open(resume, log)
        if state is not None:
            state.check_split(split.folder, split_sha256(split), allow_changes, log)
            _check_resumable(state, cfg, task, split.classes, run, allow_changes, log)
            if state.epoch >= cfg.optim.epochs:  # killed after its last epoch: complete it
                summary = _summary(task.kind, cfg.model.arch, split.classes, state.history,
                                   state.best, rt, sum(r["train_seconds"] for r in state.history))
                run.write_log(state.history)
                run.write_summary(summary)
                return summary
        s = setup(cfg, split, task, rt, state, log, run.last)
        run.write_config(cfg)
        start, history, best = (0, [], {"oa": -1.0, "epoch": -1}) if state is None else \
            (state.epoch, state.history, state.best)
        # The teacher is frozen: its test predictions are computed once, for the agreement metric.
        teacher_preds = task.test_predictions(s.test_loader, rt) if rt.main else None
        epochs, name, t_run = cfg.optim.epochs, f"{task.kind} {cfg.model.arch}", time.time()
        for epoch in range(start, epochs):
            lr = cosine_lr(cfg.optim.lr, epoch, epochs, cfg.optim.schedule)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            s.model.train()
            bar = tqdm(total=s.train_loader.batches_per_epoch * cfg.data.batch_size, unit="img", leave=False,
                       desc=f"{name} {epoch + 1}/{epochs}", disable=not (progress and rt.main),
                       dynamic_ncols=True, file=sys.stderr)
            t0 = time.time()
            with bar, _failures(epoch, run, rt, cfg):
                parts, seen = train_one_epoch(s.step, task.epoch_batches(s.train_loader, epoch), task,
                                              rt, cfg.run.log_every, bar)
            seconds = time.time() - t0
            record = {"epoch": epoch + 1, "lr": lr, **parts, "train_images": seen,
                      "train_seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 2)}
            ev = None
            if rt.main and ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == epochs):
                with _failures(epoch, run, rt, cfg):
                    preds, targets = predict(s.model, s.test_loader, rt)
                ev = scores(preds, targets, len(split.classes))
                record["oa"] = ev["oa"]
                record["per_class"] = [None if v != v else v for v in ev["per_class"]]  # NaN: no image
                if teacher_preds is not None:
                    record["agreement"] = agreement(preds, teacher_preds)
                if record["oa"] > best["oa"]:
                    best = {"oa": record["oa"], "epoch": epoch + 1}
            history.append(record)
            _check_weights(s.model, epoch, run, rt)
            run.save(_checkpoint(task, cfg, split, epoch, s, history, best, rt), best["epoch"] == epoch + 1)
            if ev is not None:
                run.write_confusion(ev["cm"], split.classes, epoch + 1)
            log(_epoch_line(name, record, best, epochs))
            barrier(rt)
        summary = _summary(task.kind, cfg.model.arch, split.classes, history, best, rt, time.time() - t_run)
        run.write_summary(summary)
        return summary


# --------------------------------------------------------------------------------------------
# Helpers of `fit`.
# --------------------------------------------------------------------------------------------

def main_logger(rt: Runtime):
    """One line to stderr from the main process (kept apart from the progress bar)."""
    return lambda line: tqdm.write(line, file=sys.stderr) if rt.main else None


class _failures:
    """Turns a failure inside an epoch into one line that says what is kept."""

    def __init__(self, epoch: int, run: RunDir, rt: Runtime, cfg: Config):
        self.epoch, self.run, self.rt, self.cfg = epoch, run, rt, cfg

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        kept = (f"the last good checkpoint {self.run.last} is intact" if self.run.last.exists()
                else "no checkpoint was written yet")
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise TrainingError(f"out of GPU memory at batch size {self.cfg.data.batch_size} in epoch "
                                f"{self.epoch + 1}: lower --batch-size, set data.prefetch=1, or "
                                f"--no-compile; {kept}") from None
        if isinstance(exc, TrainingError):
            advice = "lower optim.lr" + ("" if self.rt.precision == "fp32" else " or use --precision fp32")
            raise TrainingError(f"{exc} of epoch {self.epoch + 1}: {advice}; {kept}") from None
        return False


def _check_weights(model, epoch: int, run: RunDir, rt: Runtime) -> None:
    """A checkpoint never holds non-finite weights or buffers (an update can overflow after a
    finite loss; BatchNorm's running statistics can too)."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    finite = torch.stack([t.isfinite().all() for t in tensors]).all()
    if not finite.item():
        with _failures(epoch, run, rt, None):
            raise TrainingError("the weights became NaN or infinite after the last step")


# Settings a resumed run may change and stay exact: where and how fast it runs, what it logs.
HARMLESS_CHANGES = ("data.num_threads", "data.prefetch", "run.device", "run.compile",
                    "run.compile_mode", "run.log_every", "run.eval_every", "run.tensorboard")


def _check_resumable(state: RunState, cfg: Config, task, classes, run: RunDir, allow_changes: bool,
                     log) -> None:
    changes = differences(to_dict(state.stored_config()), to_dict(cfg))
    for key, old, new in changes:
        if key in HARMLESS_CHANGES or allow_changes:
            log(f"resume: {key} changed from {old} to {new}")
    breaking = [c for c in changes if c[0] not in HARMLESS_CHANGES]
    if breaking and not allow_changes:
        key, old, new = breaking[0]
        more = f" (and {len(breaking) - 1} more)" if len(breaking) > 1 else ""
        raise ConfigError(f"--resume with {key} = {new}, but the run has {old}{more}: the resumed "
                          "run would not be the one started; pass --allow-changes to resume anyway")
    if state.kind != task.kind:
        raise CheckpointError(f"{run.last} is a {state.kind} run; resume it with "
                              f"`dali-erkt {'train-teacher' if state.kind == 'teacher' else 'distill'}`")
    if state.arch != cfg.model.arch:
        raise CheckpointError(f"{run.last} is a run of {state.arch}, not {cfg.model.arch}: cannot resume it")
    if state.classes != list(classes):
        raise CheckpointError(f"{run.last} was trained on other classes than this split: cannot resume")
    if state.epoch >= cfg.optim.epochs and run.summary.exists():
        raise CheckpointError(f"{run.last} has finished all {cfg.optim.epochs} epochs: nothing to resume "
                              "(raise optim.epochs and pass --allow-changes to train longer)")


def _checkpoint(task, cfg, split, epoch, s: Setup, history, best, rt: Runtime) -> RunState:
    """The run's state after (0-based) `epoch`: `epoch + 1` epochs done."""
    cuda = torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None
    return RunState(kind=task.kind, arch=cfg.model.arch, classes=list(split.classes),
                    model=s.model.state_dict(), config=to_dict(cfg), epoch=epoch + 1,
                    optimizer=s.optimizer.state_dict(), scaler=s.scaler.state_dict(),
                    history=history, best=best, rng={"torch": torch.get_rng_state(), "cuda": cuda},
                    split={"folder": split.folder, "sha256": split_sha256(split)})


def _epoch_line(name: str, r: dict, best: dict, epochs: int) -> str:
    oa = f" oa {r['oa'] * 100:.2f}%" if "oa" in r else ""
    agree = f" agree {r['agreement'] * 100:.1f}%" if "agreement" in r else ""
    best_text = f" best {best['oa'] * 100:.2f}% (epoch {best['epoch']})" if best["epoch"] > 0 else ""
    return (f"{name} epoch {r['epoch']}/{epochs} loss {r['loss']:.4f}{oa}{agree}{best_text} "
            f"{r['images_per_s']:.0f} img/s")


def _summary(kind, arch, classes, history, best, rt: Runtime, seconds) -> dict:
    evaluated = [r for r in history if "oa" in r]
    last = evaluated[-1] if evaluated else {}
    return {"kind": kind, "arch": arch, "classes": list(classes), "epochs": len(history),
            "last_oa": last.get("oa"), "last_epoch": last.get("epoch"),
            "best_oa": best["oa"] if best["epoch"] > 0 else None, "best_epoch": best["epoch"],
            "agreement": last.get("agreement"), "precision": rt.precision, "device": str(rt.device),
            "images_per_s": history[-1]["images_per_s"] if history else None,
            "seconds": round(seconds, 2),
            "per_class": dict(zip(classes, last["per_class"])) if "per_class" in last else None}
