"""Checkpoints: atomic saves, loads that never run code, and strict weight loading into a model.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts) so `torch.load(weights_only=True)`
can read it: a file that needs code to unpickle is refused, never executed. Our own checkpoints are
dicts with a "model" state dict and an "arch" name; bare state dicts and `.safetensors` files load too.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_write

_PLAIN = "only plain-tensor checkpoints (tensors, numbers, strings, lists, dicts) are accepted"
# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LEAF_TYPES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype,
               torch.device)


def _check_plain(value, where: str, path) -> None:
    """Refuse, before writing, anything `weights_only=True` could not read back."""
    if isinstance(value, _LEAF_TYPES):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key", path)
            _check_plain(item, f"{where}[{key!r}]", path)
        return
    if type(value) in (list, tuple, torch.Size):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", path)
        return
    raise CheckpointError(f"cannot save checkpoint {path}: {where} is a {type(value).__name__}; {_PLAIN}")


def save_checkpoint(path, state: dict) -> None:
    """Write `state` with torch.save; the file is either the old one or the complete new one."""
    _check_plain(state, "state", path)

    # Serialised in memory, then written by plain file I/O: a full disk then raises the OSError
    # that names it (torch's own writer reports it as an opaque RuntimeError).
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())

    atomic_write(Path(path), write)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a torch checkpoint without running any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(f"checkpoint {path} needs code to load ({found.group(1)}), so it "
                                  f"was not loaded: {_PLAIN}") from None
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint of plain data (a pickle "
                              f"that may need code to load, or a corrupt file): not loaded; "
                              f"{_PLAIN}") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {path} cannot be read: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - bytes that are no torch file fail in many ways
        # (RuntimeError, EOFError, ValueError, IndexError, KeyError... from the unpickler)
        first = (str(exc).split(". ")[0].splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({first}): "
                              f"{_PLAIN}") from None


def _read_state(path: Path) -> tuple[dict, str | None]:
    """The state dict in `path` and the arch it records (None where it records none)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            return load_file(str(path), device="cpu"), None
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file "
                                  f"({str(exc).splitlines()[0][:120]})") from None
    obj = load_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    # Ours use "model"; timm's training script uses "state_dict".
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict: expected tensors, or a dict "
                              "with a 'model' state dict")
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"checkpoint {path} is not a state dict: its key {odd[0]!r} is not "
                              "a tensor name (a string)")
    return obj, arch


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _base_arch(name: str) -> str:
    return name.split(".", 1)[0]  # timm's "resnet50.a1_in1k" is the resnet50 architecture


