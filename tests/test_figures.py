"""Grad-CAM against a hand-computed class activation map, on timm models, and the `explain` and
`embed` figures on a tiny generated data set (random weights, no training)."""
from __future__ import annotations

import csv
import struct
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dali_erkt import config as config_mod
from dali_erkt.checkpoint import save_checkpoint
from dali_erkt.commands.figures import embed, explain
from dali_erkt.data.dataset import make_split, save_split
from dali_erkt.errors import ConfigError, DataError
from dali_erkt.models import create_model
from dali_erkt.reports.gradcam import default_target_layer, grad_cam
from dali_erkt.synthetic import make_scenes


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(5, 4)).double()


def hand_cam(model: nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    """CAM (Zhou et al.): sum_k w_ck F_k of the ReLU'd conv maps, ReLU, scaled to [0, 1]."""
    with torch.no_grad():
        f = torch.relu(model[0](x)).numpy()  # (N, K, H, W)
    w = model[4].weight.detach().numpy()[c]  # (K,)
    cam = np.maximum(np.einsum("k,nkhw->nhw", w, f), 0)
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)


def test_grad_cam_is_cam_for_conv_relu_gap_linear():
    model = tiny_cnn().train()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    assert default_target_layer(model, 12) == "1"  # the ReLU: the last map larger than 1 x 1
    for c in range(4):
        cam = grad_cam(model, "1", x, [c] * 3)
        assert cam.maps.shape == (3, 12, 12)
        np.testing.assert_allclose(cam.maps.numpy(), hand_cam(model, x, c), atol=1e-5)
    cam = grad_cam(model, model[1], x)  # predicted classes, module given by itself
    with torch.no_grad():
        assert cam.predicted.tolist() == model(x).argmax(1).tolist() == cam.classes.tolist()
    for i, c in enumerate(cam.classes.tolist()):
        np.testing.assert_allclose(cam.maps[i].numpy(), hand_cam(model, x[i:i + 1], c)[0], atol=1e-5)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the weights


@pytest.mark.parametrize("arch, layer", [("resnet10t", "layer4"), ("efficientnet_b0", "bn2")])
def test_grad_cam_on_timm_models(arch, layer):
    torch.manual_seed(0)
    model = create_model(arch, 5)
    assert default_target_layer(model, 64) == layer
    x = torch.randn(2, 3, 64, 64)
    cam = grad_cam(model, layer, x, [1, 3])
    assert cam.maps.shape == (2, 64, 64) and cam.classes.tolist() == [1, 3]
    assert torch.isfinite(cam.maps).all()
    assert cam.maps.min() >= 0 and cam.maps.max() <= 1
    assert ((cam.maps.amax(dim=(1, 2)) == 1) | (cam.maps.amax(dim=(1, 2)) == 0)).all()
    assert ((cam.probs > 0) & (cam.probs < 1)).all()


def test_a_flat_map_is_zeros_not_rounding_noise():
    # resnet10t at 32 px: layer4 is 1 x 1, so every map is one number upsampled (no spatial
    # information); its rounding differences must not be scaled up to [0, 1].
    torch.manual_seed(0)
    model = create_model("resnet10t", 3)
    cam = grad_cam(model, "layer4", torch.randn(2, 3, 32, 32), [0, 1])
    assert cam.maps.shape == (2, 32, 32) and (cam.maps == 0).all()
    cam = grad_cam(model, "layer4", torch.randn(2, 3, 96, 96), [0, 0])  # 3 x 3: real maps
    assert (cam.maps.amax(dim=(1, 2)) == 1).all() and (cam.maps.amin(dim=(1, 2)) == 0).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    data = make_scenes(root / "data", classes=3, per_class=10, size=32)
    split = make_split(data, 0.5, seed=0)
    save_split(split, root / "split")
    cfg = config_mod.default_config()
    cfg.data.image_size = 32
    ckpts = []
    for name, arch, kind in (("student", "resnet10t", "student"),
                             ("teacher", "resnet10t", "teacher")):
        torch.manual_seed(len(ckpts))
        path = root / name / "last.pt"
        save_checkpoint(path, {"arch": arch, "classes": split.classes, "kind": kind,
                               "model": create_model(arch, 3).state_dict(),
                               "config": config_mod.to_dict(cfg)})
        ckpts.append(str(path))
    return {"root": root, "split": split, "ckpts": ckpts, "cfg": cfg}


