"""The training loop: one linear recipe for distillation and for fine-tuning a teacher.

    split -> DALI loaders -> [frozen teacher ensemble] -> student step -> evaluate -> log, checkpoint

`fit` trains `arch` on a split. With a teacher it distils (CE + DIST, the ERKT loss); without
one it fine-tunes with CutMix cross-entropy (how each teacher is trained before ensembling).
Every run writes into its folder: `config.yaml` (the fully resolved configuration), `log.jsonl`
(one line per epoch), `last.pt` and `best.pt` (atomic; everything needed to continue) and
`summary.json`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, save_config, to_dict
from .data.dataset import Split
from .data.loader import DaliLoader
from .io import atomic_write_text
from .losses import cutmix_cross_entropy, erkt_loss
from .metrics import ConfusionMeter, agreement, overall_accuracy, per_class_accuracy
from .models import TeacherEnsemble, create_model
from .precision import autocast_context, choose_precision, make_grad_scaler, resolve_device


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, out of memory); the message is one line."""


# --------------------------------------------------------------------------------------------
# Distributed set-up (torchrun): one process per GPU, one DALI pipeline per process.
# --------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    return Dist(dist.get_rank(), world, local)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Pieces of the loop.
# --------------------------------------------------------------------------------------------

def cosine_lr(base: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of `epoch` (0-based): cosine from `base` to 0 over the run."""
    if schedule == "constant":
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / epochs))


def use_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.run.compile == "on" or (cfg.run.compile == "auto" and device.type == "cuda")


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def input_dtype(precision: str) -> torch.dtype:
    """What the images are cast to before the models: autocast handles fp16/bf16 itself."""
    return torch.float32 if precision == "fp32" else torch.float16


@torch.no_grad()
def predict(model, loader: DaliLoader, device, precision: str) -> tuple:
    """Logits' argmax and targets for a whole split, kept on the device (no host reads).

    The loader is not re-positioned: evaluation epochs are all alike, and the live pipeline
    simply goes on with its next one (re-positioning would rebuild it).
    """
    was_training = model.training
    model.eval()
    preds, targets = [], []
    for batch in loader:
        with autocast_context(device, precision):
            logits = model(batch.images.to(input_dtype(precision)))
        preds.append(logits.argmax(1))
        targets.append(batch.labels)
    model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


def make_optimizer(model, cfg: Config, device) -> torch.optim.Optimizer:
    """AdamW; fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                             fused=torch.device(device).type == "cuda")


def compile_models(student, teacher, cfg: Config, device):
    """The student and teacher as the hot loop calls them: under torch.compile where enabled
    (reduce-overhead mode captures CUDA graphs; static shapes come from drop_last)."""
    if not use_compile(cfg, device):
        return student, teacher
    mode = cfg.run.compile_mode
    return (torch.compile(student, mode=mode),
            None if teacher is None else torch.compile(teacher, mode=mode))


