"""Model factory, frozen teacher ensemble and parameter counts (CPU, no pretrained downloads)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dali_erkt.checkpoint import load_weights, save_checkpoint
from dali_erkt.errors import CheckpointError
from dali_erkt.config import ConfigError
from dali_erkt.models import TeacherEnsemble, build_ensemble, count_parameters, create_model


class Fixed(nn.Module):
    """Returns fixed logits for batch rows; has a parameter, BatchNorm and dropout to pin."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)
        self.scale = nn.Parameter(torch.ones(()))
        self.bn = nn.BatchNorm1d(1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.scale * self.z[: x.shape[0]]


class Exploding(nn.Module):
    def forward(self, x):
        raise AssertionError("a teacher of weight 0 must not run")


def fixed_members(k=3, b=4, c=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [Fixed(torch.randn(b, c, generator=g) * scale) for _ in range(k)]


# ---- ensemble maths --------------------------------------------------------------------------

def test_probs_combination_is_log_of_weighted_softmax_sum():
    members = fixed_members()
    ens = TeacherEnsemble(members, [0.4, 0.3, 0.3], "probs")
    out = ens(torch.zeros(4, 1))
    want = sum(w * torch.softmax(m.z.double(), 1) for w, m in zip([0.4, 0.3, 0.3], members)).log()
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), want, atol=1e-6)
    # Its softmax is the weighted mean of the members' probabilities.
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-6)


def test_probs_combination_is_stable_for_extreme_logits():
    z = torch.tensor([[0.0, -200.0, 100.0], [300.0, -300.0, 0.0]])
    ens = TeacherEnsemble([Fixed(z), Fixed(-z)], [0.5, 0.5], "probs")
    out = ens(torch.zeros(2, 1))
    want = (0.5 * torch.softmax(z.double(), 1) + 0.5 * torch.softmax(-z.double(), 1)).log()
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-4)


def test_logits_combination_and_normalised_weights():
    members = fixed_members(seed=1)
    ens = TeacherEnsemble(members, [2.0, 1.0, 1.0], "logits")
    assert torch.allclose(ens.weights, torch.tensor([0.5, 0.25, 0.25]))
    out = ens(torch.zeros(4, 1))
    want = 0.5 * members[0].z + 0.25 * members[1].z + 0.25 * members[2].z
    assert torch.allclose(out, want, atol=1e-6)


def test_member_logits_and_zero_weight_teacher_is_skipped():
    members = fixed_members(k=2, seed=2)
    ens = TeacherEnsemble(members + [Exploding()], [1.0, 1.0, 0.0], "probs")
    out = ens(torch.zeros(4, 1))
    want = (0.5 * torch.softmax(members[0].z, 1) + 0.5 * torch.softmax(members[1].z, 1)).log()
    assert torch.allclose(out, want, atol=1e-6)
    each = TeacherEnsemble(members, [1, 1]).member_logits(torch.zeros(4, 1))
    assert len(each) == 2 and all(torch.equal(a, m.z) for a, m in zip(each, members))


def test_ensemble_is_frozen_and_pinned_to_eval():
    ens = TeacherEnsemble(fixed_members(), [0.4, 0.3, 0.3])
    student = nn.Linear(1, 6)
    parent = nn.ModuleDict({"teacher": ens, "student": student})
    parent.train()
    assert student.training
    assert not any(m.training for m in ens.modules())
    ens.train(True)
    assert not any(m.training for m in ens.modules())
    assert not any(p.requires_grad for p in ens.parameters())
    # Outputs are constants: usable in the student's graph without gradients into the teacher.
    x = torch.zeros(4, 1, requires_grad=True)
    out = ens(x)
    assert not out.requires_grad and out.grad_fn is None
    (student(x) * out).sum().backward()
    assert student.weight.grad is not None


def test_ensemble_output_is_float32_for_low_precision_members():
    ens = TeacherEnsemble([Fixed(torch.randn(3, 4).bfloat16())], [1.0])
    assert ens(torch.zeros(3, 1)).dtype == torch.float32


@pytest.mark.parametrize("members,weights,combine", [
    (2, [1.0], "probs"), (2, [1.0, -1.0], "probs"), (2, [0.0, 0.0], "probs"), (2, [1.0, 1.0], "mean")])
def test_ensemble_rejects_bad_settings(members, weights, combine):
    with pytest.raises(ConfigError):
        TeacherEnsemble(fixed_members(k=members), weights, combine)


# ---- timm factory ----------------------------------------------------------------------------

def test_create_model_forward():
    model = create_model("resnet18", 3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_model_name_is_one_line():
    with pytest.raises(ConfigError) as err:
        create_model("resnet_18x", 3)
    msg = str(err.value)
    assert "\n" not in msg and "resnet_18x" in msg and "timm.list_models" in msg


def test_backbone_weights_with_another_head_load_all_but_the_head(tmp_path, capsys):
    source = create_model("resnet18", 10)
    path = tmp_path / "imagenet_like.pth"
    torch.save(source.state_dict(), path)  # a bare state dict, as users' backbone weights are
    model = create_model("resnet18", 3)
    loaded, skipped = load_weights(model, path, allow_head_mismatch=True)
    assert (loaded, skipped) == (len(source.state_dict()) - 2, ["fc.weight", "fc.bias"])
    assert model.fc.weight.shape == (3, 512)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert capsys.readouterr().out == ""


def test_build_ensemble_loads_teacher_checkpoints_strictly(tmp_path):
    classes = ["beach", "forest", "harbor"]
    trained, other = create_model("resnet18", 3), create_model("resnet10t", 3)
    save_checkpoint(tmp_path / "t.pt", {"model": trained.state_dict(), "arch": "resnet18",
                                        "classes": classes})
    save_checkpoint(tmp_path / "o.pt", {"model": other.state_dict(), "arch": "resnet10t",
                                        "classes": classes})
    ens = build_ensemble(["resnet18", "resnet10t"], [tmp_path / "t.pt", tmp_path / "o.pt"], [0.5, 0.5],
                         "probs", classes)
    assert all(torch.equal(ens.members[0].state_dict()[k], v) for k, v in trained.state_dict().items())
    assert all(torch.equal(ens.members[1].state_dict()[k], v) for k, v in other.state_dict().items())
    assert not any(p.requires_grad for p in ens.parameters())
    assert ens(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    # Teachers must fit this split's classes, and be the architectures model.teachers names.
    with pytest.raises(CheckpointError, match="3 classes .* not this split's 5"):
        build_ensemble(["resnet18"], [tmp_path / "t.pt"], [1.0], "probs", classes + ["lake", "port"])
    with pytest.raises(CheckpointError, match="is a resnet10t checkpoint, but resnet18 was asked for"):
        build_ensemble(["resnet18", "resnet18"], [tmp_path / "t.pt", tmp_path / "o.pt"], [0.5, 0.5],
                       "probs", classes)
    with pytest.raises(ConfigError):
        build_ensemble(["resnet18", "resnet18"], [tmp_path / "t.pt"], [0.5, 0.5], "probs", classes)


def test_count_parameters_matches_the_papers_sizes():
    student = create_model("efficientnet_b0", 1000)
    assert count_parameters(student) == 5_288_548  # 5.3 M
    ens = TeacherEnsemble([create_model(a, 1000) for a in ("efficientnet_b3", "efficientnet_b0", "resnet50")],
                          [0.4, 0.3, 0.3], "probs")
    assert round(count_parameters(ens) / 1e6, 1) == 43.1
    assert count_parameters(ens, trainable_only=True) == 0
