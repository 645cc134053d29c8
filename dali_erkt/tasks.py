"""Tasks: what a training step computes from a batch, as named loss parts ("loss" is minimised).

`Supervised` fine-tunes a teacher with CutMix cross-entropy; `Distillation` is a KD objective
(`loss.kind`: dist, kd, dkd; `losses.OBJECTIVES`) against a teacher-logit source (live or through
the cache, `teachers.py`). The engine's loop is the same for both: `prepare` once,
`epoch_batches` for each epoch's batches, `losses` in every step.
"""
from __future__ import annotations

from .config import LossConfig
from .losses import OBJECTIVES, cutmix_cross_entropy
from .runtime import Runtime
from .teachers import epoch_batches


class Supervised:
    """CutMix cross-entropy: how each teacher is fine-tuned on the split, and a student trained
    without a teacher (`kind="student"`: the paper's Base, and loss.kind = none). `ce_weight`
    scales the loss, so a distillation whose teacher term has weight 0 (loss.ratio = 2: 2 * CE)
    is this task exactly."""
    parts = ("loss", "ce")

    def __init__(self, kind: str = "teacher", ce_weight: float = 1.0):
        self.kind, self.ce_weight = kind, ce_weight

    def prepare(self, rt: Runtime) -> None:
        pass

    def epoch_batches(self, loader, epoch: int):
        return epoch_batches(loader, epoch)

    def test_predictions(self, loader, rt: Runtime) -> None:
        return None  # no teacher to agree with

    def losses(self, model, images, batch) -> dict:
        ce = cutmix_cross_entropy(model(images), batch.labels, batch.partner_labels, batch.mix_weight)
        return {"loss": ce if self.ce_weight == 1.0 else self.ce_weight * ce, "ce": ce}


def objective_settings(loss: LossConfig) -> dict:
    """The keyword arguments of `loss.kind`'s objective, from the loss settings."""
    if loss.kind == "dist":
        return dict(ratio=loss.ratio, tau=loss.tau, tau_squared=loss.tau_squared,
                    inter_weight=loss.inter_weight, intra_weight=loss.intra_weight)
    if loss.kind == "kd":
        return dict(ratio=loss.ratio, tau=loss.tau)
    if loss.kind == "dkd":
        return dict(ratio=loss.ratio, tau=loss.tau, alpha=loss.dkd_alpha, beta=loss.dkd_beta)
    raise ValueError(f"loss.kind {loss.kind!r} has no teacher term")


class Distillation:
    """A KD objective against a teacher-logit source that sees exactly the student's (mixed)
    images. `kind` names the objective (losses.OBJECTIVES); `settings` are its keyword
    arguments; DKD's term is ramped in over `warmup` epochs (counted from 1)."""
    kind = "student"

    def __init__(self, source, kind: str = "dist", warmup: int = 0, **settings):
        self.source, self.loss_kind, self.warmup = source, kind, warmup
        self.parts, self._objective = OBJECTIVES[kind]
        self.settings = settings

    @classmethod
    def from_config(cls, source, loss: LossConfig) -> "Distillation":
        return cls(source, loss.kind, warmup=loss.dkd_warmup if loss.kind == "dkd" else 0,
                   **objective_settings(loss))

    def prepare(self, rt: Runtime) -> None:
        self.source.prepare(rt)

    def epoch_batches(self, loader, epoch: int):
        if self.warmup:
            self.settings["warmup_factor"] = min((epoch + 1) / self.warmup, 1.0)
        return epoch_batches(loader, epoch, self.source)

    def losses(self, model, images, batch) -> dict:
        target = self.source.logits(images, batch.labels.shape[0])
        return self._objective(model(images), target, batch.labels, batch.partner_labels,
                               batch.mix_weight, **self.settings)

    def test_predictions(self, loader, rt: Runtime):
        return self.source.test_predictions(loader, rt)