def make_train_step(student, teacher, optimizer, scaler, cfg: Config, device, precision: str):
    """One optimisation step on a `Batch`: teacher forward (if any), student forward and backward,
    optimizer step. Returns the loss parts as device tensors (no host read)."""
    in_dtype = input_dtype(precision)
    # CUDA-graph trees (reduce-overhead) reuse output memory between replays: marking each step
    # tells them the previous step's outputs are no longer needed.
    mark_step = (torch.device(device).type == "cuda" and use_compile(cfg, torch.device(device))
                 and "reduce-overhead" in cfg.run.compile_mode)

    def step(batch) -> dict:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        images = batch.images.to(in_dtype)
        with autocast_context(device, precision):
            target = teacher(images) if teacher is not None else None
            logits = student(images)
        if target is None:
            ce = cutmix_cross_entropy(logits, batch.labels, batch.partner_labels, batch.mix_weight)
            parts = {"loss": ce, "ce": ce, "inter": ce * 0, "intra": ce * 0}
        else:
            parts = erkt_loss(logits, target, batch.labels, batch.partner_labels, batch.mix_weight,
                              cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return parts

    return step


def evaluate_predictions(preds, targets, num_classes: int) -> dict:
    meter = ConfusionMeter(num_classes)
    meter.update(preds, targets)
    cm = meter.matrix()
    return {"oa": overall_accuracy(cm), "per_class": per_class_accuracy(cm).tolist(), "cm": cm}


def _oom_message(cfg: Config) -> str:
    return (f"out of GPU memory at batch size {cfg.data.batch_size}: lower it (--batch-size), "
            f"set data.prefetch=1, or run.compile=off; teachers at {cfg.data.image_size} px need "
            f"about 4-5 GiB at batch 30 in fp16")


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------

def fit(cfg: Config, split: Split, out_dir, arch: str, teacher: TeacherEnsemble | None = None,
        weights=None, resume: bool = False, progress: bool = True, kind: str | None = None) -> dict:
    """Train `arch` on `split` for cfg.optim.epochs; distil from `teacher` when given."""
    out = Path(out_dir)
    kind = kind or ("student" if teacher is not None else "teacher")
    dist = init_distributed()
    device = resolve_device(cfg.run.device) if dist.world == 1 else torch.device("cuda", dist.local_rank)
    precision = choose_precision(device, cfg.run.precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    classes = list(split.classes)
    num_classes = len(classes)

    last_path, best_path = out / "last.pt", out / "best.pt"
    state = None
    if resume:
        state = load_checkpoint(last_path)
        _check_resumable(state, cfg, arch, classes, last_path)
    elif last_path.exists():
        raise ConfigError(f"{out} already holds a run ({last_path.name}): pass --resume to continue "
                          "it or choose another --out")

    torch.manual_seed(cfg.run.seed + dist.rank)
    model = create_model(arch, num_classes, pretrained=cfg.model.pretrained and state is None,
                         weights=weights if state is None else None)
    if state is not None:
        model.load_state_dict(state["model"])
    model = prepare(model, device, cfg.run.channels_last)
    if teacher is not None:
        teacher = prepare(teacher, device, cfg.run.channels_last)

    optimizer = make_optimizer(model, cfg, device)
    scaler = make_grad_scaler(device, precision)
    start_epoch, history = 0, []
    best = {"oa": -1.0, "epoch": -1}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    train_loader = DaliLoader(split.paths("train"), split.labels("train"), cfg, device, train=True,
                              seed=cfg.run.seed, rank=dist.rank, world=dist.world)
    test_loader = DaliLoader(split.paths("test"), split.labels("test"), cfg, device, train=False)

    student_step, teacher_fwd = compile_models(model, teacher, cfg, device)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        student_step = DistributedDataParallel(student_step, device_ids=[dist.local_rank])

    # The teacher is frozen: its test predictions are computed once, for the agreement metric.
    teacher_preds = None
    if teacher is not None and dist.main:
        teacher_preds, _ = predict(teacher, test_loader, device, precision)

    step_fn = make_train_step(student_step, teacher_fwd, optimizer, scaler, cfg, device, precision)
    epochs = cfg.optim.epochs
    run_start = time.time()
    for epoch in range(start_epoch, epochs):
        lr = cosine_lr(cfg.optim.lr, epoch, epochs, cfg.optim.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        train_loader.set_epoch(epoch)
        sums = torch.zeros(4, device=device)  # loss, ce, inter, intra: summed on the device
        seen, t0 = 0, time.time()
        bar = tqdm(total=len(train_loader) * cfg.data.batch_size, unit="img", leave=False,
                   desc=f"{kind} {arch} {epoch + 1}/{epochs}", disable=not (progress and dist.main),
                   dynamic_ncols=True)
        try:
            for step, batch in enumerate(train_loader):
                parts = step_fn(batch)
                sums += torch.stack([parts[k].detach().float() for k in ("loss", "ce", "inter", "intra")])
                seen += len(batch)
                bar.update(len(batch))
                if (step + 1) % cfg.run.log_every == 0:  # the only host read inside the epoch
                    _check_finite(sums, epoch, step, last_path)
                    bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.4f}",
                                    eta=_eta(run_start, epoch - start_epoch, epochs - epoch, bar))
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(_oom_message(cfg)) from None
        finally:
            bar.close()
        steps = max(len(train_loader), 1)
        _check_finite(sums, epoch, steps - 1, last_path)
        means = (sums / steps).tolist()
        train_time = time.time() - t0

        record = {"epoch": epoch + 1, "lr": lr, "loss": means[0], "ce": means[1],
                  "inter": means[2], "intra": means[3], "train_images": seen * dist.world,
                  "train_seconds": round(train_time, 3),
                  "images_per_s": round(seen * dist.world / max(train_time, 1e-9), 2)}
        if dist.main and ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == epochs):
            try:
                preds, targets = predict(model, test_loader, device, precision)
            except torch.cuda.OutOfMemoryError:
                raise TrainingError(_oom_message(cfg)) from None
            ev = evaluate_predictions(preds, targets, num_classes)
            record["oa"] = ev["oa"]
            if teacher_preds is not None:
                record["agreement"] = agreement(preds, teacher_preds)
            if ev["oa"] > best["oa"]:
                best = {"oa": ev["oa"], "epoch": epoch + 1}
        history.append(record)

        if dist.main:
            ckpt = {"kind": kind, "arch": arch, "classes": classes, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "history": history, "best": best,
                    "config": to_dict(cfg), "rng": _rng_state(device)}
            save_checkpoint(last_path, ckpt)
            if best["epoch"] == epoch + 1:
                save_checkpoint(best_path, ckpt)
            _write_log(out, history)
            if progress:
                tqdm.write(_epoch_line(f"{kind} {arch}", record, best, epochs), file=sys.stderr)
        _barrier(dist)

    summary = _summary(kind, arch, classes, history, best, precision, device, time.time() - run_start)
    if dist.main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _check_resumable(state: dict, cfg: Config, arch: str, classes: list, path: Path) -> None:
    for key in ("model", "optimizer", "scaler", "epoch", "history", "best", "rng", "arch"):
        if key not in state:
            raise CheckpointError(f"{path} is not a dali-erkt run checkpoint (no {key!r}): cannot resume")
    if state["arch"] != arch:
        raise CheckpointError(f"{path} is a run of {state['arch']}, not {arch}: cannot resume it")
    if list(state.get("classes", [])) != classes:
        raise CheckpointError(f"{path} was trained on other classes than this split: cannot resume")
    if state["epoch"] + 1 >= cfg.optim.epochs:
        raise CheckpointError(f"{path} has finished all {cfg.optim.epochs} epochs: nothing to resume "
                              "(raise optim.epochs to train longer)")


