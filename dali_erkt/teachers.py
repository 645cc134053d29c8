"""Where a distillation's teacher logits come from: a source, which owns the epoch protocol.

    LiveTeacher(ensemble)           the frozen ensemble runs on every batch
    CachedTeacher(ensemble, cache)  per epoch: the teacher logit cache replays the epoch where it
                                    holds it (no teacher forward), else the members run and the
                                    epoch's rows are written once the epoch is through

The protocol, the same for the engine, `cache-teachers` and the benchmark:

    source.prepare(rt)                            place and compile the teachers, once
    for batch in epoch_batches(loader, e, source):    set_epoch, begin, the batches, end
        t = source.logits(images, n)              the ensemble's logits of the next n views
    source.test_predictions(test_loader, rt)      the ensemble's test predictions (agreement)

With a cache the student learns from the members' logits rounded to fp16, so a run that fills
the cache and one that replays it are the same run.
"""
from __future__ import annotations

import torch

from .evaluation import predict
from .models import MemberLogits, place
from .runtime import Runtime, compiled


def epoch_batches(loader, epoch: int, source=None):
    """The batches of `epoch`, with `source` positioned on it. The source's end of epoch (a
    cache's rows written) runs only after the last batch: an epoch cut short writes nothing."""
    loader.set_epoch(epoch)
    if source is not None:
        source.begin_epoch(epoch)
    yield from loader
    if source is not None:
        source.end_epoch(epoch)


class LiveTeacher:
    """The frozen ensemble, run on every batch."""

    def __init__(self, ensemble):
        self.ensemble = self._forward = ensemble  # until prepare() places and compiles it

    def prepare(self, rt: Runtime) -> None:
        self.ensemble = place(self.ensemble, rt.device, rt.channels_last)
        self._forward = compiled(self.ensemble, rt)

    def begin_epoch(self, epoch: int) -> None:
        pass

    def end_epoch(self, epoch: int) -> None:
        pass

    def logits(self, images, n: int):
        return self._forward(images)

    def test_predictions(self, loader, rt: Runtime) -> torch.Tensor:
        return predict(self.ensemble, loader, rt)[0]


class CachedTeacher:
    """The ensemble through a `TeacherCache`: each epoch replayed where the cache holds it, else
    computed (members' logits) and written at the epoch's end."""

    def __init__(self, ensemble, cache):
        self.ensemble, self.cache = ensemble, cache
        self._forward, self._cursor, self._replay = None, 0, False

    def prepare(self, rt: Runtime) -> None:
        self.ensemble = place(self.ensemble, rt.device, rt.channels_last)
        self._forward = compiled(MemberLogits(self.ensemble), rt)
        self._device = rt.device

    def begin_epoch(self, epoch: int) -> None:
        self._cursor = 0
        self._replay = self.cache.complete(epoch)
        if self._replay:  # one copy to the device ahead of the epoch: no host sync in the steps
            self._rows = torch.from_numpy(self.cache.read_epoch(epoch)).to(self._device)
        else:
            self._rows = torch.empty(self.cache.shape, dtype=torch.float16, device=self._device)

    def end_epoch(self, epoch: int) -> None:
        if not self._replay:
            self.cache.write_epoch(epoch, self._rows.cpu().numpy())

    def logits(self, images, n: int):
        rows = slice(self._cursor, self._cursor + n)
        self._cursor += n
        if not self._replay:
            self._rows[:, rows] = self._forward(images).half()
        return self.ensemble.combine_members(self._rows[:, rows].float())

    def test_predictions(self, loader, rt: Runtime) -> torch.Tensor:
        """From the cache where it holds them, else computed once and written."""
        logits = self.cache.read_test()
        if logits is None:
            logits = predict_members(self.ensemble, loader, rt).cpu().numpy()
            self.cache.write_test(logits)
        members = torch.from_numpy(logits).to(rt.device).float()
        return self.ensemble.combine_members(members).argmax(1)


def teacher_source(ensemble, cache=None):
    """The source for a run: live, or through `cache` (a TeacherCache) where one is given."""
    return LiveTeacher(ensemble) if cache is None else CachedTeacher(ensemble, cache)


@torch.no_grad()
def predict_members(ensemble, loader, rt: Runtime) -> torch.Tensor:
    """Every member's fp16 logits over a loader: (K, images, classes)."""
    out = []
    for batch in loader:
        with rt.autocast():
            out.append(ensemble.member_logits(batch.images.to(rt.input_dtype)).half())
    return torch.cat(out, dim=1)


def fill_cache(source: CachedTeacher, loader, test_loader, epochs: int, rt: Runtime, log) -> int:
    """A teachers-only pass over the plan: every epoch the cache lacks, through exactly the
    distillation's own fill path (so the rows are those a distillation would write). Returns the
    number of epochs filled."""
    source.prepare(rt)
    filled = 0
    for epoch in range(epochs):
        if source.cache.complete(epoch):
            continue
        with torch.no_grad():
            for batch in epoch_batches(loader, epoch, source):
                with rt.autocast():
                    source.logits(batch.images.to(rt.input_dtype), batch.labels.shape[0])
        filled += 1
        log(f"teacher cache: epoch {epoch + 1}/{epochs} written")
    source.test_predictions(test_loader, rt)
    return filled
