"""Models, built in one place: the timm factory, trained runs loaded back, the frozen teacher
ensemble, and parameter counts."""
from __future__ import annotations

import difflib
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_state
from .errors import CheckpointError, ConfigError
from .run_state import read_run

COMBINES = ("probs", "logits")


def create_model(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A timm model with `num_classes` outputs (timm's hub weights with `pretrained`)."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown timm model {arch!r}: {hint}list names with "
                          f"python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\"")
    if not pretrained:
        return timm.create_model(arch, num_classes=num_classes)
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes)
    except Exception as exc:  # no network, no such weights, a hub error: all end the same way
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise CheckpointError(f"could not fetch timm's pretrained weights for {arch} ({why}): pass "
                              "a local file with --weights instead") from None


def load_trained(path, classes: Sequence[str] | None = None, arch: str | None = None):
    """(model, RunState) rebuilt from a dali-erkt run checkpoint: its arch, classes and weights.

    `classes` and `arch`, where given, must match what the checkpoint records.
    """
    if str(path).endswith(".safetensors"):
        raise CheckpointError(f"{path} holds weights only (no architecture or classes): pass it to "
                              "--weights to start a run from it; evaluate a run's last.pt or best.pt")
    state = read_run(path)
    recorded = state.classes
    if classes is not None and list(recorded) != list(classes):
        raise CheckpointError(f"{path} was trained on {len(recorded)} classes ({', '.join(recorded[:3])}"
                              f"{', ...' if len(recorded) > 3 else ''}), not this split's "
                              f"{len(classes)}: use a checkpoint trained on this split")
    if arch is not None and state.arch != arch:
        raise CheckpointError(f"{path} is a {state.arch} checkpoint, but {arch} was asked for: "
                              "list the teachers' architectures in model.teachers in order")
    model = create_model(state.arch, len(recorded))
    load_state(model, state.model, path)
    return model, state


class TeacherEnsemble(nn.Module):
    """Frozen weighted ensemble of teachers; `forward` returns the ensemble's float32 logits.

    combine="probs": log(sum_k w_k softmax(z_k)), computed as logsumexp_k(log w_k + log_softmax(z_k))
    so that tiny probabilities do not underflow. combine="logits": sum_k w_k z_k.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], combine: str = "probs"):
        super().__init__()
        weights = [float(w) for w in weights]
        if len(members) != len(weights) or not members:
            raise ConfigError(f"{len(members)} teachers but {len(weights)} weights: give one weight "
                              "per teacher")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"teacher weights {weights} must be >= 0 with a positive sum")
        if combine not in COMBINES:
            raise ConfigError(f"ensemble combine {combine!r}: use probs or logits")
        self.members = nn.ModuleList(members)
        self.combine = combine
        w = torch.tensor(weights, dtype=torch.float32)
        # Buffers follow .to(device); not persistent, so the state dict is the members' alone.
        self.register_buffer("weights", w / w.sum(), persistent=False)
        # Fixed at construction, so a compiled forward sees no data-dependent Python; a 0-weight
        # teacher adds nothing and is not run.
        self._used = tuple(k for k, v in enumerate(weights) if v > 0)
        self.register_buffer("_w", self.weights[list(self._used)].view(-1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        # The one place the teacher is pinned to eval: a parent's .train() cannot flip BatchNorm
        # statistics or dropout back on.
        return super().train(False)

    @torch.no_grad()  # not inference_mode: the outputs enter the student's autograd graph as constants
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every teacher's logits, float32, stacked in member order: (K, B, C)."""
        return torch.stack([m(x).float() for m in self.members])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([self.members[k](x).float() for k in self._used])  # (K', B, C)
        return combine_logits(logits, self._w, self.combine)

    def combine_members(self, logits: torch.Tensor) -> torch.Tensor:
        """The ensemble's logits from every member's (K, B, C), e.g. read from a logit cache."""
        return combine_logits(logits, self.weights.view(-1, 1, 1), self.combine)


class MemberLogits(nn.Module):
    """The ensemble's members' logits (K, B, C) as a module's forward (so it compiles as one)."""

    def __init__(self, ensemble: TeacherEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x)


def combine_logits(logits: torch.Tensor, weights: torch.Tensor, combine: str) -> torch.Tensor:
    """The ensemble's logits from its members' (K, B, C), with weights (K, 1, 1) summing to 1:
    log(sum_k w_k softmax(z_k)) for "probs", sum_k w_k z_k for "logits". A zero weight adds
    nothing (its log is -inf inside the logsumexp)."""
    if combine == "logits":
        return (weights * logits).sum(0)
    return torch.logsumexp(weights.log() + F.log_softmax(logits, dim=2), dim=0)


def build_ensemble(archs: Sequence[str], checkpoints: Sequence, weights: Sequence[float],
                   combine: str, classes: Sequence[str]) -> TeacherEnsemble:
    """The frozen ensemble of fine-tuned teachers: one train-teacher checkpoint per arch, each
    checked against its arch and the split's classes."""
    if len(checkpoints) != len(archs):
        raise ConfigError(f"{len(archs)} teachers ({', '.join(archs)}) but {len(checkpoints)} "
                          "checkpoints: give one per teacher")
    members = [load_trained(path, classes, arch)[0] for arch, path in zip(archs, checkpoints)]
    return TeacherEnsemble(members, weights, combine)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """`model` on `device`, in channels-last memory where asked (what the loader's images are)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model
