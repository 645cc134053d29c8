"""The distillation losses as pure functions: CutMix cross-entropy, and beside it the logit KD
losses `loss.kind` chooses from (`OBJECTIVES`), each summed as

    L = R * CE + (2 - R) * KD

    dist  KD = 2 * (L_inter + L_intra)   DIST (Huang et al., 2022): ERKT's loss, the default
    kd    KD = T^2 * KL(p_t || p_s)      Hinton, Vinyals, Dean 2015
    dkd   KD = T^2 * (alpha * TCKD + beta * NCKD), times the warm-up factor
                                         Zhao et al., "Decoupled Knowledge Distillation", 2022

Each objective returns its named parts ("loss" is minimised; the others as they enter the sum).
All read only logits, so one teacher logit cache serves every kind.

Everything is computed in float32, also under autocast: the Pearson terms subtract close numbers
and fp16 would round them away. This module is the definition; `dist_terms` hands the work to
the fused Triton kernel in `dali_erkt.kernels` only where that is switched on and applies, and the
tests compare the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


# Guards the Pearson denominator against a constant row or column (1e-12 lets saturated softmax
# outputs overflow the gradient). It is negligible against real products of norms, except for
# tiny batches: over a batch of 2, a column's two probabilities may differ by ~1e-3 only.
EPS = 1e-8


def _fp32(t: torch.Tensor):
    """A context that switches autocast off on `t`'s device, so no op inside is downcast."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """1 - Pearson correlation of `a` and `b` along `dim`:
    1 - (a - mean a).(b - mean b) / (||a - mean a|| ||b - mean b|| + eps).

    A constant row (or column) gives distance 1, not NaN. Its gradient is finite but of order
    1/eps unless the other side is constant too (as both are at batch 1 for the intra term). The
    fused kernel in `dali_erkt.kernels` computes exactly this and is tested against it.
    """
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    num = (a * b).sum(dim)
    den = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim) + eps
    return 1.0 - num / den


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per sample, across classes; mean over the batch. Inputs are (B, C) probabilities."""
    return pearson_distance(p_s, p_t, dim=1, eps=eps).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per class, across the batch; mean over classes."""
    return pearson_distance(p_s, p_t, dim=0, eps=eps).mean()


def dist_terms_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0,
                     tau_squared: bool = True, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The unweighted DIST terms (inter, intra), times tau^2 with `tau_squared`, in float32.

    The official DIST code multiplies by tau^2 (keeping gradient scale across temperatures); the
    paper's formula omits it. The teacher is a fixed target: no gradient flows into it.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must be (B, C) of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    with _fp32(student_logits):
        p_s = F.softmax(student_logits.float() / tau, dim=1)
        p_t = F.softmax(teacher_logits.detach().float() / tau, dim=1)
        scale = tau * tau if tau_squared else 1.0
        return (scale * inter_class_relation(p_s, p_t, eps),
                scale * intra_class_relation(p_s, p_t, eps))


def dist_impl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, impl: str = "auto") -> str:
    """Which implementation `dist_terms` runs: "torch", or "triton" where `impl` asks for it, or
    is "auto" and the kernel is enabled (kernels.triton_dist_enabled), runs on the tensors'
    device and takes them."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl != "auto":
        return impl
    if not (student_logits.is_cuda and kernels.triton_dist_enabled()):
        return "torch"
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        return "torch"  # the kernel gives the teacher no gradient
    return "triton" if kernels.dist_kernel_accepts(student_logits, teacher_logits) else "torch"


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0,
               tau_squared: bool = True, eps: float = EPS,
               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's (inter, intra) terms: `dist_terms_torch`, or the fused kernel (see `dist_impl`)."""
    if dist_impl(student_logits, teacher_logits, impl) == "torch":
        return dist_terms_torch(student_logits, teacher_logits, tau, tau_squared, eps)
    return kernels.dist_terms_triton(student_logits, teacher_logits, tau, tau_squared, eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0,
              tau_squared: bool = True, inter_weight: float = 1.0,
              intra_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two DIST terms (inter, intra), each weighted and, with `tau_squared`, times tau^2."""
    inter, intra = dist_terms(student_logits, teacher_logits.detach(), tau, tau_squared)
    return inter_weight * inter, intra_weight * intra


def cutmix_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor,
                         mix_weight) -> torch.Tensor:
    """mean_i[(1 - w_i) CE(y_i) + w_i CE(y_partner_i)]; w is per sample (B,) or a scalar.

    w_i is the area of sample i covered by its CutMix partner's box (0 where nothing was pasted).
    """
    with _fp32(logits):
        logp = F.log_softmax(logits.float(), dim=1)
        ce_own = -logp.gather(1, labels.long().view(-1, 1)).squeeze(1)
        ce_partner = -logp.gather(1, partner_labels.long().view(-1, 1)).squeeze(1)
        w = torch.as_tensor(mix_weight, dtype=torch.float32, device=logp.device)
        return ((1.0 - w) * ce_own + w * ce_partner).mean()


def erkt_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              partner_labels: torch.Tensor, mix_weight, *, ratio: float = 1.0, tau: float = 2.0,
              tau_squared: bool = True, inter_weight: float = 1.0,
              intra_weight: float = 1.0) -> dict:
    """{"loss", "ce", "inter", "intra"}: inter and intra as they enter the sum (weighted, tau^2)."""
    ce = cutmix_cross_entropy(student_logits, labels, partner_labels, mix_weight)
    inter, intra = dist_loss(student_logits, teacher_logits, tau, tau_squared, inter_weight,
                             intra_weight)
    r = ratio
    return {"loss": r * ce + (2.0 - r) * 2.0 * (inter + intra), "ce": ce, "inter": inter,
            "intra": intra}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s KD: tau^2 * KL(p_t || p_s), p = softmax(logits / tau), mean over the batch."""
    with _fp32(student_logits):
        log_s = F.log_softmax(student_logits.float() / tau, dim=1)
        log_t = F.log_softmax(teacher_logits.detach().float() / tau, dim=1)
        return tau * tau * (log_t.exp() * (log_t - log_s)).sum(1).mean()


def _target_split(z: torch.Tensor, target: torch.Tensor, gt: torch.Tensor):
    """(log p_y, log(1 - p_y), log-softmax over the non-target classes) of logits z, from
    log-sum-exps (no log of a rounded 1 - p). The last one's target column is not meaningful."""
    lse = torch.logsumexp(z, dim=1)
    lse_other = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1)
    log_p_target = z.gather(1, target.view(-1, 1)).squeeze(1) - lse
    return log_p_target, lse_other - lse, z - lse_other[:, None]


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              tau: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's per-sample (TCKD, NCKD) at temperature tau, unscaled, float32:
    TCKD = KL(b_t || b_s) on the binary pair b = [p_y, 1 - p_y]; NCKD = KL(q_t || q_s) with q the
    softmax over the non-target logits only (the target class masked out)."""
    with _fp32(student_logits):
        z_s = student_logits.float() / tau
        z_t = teacher_logits.detach().float() / tau
        target = target.long()
        gt = F.one_hot(target, z_s.shape[1]).bool()
        s_y, s_rest, log_q_s = _target_split(z_s, target, gt)
        t_y, t_rest, _ = _target_split(z_t, target, gt)
        tckd = t_y.exp() * (t_y - s_y) + t_rest.exp() * (t_rest - s_rest)
        q_t = F.softmax(z_t.masked_fill(gt, float("-inf")), dim=1)  # exactly 0 at the target
        nckd = (torch.special.xlogy(q_t, q_t) - q_t * log_q_s).sum(1)
        return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             partner_labels: torch.Tensor, mix_weight, *, tau: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha * T^2 * TCKD, beta * T^2 * NCKD), batch means. Under CutMix a view has two labels:
    both targets count, weighted by area as the CE weights them,
    (1 - w_i) * DKD(y_i) + w_i * DKD(y_partner_i) (w = 0 where nothing was pasted)."""
    own = dkd_terms(student_logits, teacher_logits, labels, tau)
    partner = dkd_terms(student_logits, teacher_logits, partner_labels, tau)
    w = torch.as_tensor(mix_weight, dtype=torch.float32, device=own[0].device)
    tckd, nckd = (((1.0 - w) * a + w * b).mean() for a, b in zip(own, partner))
    return alpha * tau * tau * tckd, beta * tau * tau * nckd


