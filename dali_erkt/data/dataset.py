"""Datasets on disk: scan a folder-per-class tree, draw and save train/test splits, check files.

A split is saved as plain file lists (`train.txt`, `test.txt`: `relative/path<TAB>label`) plus
`classes.txt` and `split.yaml`, so every run that uses it sees exactly the same images.
DALI stops on the first corrupt file with no way to skip it, so `check_files` decodes every
image up front and splits refuse files known to be bad.
"""
from __future__ import annotations

import hashlib
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Collection, Iterable

import numpy as np
import yaml
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import DataError
from ..io import atomic_write_text

# What DALI and Pillow both decode. Other files are skipped, and `scan_tree` says which.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# The formats (Pillow's names) DALI's decoders read, tried one by one through its CPU decoder
# (DALI 2.4): JPEG (MPO: a JPEG with extra frames), PNG, TIFF, BMP, JPEG 2000, WebP, PNM. GIF,
# ICO, TGA, PCX and the rest stop the pipeline whatever the file's extension says.
DALI_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "JPEG2000", "WEBP", "PPM")
PARTS = ("train", "test")


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class Tree:
    classes: list[str]
    samples: list[tuple[str, int]]  # (path relative to the root, POSIX form; class index)
    skipped: list[str]  # files that are not images by their name (relative paths)


def scan_tree(root) -> Tree:
    """The classes and images of an ImageFolder-style tree, and the files skipped.

    Classes are the sorted names of the non-hidden sub-folders; samples are (path relative to
    `root`, class index), class by class, sorted within each class. Images in nested folders
    below a class folder belong to that class, as in torchvision; folder links are followed, but a
    link back into its own folder (a loop) or a file reached twice is refused, so every real
    file counts once, in one class.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the dataset's top folder (one sub-folder per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; expected one sub-folder of images per class")

    samples: list[tuple[str, int]] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}  # real path of each file -> where it was first found
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in _walk(root, root / name):
            rel_dir = Path(dirpath).relative_to(root)
            for f in filenames:
                rel = (rel_dir / f).as_posix()
                if not _is_image(f):
                    if not f.startswith("."):
                        skipped.append(rel)
                    continue
                real = os.path.realpath(os.path.join(dirpath, f))
                if real in seen:
                    raise DataError(f"{rel} and {seen[real]} are the same file (a link): each image "
                                    "must appear once, in one class; remove one of them")
                seen[real] = rel
                found.append(rel)
        if not found:
            empty.append(name)
        samples += [(p, label) for p in sorted(found)]
    exts = " ".join(IMAGE_EXTENSIONS)
    if not samples:
        raise DataError(f"no images ({exts}) found under {root}; check the path and the file types")
    if empty:
        raise DataError(f"class folder {empty[0]!r} in {root} has no images ({exts})"
                        f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}; "
                        "add images or remove the folder")
    if len(classes) < 2:
        raise DataError(f"{root} has one class folder ({classes[0]}): classification needs at least "
                        "two; add a folder of images per class")
    return Tree(classes, samples, sorted(skipped))


def _walk(root: Path, top: Path):
    """os.walk following folder links, refusing a link that leads back into its own path."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        here = os.path.realpath(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # prune hidden folders
        for d in dirnames:
            target = os.path.realpath(os.path.join(dirpath, d))
            if here == target or here.startswith(target + os.sep):
                rel = (Path(dirpath).relative_to(root) / d).as_posix()
                raise DataError(f"{rel} links back to {target}, a folder that contains it: a loop; "
                                "remove the link")
        yield dirpath, dirnames, filenames