def _head_prefix(model: nn.Module) -> str | None:
    """The classifier's module name in timm models ("classifier", "fc", "head.fc"), else None."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    return name if isinstance(name, str) else None


def _listing(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_weights(model: nn.Module, path, arch: str | None = None,
                 allow_head_mismatch: bool = False, note=None) -> tuple[int, list[str]]:
    """Load a weights file into `model` strictly; see `load_state`."""
    state, recorded = _read_state(Path(path))
    return load_state(model, state, path, arch, recorded, allow_head_mismatch, note)


def load_state(model: nn.Module, state: dict, path, arch: str | None = None,
               recorded: str | None = None, allow_head_mismatch: bool = False,
               note=None) -> tuple[int, list[str]]:
    """Load a state dict (read from `path`) into `model` strictly; return (tensors loaded, keys
    left at initialisation).

    `arch` (a timm name) is checked against the arch the file records. With
    `allow_head_mismatch`, a classifier whose class count differs (a user's ImageNet backbone) or
    that is absent is left at its initialisation and everything else loads; otherwise that is an
    error.

    A state dict in the EfficientNet-PyTorch layout (`_conv_stem.weight`, `_blocks.0...`) is
    mapped onto the model by position (see `_map_by_position`); `note`, where given, receives a
    one-line account of the mapping.
    """
    if arch is not None and recorded is not None and _base_arch(recorded) != _base_arch(arch):
        raise CheckpointError(f"checkpoint {path} is for {recorded}, expected {arch}")
    state = _strip_prefixes(state)
    own = model.state_dict()
    head = _head_prefix(model)
    if _is_effnet_pytorch(state, own):
        state = _map_by_position(state, own, head, path, arch or type(model).__name__, note)
    head_w = f"{head}.weight"
    if head and head_w in state and head_w in own and state[head_w].shape != own[head_w].shape:
        theirs, ours = state[head_w].shape[0], own[head_w].shape[0]
        if not allow_head_mismatch:
            raise CheckpointError(f"checkpoint {path} has a {theirs}-class classifier, the model "
                                  f"has {ours} classes: use weights trained on this dataset")
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    missing = [k for k in own if k not in state]
    # A backbone's weights may lack the classifier or have had it dropped above: it keeps its init.
    skipped = [k for k in missing if allow_head_mismatch and head and k.startswith(head + ".")]
    missing = [k for k in missing if k not in skipped]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys ({_listing(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({_listing(unexpected)})" if unexpected else ""]
        raise CheckpointError(f"checkpoint {path} does not fit {arch or type(model).__name__}: "
                              + ", ".join(p for p in parts if p))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in state if state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit {arch or type(model).__name__}: "
                              f"{len(wrong)} tensors differ in shape ({_listing(wrong)})")
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite values in {bad}: it cannot "
                              "be trained from; use another weights file")
    model.load_state_dict(state, strict=not skipped)
    return len(state), skipped


def first_non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor (parameter or buffer) holding NaN or inf."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


# ---- the EfficientNet-PyTorch layout (lukemelas/EfficientNet-PyTorch, its Lite packages) --------

_EFFNET_PT_PREFIXES = ("_conv_stem.", "_blocks.")
_NBT = "num_batches_tracked"


def _is_effnet_pytorch(state: dict, own: dict) -> bool:
    """Keys in the EfficientNet-PyTorch layout, none of which the model has."""
    return any(k.startswith(_EFFNET_PT_PREFIXES) for k in state) and not any(k in own for k in state)


def _map_by_position(state: dict, own: dict, head: str | None, path, name: str, note) -> dict:
    """`state` renamed to the model's keys by pairing tensors in order, each pair of equal shape
    (the classifier's may differ: `load_state` then handles it as a head mismatch). BatchNorm
    counters (`num_batches_tracked`) pair among themselves where both sides have them, else keep
    the model's. A file without a classifier pairs with the model's tensors before it."""
    theirs = [(k, v) for k, v in state.items() if not k.endswith(_NBT)]
    ours = [k for k in own if not k.endswith(_NBT)]
    is_head = (lambda k: k.startswith(head + ".")) if head else (lambda k: False)
    body = [k for k in ours if not is_head(k)]
    if len(theirs) != len(ours) and len(theirs) == len(body):
        ours = body  # a backbone without its classifier
    where = f"checkpoint {path} (EfficientNet-PyTorch layout) does not fit {name} by position"
    if len(theirs) != len(ours):
        raise CheckpointError(f"{where}: {len(theirs)} tensors vs the model's {len(ours)} "
                              f"(not counting {_NBT})")
    for (key, value), ok in zip(theirs, ours):
        if value.shape != own[ok].shape and not is_head(ok):
            raise CheckpointError(f"{where}: {key} {tuple(value.shape)} vs {ok} "
                                  f"{tuple(own[ok].shape)}")
    mapped = {ok: value for (_, value), ok in zip(theirs, ours)}
    their_nbt = [v for k, v in state.items() if k.endswith(_NBT)]
    our_nbt = [k for k in own if k.endswith(_NBT)]
    paired = len(their_nbt) == len(our_nbt)
    for i, k in enumerate(our_nbt):
        mapped[k] = their_nbt[i] if paired else own[k]
    if note:
        note(f"weights: {path} is in the EfficientNet-PyTorch layout: {len(theirs)} tensors mapped "
             f"by position and shape onto {name} ({theirs[0][0]} -> {ours[0]}, ..., "
             f"{theirs[-1][0]} -> {ours[-1]})" + ("" if paired else f"; {_NBT} kept"))
    return mapped
