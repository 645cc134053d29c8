"""Shared fixtures: small image datasets generated on the fly (no real dataset is ever copied).

Other test modules import the helpers directly: `from conftest import write_image_tree`.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Formats and modes of the mixed tree: every decoder path the data code must handle.
MIXED_FORMATS = ("jpg", "png", "tiff", "bmp", "jpg:L", "png:RGBA", "jpg:CMYK", "png:L")


def class_colour(k: int) -> np.ndarray:
    """A base colour per class index, far apart for the first few classes."""
    return np.array([(60 + 97 * k) % 256, (200 + 57 * k) % 256, (30 + 151 * k) % 256], dtype=np.int16)


def write_image_tree(root, classes: dict[str, int], size=(48, 40), formats=("jpg",), seed=0) -> Path:
    """Write `classes[name]` images into `root/name/` and return `root`.

    Each image is its class's base colour plus noise, so classes differ in content. `size` is
    (width, height). `formats` entries are cycled over the images of a class; each is an
    extension (`"png"`) or an extension and a Pillow mode (`"jpg:CMYK"`, `"png:RGBA"`).
    """
    root = Path(root)
    w, h = size
    for k, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, k, i])
            pixels = (class_colour(k) + rng.integers(-25, 26, (h, w, 3))).clip(0, 255).astype(np.uint8)
            ext, _, mode = formats[i % len(formats)].partition(":")
            Image.fromarray(pixels).convert(mode or "RGB").save(folder / f"{name}_{i:03d}.{ext}")
    return root


def write_bad_files(folder) -> list[str]:
    """Write a zero-byte .jpg, a truncated .jpg and a text file named .png; return their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    # Half of the file: headers intact, so it opens but fails while decoding the pixels.
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    return ["zero.jpg", "truncated.jpg", "text.png"]


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """Three classes of 8 images each, in mixed formats (jpg, png, tiff, bmp) and modes."""
    return write_image_tree(tmp_path / "data", {"beach": 8, "forest": 8, "harbor": 8},
                            formats=MIXED_FORMATS)
