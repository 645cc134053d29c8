"""Models: the timm factory, the frozen teacher ensemble, and parameter counts."""
from __future__ import annotations

import difflib
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights
from .config import ConfigError

COMBINES = ("probs", "logits")


def create_model(arch: str, num_classes: int, pretrained: bool = False, weights=None,
                 drop_rate: float | None = None) -> nn.Module:
    """A timm model with `num_classes` outputs, optionally loaded from a local weights file.

    `weights` may be a backbone trained for other classes (say ImageNet): its classifier is then
    left at its initialisation and everything else loads.
    """
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown timm model {arch!r}: {hint}list names with "
                          f"python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\"")
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if weights is not None:
        load_weights(model, weights, arch=arch, allow_head_mismatch=True)
    return model


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
    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's logits, float32, in member order."""
        return [m(x).float() for m in self.members]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([self.members[k](x).float() for k in self._used])  # (K, B, C)
        if self.combine == "logits":
            return (self._w * logits).sum(0)
        return torch.logsumexp(self._w.log() + F.log_softmax(logits, dim=2), dim=0)


def build_ensemble(archs: Sequence[str], checkpoint_paths, weights: Sequence[float], combine: str,
                   num_classes: int, pretrained: bool = False) -> TeacherEnsemble:
    """Create the teachers and load each one's fine-tuned checkpoint (strictly: same classes).

    `checkpoint_paths` is None (no checkpoints) or one path-or-None per arch.
    """
    paths = [None] * len(archs) if checkpoint_paths is None else list(checkpoint_paths)
    if len(paths) != len(archs):
        raise ConfigError(f"{len(archs)} teachers but {len(paths)} checkpoints: give one per teacher")
    members = []
    for arch, path in zip(archs, paths):
        model = create_model(arch, num_classes, pretrained=pretrained)
        if path is not None:
            load_weights(model, path, arch=arch)
        members.append(model)
    return TeacherEnsemble(members, weights, combine)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