def _check_finite(sums: torch.Tensor, epoch: int, step: int, last_path: Path) -> None:
    if not torch.isfinite(sums).all().item():
        kept = f"the last good checkpoint {last_path} is intact" if last_path.exists() else \
            "no checkpoint was written yet"
        raise TrainingError(f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1}: "
                            f"lower optim.lr or use run.precision=fp32; {kept}")


def _rng_state(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _eta(run_start: float, epochs_done: int, epochs_left: int, bar) -> str:
    rate = bar.format_dict.get("rate") or 0
    if epochs_done > 0:
        per_epoch = (time.time() - run_start) / (epochs_done + bar.n / max(bar.total, 1))
    elif rate:
        per_epoch = bar.total / rate
    else:
        return "?"
    left = per_epoch * (epochs_left - bar.n / max(bar.total, 1))
    return time.strftime("%H:%M:%S", time.gmtime(max(left, 0)))


def _epoch_line(kind: str, r: dict, best: dict, epochs: int) -> str:
    oa = f" oa {r['oa'] * 100:.2f}%" if "oa" in r else ""
    agree = f" agree {r['agreement'] * 100:.1f}%" if "agreement" in r else ""
    return (f"{kind} epoch {r['epoch']}/{epochs} loss {r['loss']:.4f}{oa}{agree} "
            f"best {best['oa'] * 100:.2f}% (epoch {best['epoch']}) {r['images_per_s']:.0f} img/s")


def _write_log(out: Path, history: list) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run's log has no duplicates.
    atomic_write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _summary(kind, arch, classes, history, best, precision, device, seconds) -> dict:
    evaluated = [r for r in history if "oa" in r]
    last = evaluated[-1] if evaluated else {}
    return {"kind": kind, "arch": arch, "classes": classes, "epochs": len(history),
            "last_oa": last.get("oa"), "last_epoch": last.get("epoch"),
            "best_oa": best["oa"] if best["epoch"] > 0 else None, "best_epoch": best["epoch"],
            "agreement": last.get("agreement"), "precision": precision, "device": str(device),
            "images_per_s": history[-1]["images_per_s"] if history else None,
            "seconds": round(seconds, 2)}