def test_explain_writes_the_grid(run):
    images = [run["split"].paths("test")[i] for i in (0, 5, 10)]
    out = run["root"] / "cam.png"
    result = explain(run["ckpts"], images, out)
    w, h = png_size(out)
    # Panels of 1.9 in at 110 dpi: 1 + 2 columns; 3 rows of 1.9 in plus captions, plus the
    # title; saved with a tight bounding box (a little under the figure's size).
    assert 0.85 * 1.9 * 3 * 110 < w <= round(1.9 * 3 * 110) + 2
    assert 1.9 * 3 * 110 < h < ((1.9 + 0.45) * 3 + 0.6) * 110 + 2
    assert result["target_layers"] == {c: "layer4" for c in run["ckpts"]}
    assert result["image_size"] == 32 and result["explained"] == "predicted"
    assert all(len(v) == 3 for v in result["predicted"].values())

    # One checkpoint, the true classes by name, the images as a folder.
    folder = run["root"] / "data" / run["split"].classes[1]
    files = sorted(folder.iterdir())[:2]
    one = run["root"] / "one"
    one.mkdir()
    for f in files:
        (one / f.name).write_bytes(f.read_bytes())
    out2 = run["root"] / "cam_true.png"
    result = explain(run["ckpts"][:1], [one], out2, labels=[run["split"].classes[1]] * 2,
                     image_size=48)
    assert 0.8 * 1.9 * 2 * 110 < png_size(out2)[0] <= round(1.9 * 2 * 110) + 2
    assert result["explained"] == "true"


