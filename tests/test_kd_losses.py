"""KD (Hinton et al. 2015) and DKD (Zhao et al. 2022) on hand-worked two-sample cases, against the
papers' formulas, and the `loss.kind` choice through the task and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from dali_erkt.cli import main
from dali_erkt.config import LossConfig, apply_overrides, default_config
from dali_erkt.errors import ConfigError
from dali_erkt.losses import OBJECTIVES, cutmix_cross_entropy, dkd_loss, dkd_terms, kd_loss
from dali_erkt.synthetic import make_scenes
from dali_erkt.tasks import Distillation

L = math.log
# Two samples. Student probabilities [0.5, 0.5] and [0.25, 0.75]; teacher [0.75, 0.25], [0.5, 0.5].
KD_S = torch.tensor([[0.0, 0.0], [0.0, L(3)]])
KD_T = torch.tensor([[L(3), 0.0], [0.0, 0.0]])
# KL(p_t || p_s) by hand: 0.75 ln 1.5 + 0.25 ln 0.5 and 0.5 ln 2 + 0.5 ln(2/3).
KD_BY_HAND = ((0.75 * L(1.5) + 0.25 * L(0.5)) + (0.5 * L(2) + 0.5 * L(2 / 3))) / 2

# Three classes: student p = [0.25, 0.25, 0.5], teacher p = [0.5, 0.25, 0.25], for both samples;
# targets 0 and 2.
DKD_S = torch.tensor([[0.0, 0.0, L(2)]] * 2)
DKD_T = torch.tensor([[L(2), 0.0, 0.0]] * 2)
DKD_Y = torch.tensor([0, 2])
# Target 0: b_s = [0.25, 0.75], b_t = [0.5, 0.5]; non-target q_s = [1/3, 2/3], q_t = [1/2, 1/2].
TCKD_0 = 0.5 * L(0.5 / 0.25) + 0.5 * L(0.5 / 0.75)
NCKD_0 = 0.5 * L(0.5 * 3) + 0.5 * L(0.5 * 3 / 2)
# Target 2: b_s = [0.5, 0.5], b_t = [0.25, 0.75]; q_s = [1/2, 1/2], q_t = [2/3, 1/3].
TCKD_2 = 0.25 * L(0.25 / 0.5) + 0.75 * L(0.75 / 0.5)
NCKD_2 = 2 / 3 * L(4 / 3) + 1 / 3 * L(2 / 3)


def test_kd_two_samples_by_hand():
    assert kd_loss(KD_S, KD_T, tau=1.0).item() == pytest.approx(KD_BY_HAND, rel=1e-6)
    # Temperature: softmax(z / T) of logits scaled by T is the T = 1 case, times T^2.
    assert kd_loss(3 * KD_S, 3 * KD_T, tau=3.0).item() == pytest.approx(9 * KD_BY_HAND, rel=1e-6)
    assert kd_loss(KD_T, KD_T, tau=4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_dkd_two_samples_by_hand():
    tckd, nckd = dkd_terms(DKD_S, DKD_T, DKD_Y, tau=1.0)
    assert tckd.tolist() == pytest.approx([TCKD_0, TCKD_2], rel=1e-6)
    assert nckd.tolist() == pytest.approx([NCKD_0, NCKD_2], rel=1e-6)
    no_mix = torch.zeros(2)
    t, n = dkd_loss(DKD_S, DKD_T, DKD_Y, DKD_Y, no_mix, tau=1.0, alpha=1.0, beta=8.0)
    assert t.item() == pytest.approx((TCKD_0 + TCKD_2) / 2, rel=1e-6)
    assert n.item() == pytest.approx(8 * (NCKD_0 + NCKD_2) / 2, rel=1e-6)
    # CutMix: both labels count, weighted by area as the CE weights them.
    t, n = dkd_loss(DKD_S, DKD_T, DKD_Y, torch.tensor([2, 0]), torch.tensor([0.25, 0.0]),
                    tau=1.0, alpha=0.5, beta=2.0)
    assert t.item() == pytest.approx(0.5 * ((0.75 * TCKD_0 + 0.25 * TCKD_2) + TCKD_2) / 2, rel=1e-6)
    assert n.item() == pytest.approx(2.0 * ((0.75 * NCKD_0 + 0.25 * NCKD_2) + NCKD_2) / 2, rel=1e-6)


def test_dkd_reformulates_kd():
    """The DKD paper's Eq. (1): KD = TCKD + (1 - p_t(target)) * NCKD, per sample."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    for tau in (1.0, 4.0):
        tckd, nckd = dkd_terms(s, t, y, tau)
        p_target = torch.softmax(t / tau, 1).gather(1, y.view(-1, 1)).squeeze(1)
        per_sample = tckd + (1 - p_target) * nckd
        assert (tau * tau * per_sample.mean()).item() == pytest.approx(kd_loss(s, t, tau).item(), rel=1e-5)


