"""`explain` (Grad-CAM grid, the paper's Figure 10) and `embed` (t-SNE map of the penultimate
features of a split's test images, Figures 11-12).

Images reach the models as evaluation sees them: decoded and resized by the DALI evaluation
pipeline at the run's image size, normalised with the run's mean and std (each checkpoint's own).
The models run as evaluation runs them: through a `Runtime` on `--device`, under its autocast
(bf16 or fp16 on a GPU, fp32 on the CPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.dataset import list_images, load_split, why_unreadable
from ..data.loader import DaliLoader
from ..errors import CheckpointError, ConfigError, DataError
from ..models import load_trained, place
from ..reports.gradcam import default_target_layer, grad_cam, write_grid
from ..reports.tsne import (effective_perplexity, require_sklearn, tsne_2d, write_coords,
                            write_tsne_png)
from ..runtime import Runtime, resolve_runtime

MAX_IMAGES = 64


def _runtime(device: str) -> Runtime:
    """explain's and embed's runtime: the default run settings (precision auto: autocast on a
    GPU) on `device`, which runtime.resolve_device reads."""
    return resolve_runtime(RunConfig(device=device))


def image_files(images) -> list[str]:
    """The image files named: files as given, folders as their image files (sorted)."""
    found = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            found += [str(f) for f in list_images(p)]
        else:
            found.append(str(p))
    if not found:
        raise ConfigError("no images: pass --images FILE_OR_FOLDER (repeatable)")
    if len(found) > MAX_IMAGES:
        raise ConfigError(f"{len(found)} images make a grid too tall: give at most {MAX_IMAGES}")
    for path in found:
        why = why_unreadable(path)
        if why is not None:
            raise DataError(f"{path}: {why}")
    return found


def _class_indices(labels, classes: list[str], n: int) -> list[int] | None:
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} labels for {n} images: give one class per image")
    out = []
    for label in labels:
        s = str(label)
        if s in classes:
            out.append(classes.index(s))
        elif s.isdigit() and int(s) < len(classes):
            out.append(int(s))
        else:
            raise ConfigError(f"label {s!r} is not one of the checkpoints' classes "
                              f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return out


def _load_uint8(paths: list[str], size: int, rt: Runtime) -> torch.Tensor:
    """(N, 3, size, size) uint8: the DALI evaluation pipeline's decode and resize."""
    with DaliLoader(paths, [0] * len(paths), image_size=size, batch_size=len(paths), train=False,
                    device=rt.device, normalize=False, num_threads=rt.dali_threads,
                    prefetch=1) as loader:
        images = torch.cat([b.images for b in loader])
    return images.contiguous()


