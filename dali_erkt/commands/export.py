"""`export`: a run's model (student or teacher) to ONNX, checked with onnxruntime against PyTorch,
and to timm's pretrained folder format, checked by loading it back with timm.

ONNX: the model is rebuilt from its checkpoint (arch, classes, weights) and exported with PyTorch's
torch.export-based exporter (opset 18 or later: it has no lower implementations), with a dynamic
batch axis: input "images" (N, 3, S, S) float32, normalised as in training; output "logits" (N, C).

timm: `DIR/model.safetensors` (the model's state dict) and `DIR/config.json` (architecture,
num_classes, label_names = the run's classes, and a pretrained_cfg whose input size, mean, std,
interpolation and crop describe the run's evaluation: a direct bilinear resize to S x S, no crop),
so that `timm.create_model("local-dir:DIR", pretrained=True)` is the run's model and
`timm.data.resolve_data_config(model=...)` its preprocessing.

Each check runs on a batch of real images decoded, resized and normalised like the run's test
images (from a split, a folder or files), or a seeded random batch when none is given. Every file
is written through `io.atomic_write`: a failed write (read-only folder, a path below a file, a full
disk) is one WriteError line and leaves no partial file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..io import atomic_write
from ..models import load_trained

NEEDS = "export needs onnx, onnxruntime and onnxscript: pip install 'dali-erkt[export]'"
TIMM_FILES = ("model.safetensors", "config.json")


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


def _write(path: Path, write, option: str) -> None:
    """`io.atomic_write`, its one line naming this command's option instead of --out."""
    atomic_write(path, write, advice=f"free some space, or choose a writable {option}")


def _prepare(checkpoint, image_size, batch_images, max_images: int, seed: int):
    """(model in eval mode, its RunState, size, mean, std, check batch, its files)."""
    model, state = load_trained(checkpoint)
    model.eval()
    data = state.stored_config().data
    size = int(image_size or data.image_size)
    if size < 16:
        raise ConfigError(f"--image-size {size}: use 16 or more")
    mean, std = [float(v) for v in data.mean], [float(v) for v in data.std]
    if batch_images is not None:
        x, files = real_batch(batch_images, size, mean, std, max_images)
    else:
        gen = torch.Generator().manual_seed(seed)
        x, files = torch.randn(max(2, max_images), 3, size, size, generator=gen), []
    return model, state, size, mean, std, x, files


def _described(checkpoint, state, size, mean, std) -> dict:
    return {"checkpoint": str(checkpoint), "arch": state.arch, "kind": state.kind,
            "classes": list(state.classes), "image_size": size, "mean": mean, "std": std}


def _refuse_existing(onnx_path=None, timm_dir=None, force: bool = False) -> None:
    if force:
        return
    if onnx_path is not None and Path(onnx_path).exists():
        raise ConfigError(f"{onnx_path} exists: pass --force to replace it")
    if timm_dir is not None:
        held = [name for name in TIMM_FILES if (Path(timm_dir) / name).exists()]
        if held:
            raise ConfigError(f"{timm_dir} already holds {', '.join(held)}: pass --force to replace "
                              "them, or choose another --timm folder")


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
    _refuse_existing(onnx_path=onnx_path, force=force)
    model, state, size, mean, std, x, files = _prepare(checkpoint, image_size, batch_images,
                                                      max_images, seed)
    example = x[:2] if len(x) >= 2 else torch.cat([x, x])  # batch 1 would fix the axis to 1

    def write(tmp: str) -> None:
        # Converted inside the write: a folder that cannot take the file fails before the
        # (slow) conversion; the conversion's own errors are one CheckpointError line.
        try:
            program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                        verbose=False)
        except Exception as exc:  # the exporter's errors are many and long: one line, then stop
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CheckpointError(f"ONNX export of {state.arch} failed ({why})") from None
        program.save(tmp, external_data=False)  # a full disk raises OSError: one WriteError line

    _write(onnx_path, write, "--onnx path")
    result = {"onnx": str(onnx_path), **_described(checkpoint, state, size, mean, std),
              "opset": opset, "input": "images", "output": "logits",
              "bytes": onnx_path.stat().st_size}
    if check:
        result["check"] = compare(model, onnx_path, x, ort, files)
    return result


def timm_config(model: torch.nn.Module, arch: str, classes: Sequence[str], image_size: int,
                mean, std) -> dict:
    """timm's `config.json` for the model: what `timm.create_model("local-dir:DIR")` reads
    (architecture, num_classes, label_names, pretrained_cfg) with the run's evaluation
    preprocessing: resize straight to image_size x image_size (bilinear, antialiased; no aspect
    kept, no crop: timm's crop_mode "squash" with crop_pct 1), then normalise with mean / std."""
    default = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg = {
        "input_size": [3, int(image_size), int(image_size)],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "num_classes": len(classes),
        # The model's own structure, as its timm default records it.
        **{k: default[k] for k in ("first_conv", "classifier", "fixed_input_size") if k in default},
    }
    config = {"architecture": default.get("architecture") or arch.split(".")[0],
              "num_classes": len(classes), "label_names": [str(c) for c in classes],
              "pretrained_cfg": pretrained_cfg}
    if isinstance(getattr(model, "num_features", None), int):  # informational, as timm writes it
        config["num_features"] = model.num_features
    return config


