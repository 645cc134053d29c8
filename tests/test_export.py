"""`export`: a run checkpoint to ONNX, checked with onnxruntime against PyTorch."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import write_image_tree
from dali_erkt.checkpoint import save_checkpoint
from dali_erkt.commands.export import NEEDS, export_onnx, format_export, real_batch
from dali_erkt.errors import CheckpointError, ConfigError, DataError
from dali_erkt.models import create_model

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet10t", 3)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    save_checkpoint(path, {"arch": "resnet10t", "classes": ["a", "b", "c"],
                           "model": model.state_dict(), "kind": "student",
                           "config": {"data": {"image_size": 32, "mean": MEAN, "std": STD}}})
    return path


def onnx_modules():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason="pip install 'dali-erkt[export]'")
    return pytest.importorskip("onnxruntime", reason="pip install 'dali-erkt[export]'")


def test_export_matches_pytorch(tmp_path, checkpoint):
    ort = onnx_modules()
    result = export_onnx(checkpoint, tmp_path / "student.onnx")
    assert (tmp_path / "student.onnx").is_file() and result["bytes"] > 0
    assert result["image_size"] == 32 and result["mean"] == MEAN and result["arch"] == "resnet10t"
    check = result["check"]
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    assert "max abs logit difference" in format_export(result)

    # The batch axis is dynamic: one image and five give PyTorch's logits too.
    from dali_erkt.models import load_trained
    model = load_trained(checkpoint)[0].eval()
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32)
        got = session.run(["logits"], {"images": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=0)

    with pytest.raises(ConfigError) as err:  # never replaced without force
        export_onnx(checkpoint, tmp_path / "student.onnx")
    assert "--force" in str(err.value)


def test_export_checks_on_real_images(tmp_path, checkpoint):
    onnx_modules()
    images = write_image_tree(tmp_path / "data", {"x": 3, "y": 3}, size=(40, 30),
                              formats=("jpg", "png:L"))
    result = export_onnx(checkpoint, tmp_path / "m.onnx", batch_images=[images], max_images=4,
                         image_size=48)
    check = result["check"]
    assert result["image_size"] == 48 and check["images"] == 4 and len(check["files"]) == 4
    assert {f.split("/")[-2] for f in check["files"]} == {"x", "y"}  # spread over the folder
    assert check["source"] == "real" and check["max_abs_diff"] < 1e-4


def test_missing_packages_is_one_line(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails
    with pytest.raises(ConfigError) as err:
        export_onnx(checkpoint, tmp_path / "m.onnx")
    assert str(err.value) == NEEDS and "dali-erkt[export]" in NEEDS


def test_bad_input_is_one_line(tmp_path, checkpoint):
    onnx_modules()
    save_checkpoint(tmp_path / "bare.pt", {"conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError) as err:
        export_onnx(tmp_path / "bare.pt", tmp_path / "m.onnx")
    assert "not a dali-erkt run checkpoint" in str(err.value)
    with pytest.raises(ConfigError) as err:
        export_onnx(checkpoint, tmp_path / "m.onnx", opset=17)
    assert "opset 18" in str(err.value) and "\n" not in str(err.value)


def test_real_batch_from_files_and_missing_file(tmp_path):
    root = write_image_tree(tmp_path / "data", {"x": 2}, size=(40, 30), formats=("jpg:CMYK",))
    files = sorted((root / "x").iterdir())
    x, names = real_batch(files, 32, MEAN, STD)
    assert x.shape == (2, 3, 32, 32) and names == [str(f) for f in files]
    assert -3 < float(x.min()) and float(x.max()) < 3  # normalised, not [0, 255]
    with pytest.raises(DataError) as err:
        real_batch([tmp_path / "none.jpg"], 32, MEAN, STD)
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)
