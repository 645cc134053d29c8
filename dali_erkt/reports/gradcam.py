"""Grad-CAM (Selvaraju et al., 2017) as plain functions, and the grid PNG of the paper's Figure 10.

For a class c and a target layer with activations A (N, K, h, w):

    alpha_ck = mean over (h, w) of d y_c / d A_k       (y_c: the class's logit)
    map_c    = ReLU(sum_k alpha_ck A_k), resized to the input bilinearly, then scaled to [0, 1]
               per image (minus its minimum, over its maximum; a map with no positive evidence
               is all zeros)

The layer's output is caught by a forward hook and its gradient by `torch.autograd.grad`, so the
model's parameters get no `.grad`. Own code rather than torchcam or grad-cam: torchcam 0.5 needs
Python >= 3.11 (the project supports 3.10); grad-cam pulls OpenCV, ttach, SciPy and scikit-learn
for what is these few lines.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write


class Cam(NamedTuple):
    maps: torch.Tensor  # (N, H, W) float32 in [0, 1], at the input's size
    classes: torch.Tensor  # (N,) int64: the class each map explains
    probs: torch.Tensor  # (N,) float32: softmax probability of that class
    predicted: torch.Tensor  # (N,) int64: the model's top class


def default_target_layer(model: nn.Module, image_size: int = 64) -> str:
    """The module whose output is the last convolutional feature map, by name.

    timm models (`forward_features`): the outermost module whose output is the tensor
    `forward_features` returns, found by one dry forward (timm 1.0: ResNets `layer4`,
    EfficientNets and MobileNetV2 `bn2`, after `conv_head`; DenseNet `features`, ConvNeXt
    `norm_pre`). Otherwise the last module run in `forward` whose output is a feature map larger
    than 1 x 1. (timm's `feature_info[-1]` is not it: for EfficientNets it names `blocks.6`, the
    320-channel map before `conv_head`.)
    """
    names = {m: n for n, m in model.named_modules() if n}
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and module in names:
            seen.append((names[module], output))

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        x = torch.zeros(1, 3, image_size, image_size,
                        device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None else torch.float32)
        with torch.no_grad():
            if hasattr(model, "forward_features"):
                final = model.forward_features(x)
                hits = [n for n, out in seen if out is final]
            else:
                model(x)
                hits = [n for n, out in seen if out.shape[-1] * out.shape[-2] > 1]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not hits:
        raise ValueError(f"{type(model).__name__} has no module whose output is a feature map: "
                         "name the Grad-CAM target layer")
    return hits[-1]  # outer modules' hooks run after their children's


def grad_cam(model: nn.Module, layer: str | nn.Module, x: torch.Tensor,
             classes: torch.Tensor | Sequence[int] | None = None) -> Cam:
    """Grad-CAM maps of `model` at `layer` (a module or its name) for the batch `x` (N, 3, H, W,
    normalised as the model expects), for `classes` (one per image; None: each image's
    predicted class). The model runs in eval mode (BatchNorm must not mix the images) and is
    left in the mode it was in."""
    module = model.get_submodule(layer) if isinstance(layer, str) else layer
    caught: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: caught.append(out))
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            # A leaf that needs a gradient, so the layer's output is in the graph even where the
            # model's parameters are frozen.
            logits = model(x.detach().requires_grad_(True)).float()
            if len(caught) != 1 or not isinstance(caught[0], torch.Tensor) or caught[0].dim() != 4:
                raise ValueError(f"Grad-CAM target layer {layer!r} must run once and give a "
                                 f"(N, K, h, w) feature map; it ran {len(caught)} times")
            acts = caught[0]
            predicted = logits.argmax(1)
            target = (predicted if classes is None
                      else torch.as_tensor(classes, device=logits.device).long())
            if target.shape != (logits.shape[0],):
                raise ValueError(f"need one class per image: {tuple(target.shape)} for "
                                 f"{logits.shape[0]} images")
            score = logits.gather(1, target.view(-1, 1)).sum()  # images are independent in eval
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # alpha: (N, K, 1, 1)
    cam = F.relu((weights * acts.detach().float()).sum(1, keepdim=True))
    if cam.shape[-2:] != x.shape[-2:]:
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    probs = logits.detach().softmax(1).gather(1, target.view(-1, 1))[:, 0]
    return Cam(cam.detach(), target.detach(), probs, predicted.detach())


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """`image` (H, W, 3) in [0, 1] blended with the colour-mapped `cam` (H, W) in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps[cmap](np.clip(cam, 0.0, 1.0))[..., :3]
    return np.clip((1.0 - alpha) * image + alpha * heat, 0.0, 1.0)


def write_grid(images: Sequence[np.ndarray], row_names: Sequence[str],
               columns: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str]]], out,
               title: str = "", panel: float = 1.9, dpi: int = 110) -> Path:
    """The Grad-CAM grid PNG: one row per image; the image, then one column per model.

    `columns`: (heading, one map (H, W) in [0, 1] per image, one caption per image). The PNG is
    written atomically to `out`.
    """
    from matplotlib.figure import Figure

    rows, cols = len(images), 1 + len(columns)
    if not rows or any(len(maps) != rows or len(caps) != rows for _, maps, caps in columns):
        raise ValueError(f"need one map and one caption per image ({rows}) in every column")
    title = textwrap.fill(title, width=max(30, int(panel * cols * 13)))  # 8 pt characters per inch
    head = 0.2 + (0.16 * (title.count("\n") + 1) if title else 0.0)  # inches above the grid
    fig = Figure(figsize=(panel * cols, (panel + 0.35) * rows + head), dpi=dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, image in enumerate(images):
        axes[r, 0].imshow(image)
        axes[r, 0].set_xlabel(row_names[r], fontsize=7)
        for c, (_, maps, caps) in enumerate(columns, start=1):
            axes[r, c].imshow(overlay(image, np.asarray(maps[r])))
            axes[r, c].set_xlabel(caps[r], fontsize=7)
    for c, heading in enumerate(["image"] + [h for h, _, _ in columns]):
        axes[0, c].set_title(heading, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - (head - 0.2) / fig.get_figheight()))
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return out
