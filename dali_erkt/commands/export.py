"""`export`: a run's model (student or teacher) to ONNX, checked with onnxruntime against PyTorch.

The model is rebuilt from its checkpoint (arch, classes, weights) and exported with PyTorch's
torch.export-based exporter (opset 18 or later: it has no lower implementations), with a dynamic
batch axis: input "images" (N, 3, S, S) float32, normalised as in training; output "logits" (N, C).
The check runs both on a batch of real images decoded, resized and normalised like the run's test
images (from a split, a folder or files), or a seeded random batch when none is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..models import load_trained

NEEDS = "export needs onnx, onnxruntime and onnxscript: pip install 'dali-erkt[export]'"


def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter torch.onnx.export uses by default)
    except ImportError:
        raise ConfigError(NEEDS) from None
    return onnxruntime


def _spread(items: list, limit: int) -> list:
    """Up to `limit` items evenly spaced over the list (so a sorted list gives several classes)."""
    step = max(1, len(items) // limit)
    return items[::step][:limit]


def _image_files(source, limit: int) -> list[Path]:
    """Up to `limit` image files: a split folder's test images, a folder's images, or files."""
    from ..data.dataset import list_images, load_split
    if not isinstance(source, (str, Path)) and len(source) == 1:
        source = source[0]  # one folder given as a list (the command line's repeatable option)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if (path / "split.yaml").is_file():
            split = load_split(path)
            return [Path(p) for p in _spread(split.paths("test"), limit)]
        if path.is_dir():
            return _spread(list_images(path, recursive=True), limit)
        source = [path]
    files = [Path(p) for p in source][:limit]
    for f in files:
        if not f.is_file():
            raise DataError(f"image {f} does not exist")
    return files


def real_batch(source, image_size: int, mean, std, limit: int = 8) -> tuple[torch.Tensor, list[str]]:
    """(images, their paths): decoded, resized to image_size and normalised as at evaluation."""
    from ..data.dataset import load_rgb
    from ..data.reference import normalize, resize, to_tensor
    files = _image_files(source, limit)
    try:
        images = [resize(to_tensor(load_rgb(f)), image_size) for f in files]
    except OSError as exc:
        raise DataError(f"cannot decode an image for the check ({str(exc).splitlines()[0][:120]})") \
            from None
    return normalize(torch.stack(images), mean, std), [str(f) for f in files]


def export_onnx(checkpoint, onnx_path, *, image_size: int | None = None, batch_images=None,
                max_images: int = 8, opset: int = 18, check: bool = True, seed: int = 0,
                force: bool = False) -> dict:
    """Export a run checkpoint's model to `onnx_path` and (with `check`) compare onnxruntime's
    logits with PyTorch's on `batch_images` (a split folder, an image folder or files; else a
    seeded random batch). Returns what was exported and the comparison."""
    ort = _onnx_modules()
    if opset < 18:
        raise ConfigError(f"opset {opset}: torch.onnx's exporter writes opset 18 or later")
    onnx_path = Path(onnx_path)
    if onnx_path.exists() and not force:
        raise ConfigError(f"{onnx_path} exists: pass --force to replace it")
    model, state = load_trained(checkpoint)
    model.eval()
    data = state.stored_config().data
    size = int(image_size or data.image_size)
    if size < 16:
        raise ConfigError(f"--image-size {size}: use 16 or more")
    mean, std = list(data.mean), list(data.std)

    if batch_images is not None:
        x, files = real_batch(batch_images, size, mean, std, max_images)
    else:
        gen = torch.Generator().manual_seed(seed)
        x, files = torch.randn(max(2, max_images), 3, size, size, generator=gen), []
    example = x[:2] if len(x) >= 2 else torch.cat([x, x])  # batch 1 would fix the axis to 1
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    try:
        torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          external_data=False, verbose=False)
        tmp.replace(onnx_path)
    except Exception as exc:  # the exporter's errors are many and long: one line, then stop
        tmp.unlink(missing_ok=True)
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"ONNX export of {state.arch} failed ({why})") from None

    result = {"onnx": str(onnx_path), "checkpoint": str(checkpoint), "arch": state.arch,
              "kind": state.kind, "classes": list(state.classes), "image_size": size,
              "mean": mean, "std": std, "opset": opset, "input": "images", "output": "logits",
              "bytes": onnx_path.stat().st_size}
    if check:
        result["check"] = compare(model, onnx_path, x, ort, files)
    return result


def compare(model: torch.nn.Module, onnx_path, x: torch.Tensor, ort, files: Sequence[str] = ()) -> dict:
    """onnxruntime's logits against PyTorch's (float32, CPU) on the batch `x`."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        ref = model.float().cpu()(x).numpy()
    return {"images": len(x), "source": "real" if files else "random (seeded)",
            "files": list(files), "max_abs_diff": float(np.abs(got - ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit": float(np.abs(ref).max())}


def format_export(result: dict) -> str:
    lines = [f"exported {result['kind'] or 'model'} {result['arch']} ({len(result['classes'])} "
             f"classes) to {result['onnx']} ({result['bytes'] / 1e6:.1f} MB, opset "
             f"{result['opset']}): input 'images' (N, 3, {result['image_size']}, "
             f"{result['image_size']}) float32 normalised with mean {result['mean']} std "
             f"{result['std']}, output 'logits' (N, {len(result['classes'])})"]
    c = result.get("check")
    if c:
        lines.append(f"onnxruntime vs PyTorch on {c['images']} {c['source']} images: max abs "
                     f"logit difference {c['max_abs_diff']:.2e} (logits up to "
                     f"{c['max_abs_logit']:.3g}), argmax agreement {100 * c['argmax_agreement']:.0f}%")
    return "\n".join(lines)