def scan(root) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of an ImageFolder-style tree; see `scan_tree`."""
    tree = scan_tree(root)
    return tree.classes, tree.samples


def list_images(folder, recursive: bool = False) -> list[Path]:
    """The one image lister: the image files in `folder` by name (IMAGE_EXTENSIONS, not hidden),
    sorted; with `recursive`, also those in its non-hidden sub-folders, walked as `scan_tree`
    walks a class (links followed, a loop refused). None found is a one-line DataError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    if recursive:
        found = sorted(Path(dirpath) / f for dirpath, _, filenames in _walk(folder, folder)
                       for f in filenames if _is_image(f))
    else:
        found = sorted(Path(e.path) for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
    if not found:
        raise DataError(f"folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return found


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

@dataclass
class Split:
    root: str  # absolute path of the dataset folder
    classes: list[str]
    train: list[tuple[str, int]]  # (path relative to root, label)
    test: list[tuple[str, int]]
    train_ratio: float
    seed: int
    stratified: bool
    # The split folder it was read from ("" if drawn in memory); for messages, not compared.
    folder: str = field(default="", compare=False)

    def _part(self, part: str) -> list[tuple[str, int]]:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {part!r}")
        return getattr(self, part)

    def paths(self, part: str) -> list[str]:
        return [os.path.join(self.root, p) for p, _ in self._part(part)]

    def labels(self, part: str) -> list[int]:
        return [label for _, label in self._part(part)]


def _n_train(ratio: float, n: int) -> int:
    # Round half up (not Python's half-to-even) so odd class sizes behave predictably; keep at
    # least one image on each side whenever there are two to share.
    k = math.floor(ratio * n + 0.5)
    return min(max(k, 1), n - 1) if n >= 2 else k


def _name_some(paths: list[str], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def make_split(root, train_ratio: float, seed: int = 0, stratify: bool = True,
               bad: Collection[str] | None = None) -> Split:
    """Draw `train_ratio` of the images for training at random (seeded); the rest is test.

    Stratified (default): each class gets round(train_ratio * n_c) training images. Otherwise the
    training images are drawn from the whole set. Lists keep the scan order.
    """
    if not 0.0 < float(train_ratio) < 1.0:
        raise DataError(f"train ratio must be between 0 and 1 (exclusive), got {train_ratio}")
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    classes, samples = scan(root)
    root = os.path.abspath(root)
    if bad:
        bad_set = {PurePath(p).as_posix() for p in bad}
        hits = [p for p, _ in samples if p in bad_set]
        if hits:
            raise DataError(f"{len(hits)} unreadable image file(s) in {root}: {_name_some(hits)}; "
                            f"run `dali-erkt check-data {root}` and remove them")

    rng = np.random.Generator(np.random.PCG64(seed))
    groups = ([[i for i, (_, y) in enumerate(samples) if y == c] for c in range(len(classes))]
              if stratify else [list(range(len(samples)))])
    in_train = np.zeros(len(samples), dtype=bool)
    for idx in groups:
        chosen = rng.permutation(len(idx))[:_n_train(float(train_ratio), len(idx))]
        in_train[np.asarray(idx)[chosen]] = True
    train = [s for s, t in zip(samples, in_train) if t]
    test = [s for s, t in zip(samples, in_train) if not t]
    for part, items in (("training", train), ("test", test)):
        missing = sorted(set(range(len(classes))) - {y for _, y in items})
        if missing:
            n = sum(1 for _, y in samples if y == missing[0])
            raise DataError(f"the split leaves class {classes[missing[0]]!r} ({n} image"
                            f"{'s' if n != 1 else ''}) with no {part} image"
                            f"{f' (and {len(missing) - 1} more classes)' if len(missing) > 1 else ''}: "
                            "add images to it, or change --train-ratio" +
                            ("" if stratify else " or drop --no-stratify"))
    return Split(root, classes, train, test, float(train_ratio), int(seed), bool(stratify))


def _listing(items: list[tuple[str, int]]) -> str:
    return "".join(f"{p}\t{y}\n" for p, y in items)


def split_digests(split: Split) -> dict:
    """SHA-256 of the training list with the classes (`split_sha256`) and of the test list
    (`test_sha256`): what the teacher cache's key holds (their values must not change)."""
    train = _listing(split.train) + "|" + "\n".join(split.classes)
    return {"split_sha256": hashlib.sha256(train.encode()).hexdigest(),
            "test_sha256": hashlib.sha256(_listing(split.test).encode()).hexdigest()}


def split_sha256(split: Split) -> str:
    """A split's identity: one SHA-256 over its lists (train, test, classes), the same wherever the
    split folder or the data set lies. A run records it; a resume with another split is refused."""
    d = split_digests(split)
    return hashlib.sha256(f"{d['split_sha256']}\n{d['test_sha256']}".encode()).hexdigest()


def save_split(split: Split, out_dir) -> Path:
    """Write the split as file lists into `out_dir` (created if needed); return the folder."""
    out = Path(out_dir)
    for path, _ in split.train + split.test:
        if "\t" in path or "\n" in path:
            raise DataError(f"file name {path!r} contains a tab or newline; rename it")
    atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in split.classes))
    for part in PARTS:
        atomic_write_text(out / f"{part}.txt", _listing(getattr(split, part)))
    meta = {
        "root": os.path.abspath(split.root), "train_ratio": split.train_ratio, "seed": split.seed,
        "stratified": split.stratified, "num_classes": len(split.classes),
        "num_train": len(split.train), "num_test": len(split.test),
    }
    # Written last: a folder with split.yaml has all its lists.
    atomic_write_text(out / "split.yaml", yaml.safe_dump(meta, sort_keys=False))
    return out


AGAIN = "write the split again with `dali-erkt split`"


def _read_text(path: Path) -> str:
    """A split file's text; a byte that is not UTF-8 is one line naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}): save "
                        f"it as UTF-8, or {AGAIN}") from None


def _inside(path: str) -> str | None:
    """`path` normalised, or None where it is absolute or leaves the dataset root (`..`)."""
    if path.startswith(("/", "\\")) or PurePath(path).is_absolute():
        return None
    norm = posixpath.normpath(path)
    return None if norm == ".." or norm.startswith("../") else norm


def _read_list(path: Path, classes: list[str]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The (path, label) lines of train.txt or test.txt, and each normalised path's line number;
    every line checked: two fields, a known label, a path inside the root listed once, and in a
    folder-per-class layout (the first folder is a class name) the label of that folder."""
    n_classes, index = len(classes), {c: i for i, c in enumerate(classes)}
    items, lines = [], {}
    for no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0] or not (fields[1].isascii() and fields[1].isdigit()) \
                or int(fields[1]) >= n_classes:
            raise DataError(f"{path} line {no} is malformed ({line[:60]!r}); expected "
                            f"'relative/path<TAB>label' with a label below {n_classes}; {AGAIN}")
        rel, label = fields[0], int(fields[1])
        norm = _inside(rel)
        if norm is None:
            raise DataError(f"{path} line {no} lists {rel!r}, which is not inside the dataset folder "
                            f"(paths are relative to it, without an absolute start or '..'); {AGAIN}")
        if norm in lines:
            raise DataError(f"{path} lists {rel} twice (lines {lines[norm]} and {no}): each image is "
                            f"listed once; remove one line, or {AGAIN}")
        folder = norm.split("/", 1)[0] if "/" in norm else None
        if folder in index and index[folder] != label:
            raise DataError(f"{path} line {no} labels {rel} {label} ({classes[label]!r}) but it lies "
                            f"in the folder of class {index[folder]} ({folder!r}): fix the label, or "
                            f"{AGAIN}")
        lines[norm] = no
        items.append((rel, label))
    return items, lines


