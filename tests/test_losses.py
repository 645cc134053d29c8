"""The ERKT loss against direct float64 computations written out here, loop by loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dali_erkt.losses import (cutmix_cross_entropy, dist_loss, erkt_loss, inter_class_relation,
                              intra_class_relation, pearson_distance)


# ---- float64 references, independent of the code under test ---------------------------------

def ref_softmax(row, tau):
    z = [v / tau for v in row]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def ref_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((x[i] - mx) * (y[i] - my) for i in range(n))
    vx = sum((x[i] - mx) ** 2 for i in range(n))
    vy = sum((y[i] - my) ** 2 for i in range(n))
    return cov / math.sqrt(vx * vy)


def ref_dist(s, t, tau, tau_squared):
    """(inter, intra) of DIST on lists of logits rows."""
    ps = [ref_softmax(r, tau) for r in s]
    pt = [ref_softmax(r, tau) for r in t]
    b, c = len(ps), len(ps[0])
    inter = sum(1 - ref_pearson(ps[i], pt[i]) for i in range(b)) / b
    cols = lambda p, j: [p[i][j] for i in range(b)]  # noqa: E731
    intra = sum(1 - ref_pearson(cols(ps, j), cols(pt, j)) for j in range(c)) / c
    scale = tau ** 2 if tau_squared else 1.0
    return scale * inter, scale * intra


def ref_ce(row, label):
    top = max(row)
    return -(row[label] - top - math.log(sum(math.exp(v - top) for v in row)))


def logits(b, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale


# ---- DIST ------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c", [(2, 5), (30, 45), (7, 30), (16, 3)])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("tau_squared", [True, False])
def test_dist_matches_float64_reference(b, c, tau, tau_squared):
    s, t = logits(b, c, 1), logits(b, c, 2)
    inter, intra = dist_loss(s, t, tau=tau, tau_squared=tau_squared)
    want_inter, want_intra = ref_dist(s.double().tolist(), t.double().tolist(), tau, tau_squared)
    assert inter.dtype == intra.dtype == torch.float32
    assert inter.item() == pytest.approx(want_inter, rel=1e-4, abs=1e-5)
    assert intra.item() == pytest.approx(want_intra, rel=1e-4, abs=1e-5)


def test_dist_weights_scale_each_term():
    s, t = logits(8, 10, 3), logits(8, 10, 4)
    inter, intra = dist_loss(s, t, tau=2.0)
    inter2, intra2 = dist_loss(s, t, tau=2.0, inter_weight=0.5, intra_weight=3.0)
    assert inter2.item() == pytest.approx(0.5 * inter.item(), rel=1e-6)
    assert intra2.item() == pytest.approx(3.0 * intra.item(), rel=1e-6)


def test_relations_are_batch_and_class_means():
    p_s = torch.softmax(logits(6, 9, 5), 1)
    p_t = torch.softmax(logits(6, 9, 6), 1)
    assert inter_class_relation(p_s, p_t).item() == pytest.approx(
        np.mean([1 - ref_pearson(p_s[i].tolist(), p_t[i].tolist()) for i in range(6)]), abs=1e-6)
    assert intra_class_relation(p_s, p_t).item() == pytest.approx(
        np.mean([1 - ref_pearson(p_s[:, j].tolist(), p_t[:, j].tolist()) for j in range(9)]), abs=1e-6)


@pytest.mark.parametrize("b,c", [(30, 45), (4, 3), (30, 7)])
def test_dist_is_zero_when_student_equals_teacher(b, c):
    z = logits(b, c, 7)
    inter, intra = dist_loss(z, z.clone(), tau=2.0)
    assert abs(inter.item()) < 1e-5 and abs(intra.item()) < 1e-5


def test_dist_eps_shows_only_for_tiny_batches():
    """The 1e-8 in the Pearson denominator: a batch of 2 over 45 classes has columns whose
    centred norms are ~1e-4 to 1e-3, where eps is visible (measured: intra 0.014 with tau^2 = 4)."""
    z = logits(2, 45, 7)
    inter, intra = dist_loss(z, z.clone(), tau=2.0)
    assert abs(inter.item()) < 1e-5 and 0 <= intra.item() < 0.02


def test_pearson_distance_of_a_constant_row_is_finite():
    d = pearson_distance(torch.ones(2, 4), torch.randn(2, 4))
    assert torch.isfinite(d).all() and torch.allclose(d, torch.ones(2))


def test_gradients_reach_the_student_only():
    s = logits(5, 7, 8).requires_grad_()
    t = logits(5, 7, 9).requires_grad_()
    inter, intra = dist_loss(s, t)
    (inter + intra).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_dist_is_float32_under_autocast():
    s, t = logits(8, 12, 10).bfloat16(), logits(8, 12, 11).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inter, intra = dist_loss(s, t)
    want = dist_loss(s.float(), t.float())
    assert inter.dtype == torch.float32 and intra.dtype == torch.float32
    assert inter.item() == pytest.approx(want[0].item(), rel=1e-6)
    assert intra.item() == pytest.approx(want[1].item(), rel=1e-6)


# ---- CE with CutMix --------------------------------------------------------------------------

def test_cutmix_ce_matches_explicit_sum():
    z = logits(6, 5, 12)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    yp = torch.tensor([4, 3, 2, 1, 0, 1])
    w = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1])
    rows = z.double().tolist()
    want = sum((1 - w[i].item()) * ref_ce(rows[i], y[i].item()) + w[i].item() * ref_ce(rows[i], yp[i].item())
               for i in range(6)) / 6
    got = cutmix_cross_entropy(z, y, yp, w)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cutmix_ce_endpoints():
    z = logits(8, 10, 13)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    yp = y.roll(1)
    zero, one = torch.zeros(8), torch.ones(8)
    assert cutmix_cross_entropy(z, y, yp, zero).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    assert cutmix_cross_entropy(z, y, yp, one).item() == pytest.approx(F.cross_entropy(z, yp).item(), rel=1e-6)
    # A scalar weight is the same weight for every sample.
    assert cutmix_cross_entropy(z, y, yp, 0.3).item() == pytest.approx(
        cutmix_cross_entropy(z, y, yp, torch.full((8,), 0.3)).item(), rel=1e-6)


# ---- the combination -------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [1.0, 0.5, 1.7])
def test_erkt_loss_combination(ratio):
    s, t = logits(10, 6, 14), logits(10, 6, 15)
    y = torch.arange(10) % 6
    yp = y.flip(0)
    w = torch.linspace(0, 1, 10)
    out = erkt_loss(s, t, y, yp, w, ratio=ratio, tau=2.0, tau_squared=True)
    assert set(out) == {"loss", "ce", "inter", "intra"}
    ref_inter, ref_intra = ref_dist(s.double().tolist(), t.double().tolist(), 2.0, True)
    rows = s.double().tolist()
    ref_ce_value = sum((1 - w[i].item()) * ref_ce(rows[i], y[i].item()) + w[i].item() * ref_ce(rows[i], yp[i].item())
                       for i in range(10)) / 10
    want = ratio * ref_ce_value + (2 - ratio) * 2 * (ref_inter + ref_intra)
    assert out["ce"].item() == pytest.approx(ref_ce_value, rel=1e-5)
    assert out["inter"].item() == pytest.approx(ref_inter, rel=1e-4)
    assert out["intra"].item() == pytest.approx(ref_intra, rel=1e-4)
    assert out["loss"].item() == pytest.approx(want, rel=1e-4)  # against float64 loops, not the code
