"""Tasks: what a training step computes from a batch, as named loss parts ("loss" is minimised).

`Supervised` fine-tunes a teacher with CutMix cross-entropy; `Distillation` is the ERKT loss from
the frozen teacher ensemble, optionally through the teacher logit cache. The engine's loop is the
same for both: it calls `prepare` once, `begin_epoch` / `end_epoch` around each epoch, and
`losses` in every step.
"""
from __future__ import annotations

import torch

from .evaluation import predict
from .losses import cutmix_cross_entropy, erkt_loss
from .models import MemberLogits, place
from .runtime import Runtime


def compiled(module, rt: Runtime):
    """`module` as the hot loop calls it: under torch.compile where enabled (reduce-overhead
    captures CUDA graphs; static shapes come from drop_last)."""
    return torch.compile(module, mode=rt.compile_mode) if rt.compile else module


class Supervised:
    """CutMix cross-entropy: how each teacher is fine-tuned on the split, and a student trained
    without a teacher (`kind="student"`: the paper's Base). `ce_weight` scales the loss, so a
    distillation whose teacher term has weight 0 (loss.ratio = 2: 2 * CE) is this task exactly."""
    parts = ("loss", "ce")

    def __init__(self, kind: str = "teacher", ce_weight: float = 1.0):
        self.kind, self.ce_weight = kind, ce_weight

    def prepare(self, rt: Runtime) -> None:
        pass

    def begin_epoch(self, epoch: int) -> None:
        pass

    def end_epoch(self, epoch: int) -> None:
        pass

    def test_predictions(self, loader, rt: Runtime) -> None:
        return None  # no teacher to agree with

    def losses(self, model, images, batch) -> dict:
        ce = cutmix_cross_entropy(model(images), batch.labels, batch.partner_labels, batch.mix_weight)
        return {"loss": ce if self.ce_weight == 1.0 else self.ce_weight * ce, "ce": ce}


class Distillation:
    """The ERKT loss from a frozen teacher that sees exactly the student's (mixed) images.

    With a `TeacherCache`, each epoch's teacher logits are read from it where it holds the epoch
    (no teacher forward), or computed and written to it. Either way the student learns from the
    members' logits rounded to fp16, so a run that fills the cache and one that replays it are
    the same run.
    """
    kind, parts = "student", ("loss", "ce", "inter", "intra")

    def __init__(self, teacher, *, ratio: float, tau: float, tau_squared: bool,
                 inter_weight: float, intra_weight: float, cache=None):
        self.teacher, self.cache = teacher, cache
        self._forward, self._cursor = teacher, 0  # until prepare() places and compiles it
        self.loss = dict(ratio=ratio, tau=tau, tau_squared=tau_squared, inter_weight=inter_weight,
                         intra_weight=intra_weight)

    @classmethod
    def from_config(cls, teacher, loss_cfg, cache=None) -> "Distillation":
        return cls(teacher, ratio=loss_cfg.ratio, tau=loss_cfg.tau, tau_squared=loss_cfg.tau_squared,
                   inter_weight=loss_cfg.inter_weight, intra_weight=loss_cfg.intra_weight, cache=cache)

    def prepare(self, rt: Runtime) -> None:
        """Place and compile the teacher (its ensemble output, or with a cache its members')."""
        self.teacher = place(self.teacher, rt.device, rt.channels_last)
        self._forward = compiled(self.teacher if self.cache is None else MemberLogits(self.teacher), rt)
        self._device = rt.device

    def begin_epoch(self, epoch: int) -> None:
        self._cursor = 0
        if self.cache is None:
            return
        self._replay = self.cache.complete(epoch)
        if self._replay:  # one copy to the device ahead of the epoch: no host sync in the steps
            self._rows = torch.from_numpy(self.cache.read_epoch(epoch)).to(self._device)
        else:
            self._rows = torch.empty(self.cache.shape, dtype=torch.float16, device=self._device)

    def end_epoch(self, epoch: int) -> None:
        if self.cache is not None and not self._replay:
            self.cache.write_epoch(epoch, self._rows.cpu().numpy())

    def teacher_logits(self, images, n: int):
        if self.cache is None:
            return self._forward(images)
        rows = slice(self._cursor, self._cursor + n)
        self._cursor += n
        if not self._replay:
            self._rows[:, rows] = self._forward(images).half()
        return self.teacher.combine_members(self._rows[:, rows].float())

    def losses(self, model, images, batch) -> dict:
        target = self.teacher_logits(images, batch.labels.shape[0])
        return erkt_loss(model(images), target, batch.labels, batch.partner_labels,
                         batch.mix_weight, **self.loss)

    def test_predictions(self, loader, rt: Runtime) -> torch.Tensor:
        """The ensemble's predictions on the test split (from the cache where it holds them)."""
        if self.cache is None:
            return predict(self.teacher, loader, rt)[0]
        logits = self.cache.read_test()
        if logits is None:
            logits = predict_members(self.teacher, loader, rt).cpu().numpy()
            self.cache.write_test(logits)
        members = torch.from_numpy(logits).to(rt.device).float()
        return self.teacher.combine_members(members).argmax(1)


@torch.no_grad()
def predict_members(ensemble, loader, rt: Runtime) -> torch.Tensor:
    """Every member's fp16 logits over a loader: (K, images, classes)."""
    out = []
    for batch in loader:
        with rt.autocast():
            out.append(ensemble.member_logits(batch.images.to(rt.input_dtype)).half())
    return torch.cat(out, dim=1)


def fill_teacher_cache(task: Distillation, loader, test_loader, epochs: int, rt: Runtime, log) -> int:
    """A teachers-only pass over the plan: every epoch the cache lacks, through exactly the
    distillation's own fill path (so the rows are those a distillation would write). Returns the
    number of epochs filled."""
    task.prepare(rt)
    filled = 0
    for epoch in range(epochs):
        if task.cache.complete(epoch):
            continue
        loader.set_epoch(epoch)
        task.begin_epoch(epoch)
        with torch.no_grad():
            for batch in loader:
                with rt.autocast():
                    task.teacher_logits(batch.images.to(rt.input_dtype), batch.labels.shape[0])
        task.end_epoch(epoch)
        filled += 1
        log(f"teacher cache: epoch {epoch + 1}/{epochs} written")
    task.test_predictions(test_loader, rt)
    return filled