def test_explain_refuses_bad_input_in_one_line(run, tmp_path):
    image = run["split"].paths("test")[0]
    with pytest.raises(ConfigError, match="2 labels for 1 images"):
        explain(run["ckpts"], [image], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ConfigError, match="not one of the checkpoints' classes"):
        explain(run["ckpts"], [image], tmp_path / "x.png", labels=["no-such-class"])
    with pytest.raises(DataError, match="missing"):
        explain(run["ckpts"], [tmp_path / "nope.jpg"], tmp_path / "x.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        explain(run["ckpts"], [bad], tmp_path / "x.png")
    vit = tmp_path / "vit.pt"  # no convolutional feature map: one line, not a traceback
    save_checkpoint(vit, {"arch": "vit_tiny_patch16_224", "classes": run["split"].classes,
                          "kind": "teacher", "model": create_model("vit_tiny_patch16_224", 3).state_dict(),
                          "config": config_mod.to_dict(run["cfg"])})
    with pytest.raises(ConfigError, match="Grad-CAM cannot run on .*vit_tiny_patch16_224"):
        explain([vit], [image], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_embed_writes_map_and_coordinates(run):
    out = run["root"] / "tsne.png"
    result = embed(run["ckpts"][0], run["root"] / "split", out, perplexity=30, seed=0)
    assert png_size(out)[0] > 400
    n = len(run["split"].test)
    assert result["points"] == n == 15 and result["feature_dim"] == 512
    assert result["perplexity"] == pytest.approx((n - 1) / 3)  # lowered for 15 points
    rows = list(csv.DictReader(open(run["root"] / "tsne.csv")))
    assert len(rows) == n
    assert [r["path"] for r in rows] == [p for p, _ in run["split"].test]
    assert [int(r["label"]) for r in rows] == run["split"].labels("test")
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert xy.shape == (n, 2) and np.isfinite(xy).all() and xy.std(0).min() > 0
    again = embed(run["ckpts"][0], run["root"] / "split", run["root"] / "tsne2.png", seed=0)
    assert open(run["root"] / "tsne2.csv").read() == open(run["root"] / "tsne.csv").read()
    assert again["kl_divergence"] == result["kl_divergence"]  # seeded


def test_embed_names_the_missing_extra(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'dali-erkt\[figures\]'"):
        embed(run["ckpts"][0], run["root"] / "split", tmp_path / "t.png")
    with pytest.raises(ConfigError, match="perplexity"):
        embed(run["ckpts"][0], run["root"] / "split", tmp_path / "t.png", perplexity=float("nan"))


# ---- layout: no heading or title clipped or overlapping ------------------------------------------

def text_boxes(fig, texts):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_text()]


def inside(box, outer, slack=1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.y0 >= outer.y0 - slack
            and box.x1 <= outer.x1 + slack and box.y1 <= outer.y1 + slack)


def long_columns(n: int, rows: int = 2):
    """n columns headed as explain heads them, with the longest timm names of the study."""
    rng = np.random.default_rng(0)
    archs = ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "tf_efficientnet_lite1",
             "efficientnet_b3", "mobilenetv2_100", "tf_efficientnet_lite0"]
    return [(f"{'student' if k == 0 else 'teacher'} {archs[k % 6]}\n{archs[k % 6]}/last.pt\nat bn2",
             [rng.random((32, 32)) for _ in range(rows)],
             [f"pred sparse_residential ({'right' if k % 2 else 'WRONG'})\nmap of "
              f"sparse_residential p=0.{k}3" for _ in range(rows)]) for k in range(n)]


@pytest.mark.parametrize("models", [2, 5])  # 3 and 6 columns with the image column
def test_grad_cam_headings_neither_overlap_nor_leave_the_figure(models):
    from dali_erkt.reports.gradcam import grid_figure

    rng = np.random.default_rng(1)
    images = [rng.random((32, 32, 3)) for _ in range(2)]
    rows = ["sparse_residential/sparse_residential_0001.jpg\ntrue: sparse_residential"] * 2
    fig = grid_figure(images, rows, long_columns(models), title="Grad-CAM at the last "
                      "convolutional stage, for the true class; images at 32 px (trained at 32 px)")
    axes = fig.axes
    headings = [ax.title for ax in axes[:models + 1]]
    captions = [ax.xaxis.label for ax in axes]
    figure_box = fig.bbox
    heads = text_boxes(fig, headings)
    assert len(heads) == models + 1
    for i, a in enumerate(heads):
        assert inside(a, figure_box), (headings[i].get_text(), a, figure_box)
        for b in heads[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0, "column headings overlap"
    # Each heading sits within its own column's share of the width; captions too, and none
    # overlaps another in its row.
    width = figure_box.width / (models + 1)
    assert all(box.width <= width for box in heads)
    caps = text_boxes(fig, captions)
    assert all(inside(box, figure_box) and box.width <= width for box in caps)
    for r in range(2):
        row = sorted(caps[r * (models + 1):(r + 1) * (models + 1)], key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(row, row[1:])), "captions overlap"
    # The title is inside the figure and above every heading.
    (sup,) = text_boxes(fig, [fig._suptitle])
    assert inside(sup, figure_box) and sup.y0 >= max(b.y1 for b in heads) - 1
    # The heading keeps the role and the architecture on its first line, the layer apart.
    first = headings[1].get_text().split("\n")
    assert first[0] == "student tf_efficientnet_lite0" and first[-1] == "at bn2"


def test_tsne_title_is_inside_the_figure():
    from dali_erkt.reports.tsne import tsne_figure

    rng = np.random.default_rng(0)
    names = [f"class_with_a_long_name_{k}" for k in range(12)]
    labels = rng.integers(0, 12, 200)
    title = ("t-SNE of student tf_efficientnet_lite0 penultimate features (1280-d), 200 test "
             "images; test OA 77.1%; perplexity 30")
    fig = tsne_figure(rng.normal(size=(200, 2)), labels, names, (labels + (rng.random(200) < 0.2)) % 12,
                      title)
    (ax,) = fig.axes
    boxes = text_boxes(fig, [fig._suptitle, ax.get_legend().get_title(),
                             *ax.get_legend().get_texts(), ax.xaxis.label, ax.yaxis.label])
    assert all(inside(box, fig.bbox) for box in boxes), [b for b in boxes if not inside(b, fig.bbox)]
    assert fig._suptitle.get_text().replace("\n", " ") == title  # wrapped, nothing cut
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert inside(legend, fig.bbox) and legend.x0 >= ax.get_window_extent().x1 - 1