def explain(checkpoints, images, out, *, image_size=None, device="cpu", labels=None) -> dict:
    """Write the Grad-CAM grid PNG `out`: per image, the image and then one overlay per
    checkpoint (in the order given), each for that model's predicted class, or the image's true
    class where `labels` (class names or indices, one per image) are given."""
    start = time.perf_counter()
    if not checkpoints:
        raise ConfigError("no checkpoints: give the student's and the teachers' last.pt")
    rt = _runtime(device)
    dev = rt.device
    paths = image_files(images)
    loaded = [load_trained(path) for path in checkpoints]
    classes = list(loaded[0][1].classes)
    for path, (_, state) in zip(checkpoints[1:], loaded[1:]):
        if state.classes != classes:
            raise CheckpointError(f"{path} was trained on other classes than {checkpoints[0]}: "
                                  "give checkpoints of one data set")
    cfgs = [state.stored_config() for _, state in loaded]
    size = int(image_size or cfgs[0].data.image_size)
    if size < 16:
        raise ConfigError(f"--image-size {size} is too small: use 16 or more")
    targets = _class_indices(labels, classes, len(paths))
    raw = _load_uint8(paths, size, rt)
    shown = raw.permute(0, 2, 3, 1).float().cpu().numpy() / 255.0
    columns, layers, predictions = [], {}, {}
    for path, (model, state), cfg in zip(checkpoints, loaded, cfgs):
        model = model.to(dev).float()
        mean = torch.tensor(cfg.data.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std, device=dev).view(1, 3, 1, 1)
        x = (raw.float() / 255.0 - mean) / std
        try:
            layer = default_target_layer(model, size)
            with rt.autocast():
                cam = grad_cam(model, layer, x, targets)
        except (ValueError, RuntimeError, AssertionError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise ConfigError(f"Grad-CAM cannot run on {path} ({state.arch}: {why}): explain "
                              "needs a CNN with a convolutional feature map") from None
        where = f"{Path(path).parent.name}/{Path(path).name}"
        heading = f"{state.kind} {state.arch}\n{where}\nat {layer}"  # wrapped to the column
        caps = [f"pred {classes[p]} p={q:.2f}" if targets is None else
                f"pred {classes[p]} ({'right' if p == t else 'WRONG'})\n"
                f"map of {classes[t]} p={q:.2f}"
                for p, t, q in zip(cam.predicted.tolist(), cam.classes.tolist(),
                                   cam.probs.tolist())]
        columns.append((heading, list(cam.maps.cpu().numpy()), caps))
        layers[str(path)] = layer
        predictions[str(path)] = [classes[p] for p in cam.predicted.tolist()]
    rows = [f"{Path(p).parent.name}/{Path(p).name}"
            + ("" if targets is None else f"\ntrue: {classes[t]}")
            for p, t in zip(paths, targets or [0] * len(paths))]
    what = "the true class" if targets is not None else "each model's predicted class"
    trained = sorted({c.data.image_size for c in cfgs})
    at = "" if trained == [size] else f" (trained at {', '.join(map(str, trained))} px)"
    write_grid(shown, rows, columns, out, title=f"Grad-CAM at the last convolutional stage, for "
                                                f"{what}; images at {size} px{at}")
    return {"out": str(out), "images": paths, "checkpoints": [str(c) for c in checkpoints],
            "target_layers": layers, "predicted": predictions, "image_size": size,
            "explained": "true" if targets is not None else "predicted",
            "seconds": round(time.perf_counter() - start, 2)}


def features(model, loader, rt: Runtime):
    """(penultimate features (N, D) float32, labels (N,), predicted (N,)) over a loader, under
    the runtime's autocast."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise CheckpointError(f"{type(model).__name__} has no forward_features/forward_head: embed "
                              "needs a timm model")
    feats, labels, preds = [], [], []
    model = place(model.float(), rt.device, rt.channels_last).eval()
    with torch.inference_mode(), rt.autocast():
        for batch in loader:
            fmap = model.forward_features(batch.images.to(rt.input_dtype))
            pre = model.forward_head(fmap, pre_logits=True).flatten(1)
            logits = model.forward_head(fmap)
            feats.append(pre.float().cpu())
            labels.append(batch.labels.cpu())
            preds.append(logits.argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(labels).numpy(), torch.cat(preds).numpy()


def embed(checkpoint, split_dir, out, *, device="cpu", perplexity=30, seed=0) -> dict:
    """Write the t-SNE map PNG `out` of the checkpoint's penultimate features on the split's
    test images, and beside it `<out stem>.csv` (path, label, class, predicted, x, y)."""
    start = time.perf_counter()
    rt = _runtime(device)
    split = load_split(split_dir)
    model, state = load_trained(checkpoint, split.classes)
    cfg = state.stored_config()
    n = len(split.test)
    perp = effective_perplexity(float(perplexity), n)
    require_sklearn()  # before the features are computed
    with DaliLoader.from_split(split, "test", cfg, device=rt, train=False) as loader:
        feats, labels, preds = features(model, loader, rt)
    coords, kl = tsne_2d(feats, perp, seed)
    out = Path(out)
    csv_path = out.with_suffix(".csv")
    rel = [p for p, _ in split.test]
    write_coords(csv_path, coords, labels, split.classes, rel, preds)
    oa = float((preds == labels).mean())
    title = (f"t-SNE of {state.kind} {state.arch} penultimate features "
             f"({feats.shape[1]}-d), {n} test images; test OA {oa:.1%}; perplexity {perp:g}")
    write_tsne_png(out, coords, labels, split.classes, preds, title)
    return {"png": str(out), "csv": str(csv_path), "points": n, "feature_dim": int(feats.shape[1]),
            "perplexity": perp, "kl_divergence": round(kl, 4), "test_oa": round(oa, 4),
            "image_size": cfg.data.image_size, "seconds": round(time.perf_counter() - start, 2)}
