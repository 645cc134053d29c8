"""Plain PyTorch twins of the hand-written kernels.

The twin of the fused DIST kernel is the project's own loss definition (`dali_erkt.losses`), so
the kernel is tested against exactly what training uses by default.
"""
from __future__ import annotations

import torch

from dali_erkt.losses import EPS, dist_terms



def dist_terms_reference(S: torch.Tensor, T: torch.Tensor, tau: float = 2.0,
                         tau_squared: bool = True, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST inter- and intra-class terms of student logits S and teacher logits T, (B, C) each."""
    if S.ndim != 2 or S.shape != T.shape:
        raise ValueError(f"S and T must be (B, C) of one shape, got {tuple(S.shape)} and {tuple(T.shape)}")
    return dist_terms(S, T, tau, tau_squared, eps)