def export_timm(checkpoint, out_dir, *, image_size: int | None = None, batch_images=None,
                max_images: int = 8, check: bool = True, seed: int = 0, force: bool = False) -> dict:
    """Write a run checkpoint's model in timm's pretrained folder format (`model.safetensors`,
    `config.json`) and (with `check`) compare the logits of `timm.create_model("local-dir:DIR",
    pretrained=True)` with the checkpoint's model on a batch. Returns what was written and the
    comparison."""
    import safetensors.torch
    out = Path(out_dir)
    _refuse_existing(timm_dir=out, force=force)
    model, state, size, mean, std, x, files = _prepare(checkpoint, image_size, batch_images,
                                                      max_images, seed)
    config = timm_config(model, state.arch, state.classes, size, mean, std)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(weights, metadata={"format": "pt"})

    def write_weights(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # bytes made above: a full disk is an OSError here
            fh.write(blob)

    # config.json goes first when replacing and is written last: a kill between the two leaves
    # weights without a config (timm refuses the folder), never a config of other weights.
    config_path = out / "config.json"
    try:
        config_path.unlink(missing_ok=True)
    except OSError:
        pass  # not removable: the writes below fail with the one line that says why
    _write(out / "model.safetensors", write_weights, "--timm folder")
    text = json.dumps(config, indent=2) + "\n"
    _write(config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), "--timm folder")
    result = {"timm": str(out), "timm_files": [str(out / n) for n in TIMM_FILES],
              **_described(checkpoint, state, size, mean, std),
              "timm_name": f"local-dir:{out}", "timm_bytes": (out / "model.safetensors").stat().st_size}
    if check:
        result["timm_check"] = compare_timm(model, out, x, files)
    return result


def export(checkpoint, *, onnx_path=None, timm_dir=None, force: bool = False, **options) -> dict:
    """The `export` command: ONNX, timm's folder format or both (both refused up front when a
    target exists and `force` is not given)."""
    if onnx_path is None and timm_dir is None:
        raise ConfigError("nothing to export: give --onnx FILE, --timm DIR or both")
    if onnx_path is not None:
        _onnx_modules()
    _refuse_existing(onnx_path, timm_dir, force)
    result = {}
    if onnx_path is not None:
        result.update(export_onnx(checkpoint, onnx_path, force=force, **options))
    if timm_dir is not None:
        options.pop("opset", None)
        result.update(export_timm(checkpoint, timm_dir, force=force, **options))
    return result


def compare(model: torch.nn.Module, onnx_path, x: torch.Tensor, ort, files: Sequence[str] = ()) -> dict:
    """onnxruntime's logits against PyTorch's (float32, CPU) on the batch `x`."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        ref = model.float().cpu()(x).numpy()
    return _agreement(got, ref, x, files)


def compare_timm(model: torch.nn.Module, folder, x: torch.Tensor, files: Sequence[str] = ()) -> dict:
    """The logits of the folder loaded back by timm against the checkpoint's model's, on `x`."""
    import timm
    try:
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as exc:  # what timm says about a folder it cannot read: one line
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"timm cannot load the exported folder {folder} back ({why})") from None
    with torch.no_grad():
        got = loaded(x).numpy()
        ref = model.float().cpu()(x).numpy()
    return _agreement(got, ref, x, files)


def _agreement(got: np.ndarray, ref: np.ndarray, x: torch.Tensor, files: Sequence[str]) -> dict:
    return {"images": len(x), "source": "real" if files else "random (seeded)",
            "files": list(files), "max_abs_diff": float(np.abs(got - ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit": float(np.abs(ref).max())}


def _check_line(what: str, c: dict) -> str:
    return (f"{what} on {c['images']} {c['source']} images: max abs logit difference "
            f"{c['max_abs_diff']:.2e} (logits up to {c['max_abs_logit']:.3g}), argmax agreement "
            f"{100 * c['argmax_agreement']:.0f}%")


def format_export(result: dict) -> str:
    n = len(result["classes"])
    lines = []
    if "onnx" in result:
        lines.append(f"exported {result['kind'] or 'model'} {result['arch']} ({n} classes) to "
                     f"{result['onnx']} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}): "
                     f"input 'images' (N, 3, {result['image_size']}, {result['image_size']}) float32 "
                     f"normalised with mean {result['mean']} std {result['std']}, output 'logits' "
                     f"(N, {n})")
        if result.get("check"):
            lines.append(_check_line("onnxruntime vs PyTorch", result["check"]))
    if "timm" in result:
        lines.append(f"exported {result['kind'] or 'model'} {result['arch']} ({n} classes) to "
                     f"{result['timm']} (model.safetensors, config.json; "
                     f"{result['timm_bytes'] / 1e6:.1f} MB): "
                     f"timm.create_model({result['timm_name']!r}, pretrained=True)")
        if result.get("timm_check"):
            lines.append(_check_line("timm's local-dir load vs the checkpoint", result["timm_check"]))
    return "\n".join(lines)
