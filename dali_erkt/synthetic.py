"""A built-in demo dataset: procedural "remote-sensing scenes", one folder per class.

Each class has its own spatial structure (stripes, blobs, a band, a grid, ...) drawn at a random
position, angle and scale. The palettes overlap on purpose (greens and browns in the fields,
grays in towns, parking lots and airports, blue in rivers and lakes) and every image gets a
random colour cast, so mean colour alone does not tell the classes apart: a model has to look
at structure. Everything is vectorised numpy on (H, W) coordinate grids; images are seeded per
(seed, class, index), so the first k classes are the same whatever `classes` is.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .io import writing

SCENE_CLASSES = ("farmland", "forest", "river", "residential", "desert", "parking", "lake", "airport")

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}

# Shared palettes (RGB in [0, 1]); classes draw from the same ones so colours overlap.
GREENS = np.array([(0.25, 0.45, 0.20), (0.35, 0.55, 0.25), (0.20, 0.38, 0.17), (0.45, 0.55, 0.30)])
BROWNS = np.array([(0.55, 0.45, 0.30), (0.60, 0.50, 0.35), (0.45, 0.36, 0.25)])
SANDS = np.array([(0.82, 0.72, 0.52), (0.76, 0.66, 0.48), (0.70, 0.62, 0.47)])
GRAYS = np.array([(0.50, 0.50, 0.50), (0.40, 0.40, 0.42), (0.60, 0.60, 0.57)])
BLUES = np.array([(0.15, 0.30, 0.50), (0.20, 0.36, 0.45), (0.12, 0.26, 0.38)])
ROOFS = np.array([(0.62, 0.30, 0.22), (0.50, 0.42, 0.38), (0.78, 0.76, 0.72), (0.45, 0.45, 0.48)])
CARS = np.array([(0.92, 0.92, 0.92), (0.85, 0.15, 0.12), (0.15, 0.30, 0.80), (0.90, 0.80, 0.15),
                 (0.08, 0.08, 0.08), (0.70, 0.72, 0.75)])
LAND = np.concatenate([GREENS, BROWNS, SANDS])


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [-1, 1]; image units, so shapes scale with the size."""
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="ij")


def _rotate(y, x, angle):
    """Coordinates (u, v) along and across the direction `angle`."""
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


def _soft(sd, px):
    """Coverage of a shape from its signed distance (negative inside): one-pixel anti-aliased edge."""
    return np.clip(0.5 - sd / px, 0.0, 1.0)


def _paint(img, cover, colour):
    # colour is (3,) or (H, W, 3); cover is (H, W) in [0, 1].
    img += cover[..., None] * (colour - img)


def _pick(rng, palette, jitter=0.04):
    return np.clip(palette[rng.integers(len(palette))] + rng.normal(0, jitter, 3), 0, 1)


def _field(rng, y, x):
    """Two land colours mixed by low-frequency waves: the background of rivers, lakes, airports."""
    a, b = _pick(rng, LAND), _pick(rng, LAND)
    k = rng.uniform(0.8, 2.5, (3, 2)) * rng.choice([-1, 1], (3, 2))
    waves = np.sin(k[:, :1, None] * x + k[:, 1:, None] * y + rng.uniform(0, 6.3, (3, 1, 1))).sum(0)
    m = 1.0 / (1.0 + np.exp(-3.0 * waves))
    return a * m[..., None] + b * (1 - m[..., None])


# --- one drawing function per class: (rng, y, x, px) -> float image (H, W, 3) ----------------

def _farmland(rng, y, x, px):
    img = np.empty(y.shape + (3,))
    colours = np.stack([_pick(rng, LAND[:8]) for _ in range(4)])
    # One or two parcels, split by a random line, each ploughed at its own angle.
    split = _rotate(y, x, rng.uniform(0, np.pi))[0] < rng.uniform(-0.5, 0.5)
    for part in (split, ~split):
        u, _ = _rotate(y, x, rng.uniform(0, np.pi))
        period = rng.uniform(0.15, 0.35)
        k = np.floor(u / period + rng.uniform(0, 1)).astype(int)
        table = colours[rng.integers(0, 4, 64)]
        rows = 1.0 + 0.1 * np.sin(u * 2 * np.pi / (period / 4))  # crop rows inside a stripe
        img[part] = (table[k % 64] * rows[..., None])[part]
    return img


