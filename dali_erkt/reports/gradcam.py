"""Grad-CAM (Selvaraju et al., 2017) as plain functions, and the grid PNG of the paper's Figure 10.

For a class c and a target layer with activations A (N, K, h, w):

    alpha_ck = mean over (h, w) of d y_c / d A_k       (y_c: the class's logit)
    map_c    = ReLU(sum_k alpha_ck A_k), resized to the input bilinearly, then scaled to [0, 1]
               per image (minus its minimum, over its range; a map flat up to rounding, with
               no positive evidence or from a 1 x 1 feature map, is all zeros)

The layer's output is caught by a forward hook and its gradient by `torch.autograd.grad`, so the
model's parameters get no `.grad`. Own code rather than torchcam or grad-cam: torchcam 0.5 needs
Python >= 3.11 (the project supports 3.10); grad-cam pulls OpenCV, ttach, SciPy and scikit-learn
for what is these few lines.
"""
from __future__ import annotations

import re
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
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    span = high - low
    # A map flat up to rounding (no positive evidence, or a 1 x 1 feature map upsampled) has no
    # spatial information: all zeros, not its rounding noise scaled up to [0, 1].
    flat = span <= 1e-5 * high.abs().clamp_min(1e-30)
    cam = torch.where(flat, torch.zeros_like(cam), (cam - low) / span.clamp_min(1e-30))
    probs = logits.detach().softmax(1).gather(1, target.view(-1, 1))[:, 0]
    return Cam(cam.detach(), target.detach(), probs, predicted.detach())


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """`image` (H, W, 3) in [0, 1] blended with the colour-mapped `cam` (H, W) in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps[cmap](np.clip(cam, 0.0, 1.0))[..., :3]
    return np.clip((1.0 - alpha) * image + alpha * heat, 0.0, 1.0)


def wrap_label(text: str, width: int) -> str:
    """`text` with each line broken to at most `width` characters where it can be: at spaces,
    and inside a long name after `_` or `/` (a piece longer than `width` stays whole)."""
    out = []
    for line in str(text).split("\n"):
        current = ""
        for piece in re.findall(r"[^ _/]+[ _/]*|[ _/]+", line):
            if current.strip() and len((current + piece).rstrip()) > width:
                out.append(current.rstrip())
                current = piece.lstrip()
            else:
                current += piece
        out.append(current.rstrip())
    return "\n".join(out)


def chars_per_line(inches: float, fontsize: float) -> int:
    """About how many characters of DejaVu Sans at `fontsize` fit in `inches` (0.55 em each,
    its lowercase letters' width; `shrink_to_fit` catches a line of wider ones)."""
    return max(8, int(inches * 72 / (fontsize * 0.55)))


def shrink_to_fit(fig, texts, width_px: float, minimum: float = 5.0) -> None:
    """Lower the font size of each text artist wider than `width_px` (after a layout pass) until
    it fits, down to `minimum` points."""
    for _ in range(3):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        wide = [(t, t.get_window_extent(renderer).width) for t in texts]
        wide = [(t, w) for t, w in wide if w > width_px and t.get_fontsize() > minimum]
        if not wide:
            return
        for t, w in wide:
            t.set_fontsize(max(minimum, t.get_fontsize() * width_px / w * 0.97))


def grid_figure(images: Sequence[np.ndarray], row_names: Sequence[str],
                columns: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str]]],
                title: str = "", panel: float = 1.9, dpi: int = 110):
    """The Grad-CAM grid as a matplotlib Figure (Agg canvas, constrained layout): one row per
    image; the image, then one column per model. Headings, captions and the title are wrapped to
    their column (the title to the figure) and shrunk where a piece still does not fit, so none
    overlaps another or leaves the figure.

    `columns`: (heading, one map (H, W) in [0, 1] per image, one caption per image).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(images), 1 + len(columns)
    if not rows or any(len(maps) != rows or len(caps) != rows for _, maps, caps in columns):
        raise ValueError(f"need one map and one caption per image ({rows}) in every column")
    fig = Figure(figsize=(panel * cols, (panel + 0.45) * rows + 0.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.04, h_pad=0.04, wspace=0.04, hspace=0.02)
    axes = fig.subplots(rows, cols, squeeze=False)
    caption = chars_per_line(panel, 7)
    for r, image in enumerate(images):
        axes[r, 0].imshow(image)
        axes[r, 0].set_xlabel(wrap_label(row_names[r], caption), fontsize=7)
        for c, (_, maps, caps) in enumerate(columns, start=1):
            axes[r, c].imshow(overlay(image, np.asarray(maps[r])))
            axes[r, c].set_xlabel(wrap_label(caps[r], caption), fontsize=7)
    heading = chars_per_line(panel, 8)
    titles = [axes[0, c].set_title(wrap_label(h, heading), fontsize=8)
              for c, h in enumerate(["image"] + [h for h, _, _ in columns])]
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    texts = titles + [ax.xaxis.label for ax in axes.flat]
    shrink_to_fit(fig, texts, fig.bbox.width / cols * 0.95)
    if title:
        sup = fig.suptitle(textwrap.fill(title, width=chars_per_line(panel * cols, 8)), fontsize=8)
        shrink_to_fit(fig, [sup], fig.bbox.width * 0.98)
    return fig


def write_grid(images: Sequence[np.ndarray], row_names: Sequence[str],
               columns: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str]]], out,
               title: str = "", panel: float = 1.9, dpi: int = 110) -> Path:
    """The Grad-CAM grid PNG (`grid_figure`), written atomically to `out`."""
    fig = grid_figure(images, row_names, columns, title, panel, dpi)
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight",
                                              pad_inches=0.05))
    return out