def test_dkd_gradient_finite_for_saturated_logits():
    s = torch.tensor([[500.0, 0.0, 0.0], [0.0, -300.0, 900.0]], requires_grad=True)
    t = torch.tensor([[900.0, 0.0, 0.0], [0.0, 0.0, -900.0]])
    tckd, nckd = dkd_loss(s, t, torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0.3, 0.0]))
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(s.grad).all()


def test_objectives_sum_their_parts():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y, partner = torch.randint(0, 4, (6,), generator=g), torch.randint(0, 4, (6,), generator=g)
    w = torch.rand(6, generator=g)
    ce = cutmix_cross_entropy(s, y, partner, w)
    kd = OBJECTIVES["kd"][1](s, t, y, partner, w, ratio=0.5, tau=4.0)
    assert kd["loss"].item() == pytest.approx((0.5 * ce + 1.5 * kd_loss(s, t, 4.0)).item(), rel=1e-6)
    dkd = OBJECTIVES["dkd"][1](s, t, y, partner, w, ratio=1.0, tau=4.0, warmup_factor=0.25)
    tckd, nckd = dkd_loss(s, t, y, partner, w, tau=4.0)
    assert dkd["tckd"].item() == pytest.approx(0.25 * tckd.item(), rel=1e-6)
    assert dkd["loss"].item() == pytest.approx((ce + 0.25 * (tckd + nckd)).item(), rel=1e-6)
    for kind, (parts, objective) in OBJECTIVES.items():
        settings = Distillation.from_config(None, LossConfig(kind=kind)).settings
        assert tuple(objective(s, t, y, partner, w, **settings)) == parts, kind


def test_dkd_warmup_ramps_by_epoch():
    class Source:
        def begin_epoch(self, epoch): pass

        def end_epoch(self, epoch): pass

    class Loader:
        def set_epoch(self, epoch): pass

        def __iter__(self): return iter(())

    task = Distillation.from_config(Source(), LossConfig(kind="dkd", dkd_warmup=4))
    factors = []
    for epoch in range(6):
        list(task.epoch_batches(Loader(), epoch))
        factors.append(task.settings["warmup_factor"])
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert "warmup_factor" not in Distillation.from_config(Source(), LossConfig(kind="dkd", dkd_warmup=0)).settings


@pytest.mark.parametrize("override, message", [
    ("loss.kind=hinton", "loss.kind = 'hinton': use dist, kd, dkd, none"),
    ("loss.dkd_beta=-1", "loss.dkd_beta = -1.0 must be >= 0"),
    ("loss.dkd_warmup=-2", "loss.dkd_warmup = -2 must be >= 0"),
])
def test_loss_settings_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(default_config(), [override])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    data = make_scenes(root / "data", classes=3, per_class=8, size=32)
    assert cli("split", data, "--train-ratio", 0.5, "--out", root / "split").exit_code == 0
    r = cli("train-teacher", "--split", root / "split", "--arch", "resnet10t", "--out",
            root / "t" / "resnet10t", *COMMON, "--epochs", 1)
    assert r.exit_code == 0, r.output
    return root


COMMON = ("--device", "cpu", "--image-size", 32, "--batch-size", 4, "--lr", 2e-4, "--no-progress")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def distill(root, out, *extra):
    r = cli("distill", "--split", root / "split", "--teachers", root / "t", "--out", out, *COMMON,
            "--epochs", 2, "--set", "model.teachers=[resnet10t]", "--set", "model.teacher_weights=[1]",
            "--set", "model.arch=resnet10t", *extra)
    assert r.exit_code == 0, r.output
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("kind, parts", [("kd", ("ce", "kd")), ("dkd", ("ce", "tckd", "nckd"))])
def test_distill_with_each_kind_through_the_cli(setup, tmp_path, kind, parts):
    log = distill(setup, tmp_path / kind, "--set", f"loss.kind={kind}", "--set", "loss.tau=4",
                  "--set", "loss.dkd_warmup=2")
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        assert all(math.isfinite(r[p]) for p in ("loss",) + parts) and "inter" not in r
        assert r["loss"] == pytest.approx(r["ce"] + sum(r[p] for p in parts[1:]), rel=1e-4)
    if kind == "dkd":  # the warm-up: half the term in epoch 1, all of it in epoch 2
        assert log[0]["tckd"] > 0 and log[0]["nckd"] > 0


@pytest.mark.slow
def test_dkd_cached_and_uncached_agree(setup, tmp_path):
    """As for DIST (test_teacher_cache): a cache replays the teachers' logits rounded to fp16, an
    uncached run uses them in fp32; at lr 2e-4 the losses agree within 1e-3 relative."""
    extra = ("--set", "loss.kind=dkd", "--set", "loss.tau=4")
    plain = distill(setup, tmp_path / "plain", *extra)
    cache = tmp_path / "cache"
    filled = distill(setup, tmp_path / "fill", *extra, "--teacher-cache", cache)
    replayed = distill(setup, tmp_path / "replay", *extra, "--teacher-cache", cache)
    for a, b, c in zip(plain, filled, replayed):
        for part in ("loss", "ce", "tckd", "nckd"):
            assert b[part] == pytest.approx(a[part], rel=1e-3), part
            assert c[part] == b[part], part  # fill and replay: the same run