def kd_objective(student_logits, teacher_logits, labels, partner_labels, mix_weight, *,
                 ratio: float = 1.0, tau: float = 4.0) -> dict:
    """{"loss", "ce", "kd"}: R * CE + (2 - R) * KD."""
    ce = cutmix_cross_entropy(student_logits, labels, partner_labels, mix_weight)
    kd = kd_loss(student_logits, teacher_logits, tau)
    return {"loss": ratio * ce + (2.0 - ratio) * kd, "ce": ce, "kd": kd}


def dkd_objective(student_logits, teacher_logits, labels, partner_labels, mix_weight, *,
                  ratio: float = 1.0, tau: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                  warmup_factor: float = 1.0) -> dict:
    """{"loss", "ce", "tckd", "nckd"}: R * CE + (2 - R) * (tckd + nckd), both parts times the
    warm-up factor (DKD's trainer ramps its term in: min(epoch / warm-up epochs, 1))."""
    ce = cutmix_cross_entropy(student_logits, labels, partner_labels, mix_weight)
    tckd, nckd = dkd_loss(student_logits, teacher_logits, labels, partner_labels, mix_weight,
                          tau=tau, alpha=alpha, beta=beta)
    tckd, nckd = warmup_factor * tckd, warmup_factor * nckd
    return {"loss": ratio * ce + (2.0 - ratio) * (tckd + nckd), "ce": ce, "tckd": tckd, "nckd": nckd}


# loss.kind -> (the parts it returns, in order; the objective). "none" (CE only) needs no
# teacher: it is the supervised task (tasks.Supervised), not an entry here.
OBJECTIVES = {
    "dist": (("loss", "ce", "inter", "intra"), erkt_loss),
    "kd": (("loss", "ce", "kd"), kd_objective),
    "dkd": (("loss", "ce", "tckd", "nckd"), dkd_objective),
}