def _forest(rng, y, x, px):
    img = np.broadcast_to(_pick(rng, np.concatenate([GREENS, BROWNS])), y.shape + (3,)).copy()
    n = rng.integers(30, 70)
    cy, cx = rng.uniform(-1.1, 1.1, (2, n, 1, 1))
    r = rng.uniform(0.06, 0.15, (n, 1, 1))
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) - r
    nearest = d.argmin(0)
    crowns = np.clip(GREENS[2] * rng.uniform(0.5, 0.9, (n, 1)) + rng.normal(0, 0.03, (n, 3)), 0, 1)
    _paint(img, _soft(d.min(0), px), crowns[nearest])
    return img


def _river(rng, y, x, px):
    img = _field(rng, y, x)
    u, v = _rotate(y, x, rng.uniform(0, np.pi))
    amp, freq, phase = rng.uniform(0.1, 0.4), rng.uniform(1.0, 3.0), rng.uniform(0, 6.3)
    centre = rng.uniform(-0.3, 0.3) + amp * np.sin(freq * np.pi * u + phase)
    slope = amp * freq * np.pi * np.cos(freq * np.pi * u + phase)
    dist = np.abs(v - centre) / np.sqrt(1 + slope ** 2)  # distance to the curve, first order
    width = rng.uniform(0.07, 0.18)
    _paint(img, _soft(dist - width - 0.04, px), _pick(rng, np.concatenate([BROWNS, SANDS])))
    _paint(img, _soft(dist - width, px), _pick(rng, BLUES))
    return img


def _blocks(rng, y, x, cell_u, cell_v):
    """A rotated grid: per-pixel cell ids and local coordinates in [-0.5, 0.5] of the cell."""
    u, v = _rotate(y, x, rng.uniform(0, np.pi))
    fu, fv = u / cell_u + rng.uniform(0, 1), v / cell_v + rng.uniform(0, 1)
    iu, iv = np.floor(fu).astype(int), np.floor(fv).astype(int)
    cell = (iu % 16) * 16 + iv % 16
    return cell, fu - iu - 0.5, fv - iv - 0.5


def _residential(rng, y, x, px):
    cell_size = rng.uniform(0.22, 0.34)
    cell, lu, lv = _blocks(rng, y, x, cell_size, cell_size * rng.uniform(0.8, 1.25))
    img = np.broadcast_to(_pick(rng, GRAYS), y.shape + (3,)).copy()  # roads
    road = rng.uniform(0.12, 0.22)
    lot = np.maximum(np.abs(lu), np.abs(lv)) - (0.5 - road / 2)  # a lawn inside the roads
    _paint(img, _soft(lot * cell_size, px), _pick(rng, np.concatenate([GREENS, BROWNS])))
    hu, hv = rng.uniform(0.15, 0.32, (2, 256))
    roofs = np.clip(ROOFS[rng.integers(0, len(ROOFS), 256)] + rng.normal(0, 0.05, (256, 3)), 0, 1)
    house = np.maximum(np.abs(lu) - hu[cell], np.abs(lv) - hv[cell]) * cell_size
    _paint(img, _soft(house, px), roofs[cell])
    return img


def _desert(rng, y, x, px):
    u, v = _rotate(y, x, rng.uniform(0, np.pi))
    f1, f2 = rng.uniform(1.5, 3.5), rng.uniform(0.5, 2.0)
    phase = f1 * np.pi * u + rng.uniform(0.3, 1.5) * np.sin(f2 * np.pi * v + rng.uniform(0, 6.3))
    # A sawtooth-like profile gives dunes a gentle windward and a steep lee side.
    s = np.sin(phase + rng.uniform(0, 6.3))
    shade = 0.5 + 0.5 * (s + 0.35 * np.sin(2 * phase)) + 0.04 * np.sin(25 * u)
    base = _pick(rng, np.concatenate([SANDS, SANDS, BROWNS]))
    return base * (0.78 + 0.4 * shade[..., None])


def _parking(rng, y, x, px):
    slot_w = rng.uniform(0.08, 0.12)
    row = rng.uniform(0.45, 0.6)  # two rows of cars back to back plus an aisle
    cell, lu, lv = _blocks(rng, y, x, row, slot_w)
    img = np.broadcast_to(_pick(rng, GRAYS), y.shape + (3,)).copy()
    car_len = rng.uniform(0.15, 0.2)  # as a fraction of the row pitch
    side = (lu > 0).astype(int)
    cu = np.abs(lu) - (car_len / 2 + 0.02)  # car centres sit just off the cell centre line
    car = np.maximum(np.abs(cu) - car_len / 2, 0) * row
    car = np.maximum(car, (np.abs(lv) - 0.32) * slot_w)
    taken = rng.uniform(0, 1, (256, 2)) < rng.uniform(0.5, 0.95)
    colour = CARS[rng.integers(0, len(CARS), (256, 2))]
    cover = _soft(car, px) * taken[cell, side]
    lines = _soft((0.5 - np.abs(lv)) * slot_w - 0.004, px) * (np.abs(cu) < car_len / 2 + 0.03)
    _paint(img, lines, np.array([0.85, 0.85, 0.82]))
    _paint(img, cover, colour[cell, side])
    return img