def _read_classes(path: Path) -> list[str]:
    """classes.txt's names, one a line (blank lines skipped), each given once."""
    classes, seen = [], {}
    for no, name in enumerate(_read_text(path).splitlines(), 1):
        if not name:
            continue
        if name in seen:
            raise DataError(f"{path} line {no} repeats class {name!r} (line {seen[name]}): each class "
                            f"is named once; {AGAIN}")
        seen[name] = no
        classes.append(name)
    return classes


def load_split(split_dir, root=None) -> Split:
    """Read a split written by `save_split`; `root` overrides the saved dataset folder (moved data).

    What `split` guarantees is checked again, each defect one line naming the file (and line):
    UTF-8 text, well-formed lines, every path inside the dataset folder and listed once, labels
    matching the class folder an image lies in, train and test disjoint (a test image in
    train.txt is a leak), classes named once and each with a training image, the counts
    split.yaml records, and every file present."""
    d = Path(split_dir)
    if not d.is_dir():
        raise DataError(f"split folder {d} does not exist; create it with `dali-erkt split`")
    for name in ("split.yaml", "classes.txt", "train.txt", "test.txt"):
        if not (d / name).is_file():
            raise DataError(f"split folder {d} has no {name}; {AGAIN}")
    text = _read_text(d / "split.yaml")
    try:
        meta = yaml.safe_load(text)
        if not isinstance(meta, dict):
            raise ValueError("not a mapping")
        saved_root, ratio = meta["root"], float(meta["train_ratio"])
        seed, stratified = int(meta["seed"]), bool(meta["stratified"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{d / 'split.yaml'} is malformed ({exc}); write the split again") from None
    classes = _read_classes(d / "classes.txt")
    (train, train_lines), (test, test_lines) = (_read_list(d / f"{part}.txt", classes) for part in PARTS)
    leaked = [p for p in test_lines if p in train_lines]
    if leaked:
        p = min(leaked, key=test_lines.get)
        raise DataError(f"{p} is listed in both {d / 'train.txt'} (line {train_lines[p]}) and "
                        f"{d / 'test.txt'} (line {test_lines[p]}): a test image trained on leaks the "
                        f"test set{f' ({len(leaked)} such images)' if len(leaked) > 1 else ''}; remove "
                        f"it from one list, or {AGAIN}")
    trained = {y for _, y in train}
    untrained = [c for i, c in enumerate(classes) if i not in trained]
    if untrained:
        more = f" (and {len(untrained) - 1} more)" if len(untrained) > 1 else ""
        raise DataError(f"class {untrained[0]!r}{more} of {d / 'classes.txt'} has no image in "
                        f"{d / 'train.txt'}: every class needs a training image; {AGAIN}")
    for part, items in (("train", train), ("test", test)):
        if f"num_{part}" in meta and meta[f"num_{part}"] != len(items):
            raise DataError(f"{d / (part + '.txt')} lists {len(items)} images but split.yaml says "
                            f"{meta[f'num_{part}']}; write the split again")

    root = os.path.abspath(root if root is not None else saved_root)
    for path, _ in train + test:
        if not os.path.isfile(os.path.join(root, path)):
            raise DataError(f"{path} listed in split {d} is missing under {root}; if the dataset "
                            "moved, pass its new folder as root, otherwise write the split again")
    return Split(root, classes, train, test, ratio, seed, stratified, folder=os.path.abspath(d))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def _to_rgb(im: Image.Image) -> np.ndarray:
    im = ImageOps.exif_transpose(im)  # DALI's decoders honour EXIF orientation by default
    if im.mode.startswith("I;16") or im.mode == "I":
        # Pillow's convert("RGB") clips 16-bit values at 255; keep the top byte like OpenCV does.
        gray = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        gray = np.asarray(im).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_rgb(path) -> np.ndarray:
    """Decode an image into a uint8 HxWx3 RGB array (gray, palette, RGBA, CMYK, 16-bit included)."""
    with Image.open(path) as im:
        im.load()
        return _to_rgb(im)


def why_unreadable(path: str) -> str | None:
    """Why training could not decode `path`, or None where it can: a format DALI's decoders do not
    read (whatever the extension says), or a file Pillow cannot decode fully."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format not in DALI_FORMATS:
                return (f"{im.format or 'unknown'} image, a format DALI's decoder cannot read "
                        "(it reads JPEG, PNG, TIFF, BMP, JPEG 2000, WebP and PNM): convert it")
            im.load()
            _to_rgb(im)
        return None
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image (format not recognised)"
    except Exception as exc:  # any decoder failure makes the file unusable
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower():
            return msg if msg.startswith("image file is truncated") else f"truncated: {msg}"
        return f"cannot decode: {msg[:100]}"


def check_files(root, rel_paths: Iterable[str], workers: int = 2) -> list[tuple[str, str]]:
    """Decode every file fully; return (relative path, reason) for each unreadable one, in order."""
    rel_paths = list(rel_paths)
    # A truncated file must fail here, so force Pillow's strict mode while checking.
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        # Threads suffice: Pillow's decoders release the GIL.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            reasons = list(pool.map(lambda p: why_unreadable(os.path.join(root, p)), rel_paths))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return [(p, r) for p, r in zip(rel_paths, reasons) if r is not None]