def _lake(rng, y, x, px):
    img = _field(rng, y, x)
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    rho, phi = np.sqrt((y - cy) ** 2 + (x - cx) ** 2), np.arctan2(y - cy, x - cx)
    k = np.arange(2, 5)[:, None, None]
    wobble = (rng.uniform(0, 0.12, (3, 1, 1)) * np.cos(k * phi + rng.uniform(0, 6.3, (3, 1, 1)))).sum(0)
    edge = rng.uniform(0.35, 0.7) * (1 + wobble)
    _paint(img, _soft(rho - edge - 0.04, px), _pick(rng, np.concatenate([BROWNS, SANDS])))
    water = _pick(rng, BLUES) * (0.8 + 0.2 * np.clip(edge - rho, 0, 1) / edge)[..., None]
    _paint(img, _soft(rho - edge, px), water)
    return img


def _airport(rng, y, x, px):
    img = _field(rng, y, x)
    angle = rng.uniform(0, np.pi)
    asphalt = _pick(rng, GRAYS)
    for k in range(rng.integers(1, 3)):
        # A second runway is parallel to the first or crosses it.
        turn = 0.0 if k == 0 or rng.integers(2) else rng.uniform(0.5, 1.2)
        u, v = _rotate(y, x, angle + turn)
        c, w, half = rng.uniform(-0.35, 0.35), rng.uniform(0.08, 0.14), rng.uniform(0.7, 1.3)
        ends = np.abs(u - rng.uniform(-0.3, 0.3)) - half
        # Taxiway: a thin strip parallel to the runway.
        taxi = np.maximum(np.abs(v - c - rng.choice([-1, 1]) * (w + 0.15)) - 0.025, ends)
        _paint(img, _soft(taxi, px), asphalt)
        _paint(img, _soft(np.maximum(np.abs(v - c) - w, ends), px), asphalt)
        dashes = (np.sin(u * 14 * np.pi) > 0) & (ends < -0.08)
        _paint(img, _soft(np.abs(v - c) - 0.012, px) * dashes, np.array([0.9, 0.9, 0.88]))
    return img


_DRAW = dict(zip(SCENE_CLASSES, (_farmland, _forest, _river, _residential, _desert, _parking,
                                 _lake, _airport)))


def render_scene(name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One scene of class `name` as a (size, size, 3) uint8 array."""
    y, x = _grid(size)
    img = _DRAW[name](rng, y, x, 2.0 / size)
    # Camera and sensor: colour cast and exposure per image, then pixel noise.
    img = img * rng.normal(1.0, 0.06, 3) * rng.uniform(0.85, 1.15)
    img = img + rng.normal(0.0, rng.uniform(0.015, 0.04), img.shape)
    # Arbitrary angles are drawn above; this adds mirror images and frees blob-like classes too.
    img = np.rot90(img, rng.integers(4))
    if rng.integers(2):
        img = img[:, ::-1]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_scenes(root, classes: int = 6, per_class: int = 60, size: int = 64, seed: int = 0,
                fmt: str = "jpg") -> Path:
    """Write `per_class` scenes of each of the first `classes` of SCENE_CLASSES under `root`.

    Layout: `root/<class>/<class>_<index>.<fmt>` (ImageFolder). Deterministic given `seed`;
    files of the same names are overwritten, other files are left alone. JPEG quality is 90.
    Returns `root`. A folder that cannot be written raises one `WriteError` line (the scenes are
    regenerated, not kept: a killed call is repeated, not resumed).
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, not {fmt!r}")
    if not 1 <= int(classes) <= len(SCENE_CLASSES):
        raise ValueError(f"classes must be between 1 and {len(SCENE_CLASSES)}, got {classes}")
    if int(per_class) < 1 or int(size) < 8 or int(seed) < 0:
        raise ValueError(f"need per_class >= 1, size >= 8 and seed >= 0 "
                         f"(got {per_class}, {size}, {seed})")
    root = Path(root)
    save_args = {"quality": 90} if _FORMATS[fmt] == "JPEG" else {}
    with writing(root, "choose a writable --out"):
        for k, name in enumerate(SCENE_CLASSES[: int(classes)]):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(int(per_class)):
                rng = np.random.Generator(np.random.PCG64([int(seed), k, i]))
                pixels = render_scene(name, rng, int(size))
                Image.fromarray(pixels).save(folder / f"{name}_{i:04d}.{fmt}", _FORMATS[fmt], **save_args)
    return root
