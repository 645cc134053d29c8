"""`predict`: a trained run, or the teacher ensemble, on new images; or on the tiles of one large
image, with a class map.

Images are classified with the settings the model was trained with (the checkpoint's stored
image size, normalisation and classes), through the DALI evaluation pipeline (decode, resize,
normalise), on the GPU where there is one and with the CPU pipeline otherwise. Every file is
decoded once by Pillow first: DALI stops on a bad file, so an unreadable one is named and left
out. Tiles are cut from one decoded image and go through the torchvision twin of the same resize
and normalisation (`data.units.resize`, `data.reference.normalize`), batch by batch.
"""
from __future__ import annotations

import csv
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..config import teacher_weights_note, to_dict
from ..data.dataset import check_files, list_images, load_rgb, load_split
from ..data.loader import DaliLoader
from ..data.reference import normalize, to_tensor
from ..data.units import resize
from ..errors import ConfigError, DataError, TrainingError
from ..io import atomic_write, atomic_write_text
from ..models import build_ensemble, load_trained, place
from ..run_state import read_run
from ..runtime import resolve_runtime
from .common import config_from_options, teacher_paths

PARTS = ("train", "test")
# The largest image --tile decodes (Pillow's decompression-bomb limit, raised to this on purpose):
# 1 Gpx, about 4 GB decoded (Pillow keeps RGB as 4 bytes per pixel).
MAX_TILE_PIXELS = 1 << 30
MAP_MAX_SIDE = 2048  # the class map's longer side, at most (tiles are drawn scaled down to fit)
LEGEND_ROW, LEGEND_MIN_WIDTH = 16, 240


# --------------------------------------------------------------------------------------------
# The model and its settings
# --------------------------------------------------------------------------------------------

def load_model(checkpoint=None, teacher_dir=None, teachers=(), note=print, **options):
    """(model, cfg, classes, names): a run checkpoint (a file, or a run folder's last.pt) or the
    teacher ensemble as `evaluate --teachers` resolves it (model.teachers, their weights and
    `combine`, DIR/<arch>/last.pt or one --teacher each). `cfg` holds the run's data settings
    (image size, normalisation) under the options given now (device, batch size)."""
    if checkpoint and (teachers or teacher_dir):
        raise ConfigError("give either a CHECKPOINT or the ensemble's teachers, not both")
    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            path = path / "last.pt"
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} does not exist: pass a run's last.pt or best.pt, "
                              "or its run folder")
        model, state = load_trained(path)
        stored, classes = to_dict(state.stored_config()), list(state.classes)
        names = [f"{state.kind}-{state.arch} ({path})"]
        cfg = config_from_options("erkt", base={"data": stored["data"]}, **options)
        return model, cfg, classes, names
    cfg = config_from_options("erkt", **options)
    paths = teacher_paths(cfg.model.teachers, teacher_dir, teachers)
    first = read_run(paths[0])
    classes = list(first.classes)
    cfg = config_from_options("erkt", base={"data": to_dict(first.stored_config())["data"]}, **options)
    m = cfg.model
    model = build_ensemble(m.teachers, paths, m.teacher_weights, m.combine, classes)
    if teacher_weights_note(m.teacher_weights):
        note(f"note: {teacher_weights_note(m.teacher_weights)}")
    names = [f"teacher-{a} x {w:g} ({p})" for a, w, p in zip(m.teachers, m.teacher_weights, paths)]
    return model, cfg, classes, names


def _check_topk(topk: int, classes) -> int:
    if not 1 <= int(topk) <= len(classes):
        raise ConfigError(f"--topk {topk}: the model has {len(classes)} classes; use 1 to "
                          f"{len(classes)}")
    return int(topk)


def _refuse_existing(paths, force: bool) -> None:
    for p in paths:
        if Path(p).exists() and not force:
            raise ConfigError(f"{p} already exists: pass --force to replace it, or another --out")


# --------------------------------------------------------------------------------------------
# Images: folders, files and split parts
# --------------------------------------------------------------------------------------------

def _split_part(arg: str):
    """(split folder, part) for `FOLDER:test` / `FOLDER:train` where FOLDER holds a split."""
    head, sep, part = arg.rpartition(":")
    if sep and part in PARTS and (Path(head) / "split.yaml").is_file():
        return head, part
    return None


def gather_images(images, classes) -> tuple[list[str], list[int | None]]:
    """(paths, known class index or None) of the IMAGES arguments, in order, each file once.

    A split part `SPLIT:test` (or `:train`) gives its files and their labels; a folder gives its
    images (recursively), each labelled where the first sub-folder it lies in is named like one
    of `classes`; a file is taken as given, unlabelled."""
    if not images:
        raise ConfigError("no IMAGES: pass image files, a folder, or a split part such as "
                          "splits/s0:test")
    out: dict[str, int | None] = {}
    index = {c: k for k, c in enumerate(classes)}
    for arg in images:
        arg = str(arg)
        sp = _split_part(arg)
        if sp is not None:
            split = load_split(sp[0])
            if list(split.classes) != list(classes):
                raise DataError(f"split {sp[0]} has {len(split.classes)} classes "
                                f"({', '.join(split.classes[:3])}, ...) that are not the model's "
                                f"{len(classes)}: predict the split's images as a folder instead")
            for p, y in zip(split.paths(sp[1]), split.labels(sp[1])):
                out.setdefault(p, y)
            continue
        path = Path(arg)
        if path.is_dir():
            for f in list_images(path, recursive=True):
                top = f.relative_to(path).parts
                out.setdefault(str(f), index.get(top[0]) if len(top) > 1 else None)
        elif path.is_file():
            out.setdefault(str(path), None)
        else:
            raise DataError(f"{arg} is not an image file, a folder or a split part (SPLIT:test): "
                            "check the path")
    return list(out), list(out.values())


# --------------------------------------------------------------------------------------------
# Rows: top-k per image, the CSV
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _topk(model, images, rt, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    with rt.autocast():
        logits = model(images.to(rt.input_dtype))
    if not bool(logits.isfinite().all()):  # an argmax of NaN would be a silent guess
        raise TrainingError("the model computes NaN or infinite logits on these images: retrain "
                            "it, or use an earlier checkpoint")
    # The ensemble's output is log(sum_k w_k p_k) (combine=probs): its softmax is that mixture.
    probs = torch.softmax(logits.float(), dim=1)
    return probs.topk(k, dim=1)


def _csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _topk_header(k: int) -> list[str]:
    return [f for j in range(1, k + 1) for f in (f"class{j}", f"prob{j}")]


def _topk_cells(classes, probs, idx) -> list:
    return [v for p, i in zip(probs, idx) for v in (classes[i], f"{p:.6f}")]


class _Clock:
    """Time after a warm-up batch: the first batch (pipeline start, first kernels) is left out."""

    def __init__(self, device):
        self.device, self.start, self.timed, self.first = device, None, 0, 0

    def batch_done(self, n: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.start is None:
            self.start, self.first = time.perf_counter(), n
        else:
            self.timed += n

    def result(self, total_s: float) -> dict:
        seconds = time.perf_counter() - self.start if self.start is not None else 0.0
        return {"seconds": round(total_s, 3), "timed_seconds": round(seconds, 3),
                "warmup_images": self.first,
                "images_per_s": round(self.timed / seconds, 1) if self.timed and seconds > 0 else None}


# --------------------------------------------------------------------------------------------
# predict: files
# --------------------------------------------------------------------------------------------

def predict_images(images, out_csv, *, checkpoint=None, teacher_dir=None, teachers=(), topk=3,
                   force=False, note=print, **options) -> dict:
    """Top-k classes of every readable image of IMAGES, written to `out_csv` (path, class1,
    prob1, ...); OA where images carry a known class. Unreadable files are named and skipped."""
    t0 = time.perf_counter()
    out_csv = Path(out_csv)
    _refuse_existing([out_csv], force)
    model, cfg, classes, names = load_model(checkpoint, teacher_dir, teachers, note, **options)
    k = _check_topk(topk, classes)
    paths, known = gather_images(images, classes)
    bad = dict(check_files("", paths, workers=2))  # absolute or cwd-relative paths: root ""
    for p, why in bad.items():
        note(f"skipped {p}: {why}")
    keep = [i for i, p in enumerate(paths) if p not in bad]
    if not keep:
        raise DataError(f"none of the {len(paths)} images is readable (first: {paths[0]}: "
                        f"{bad[paths[0]]}): check the files")
    paths, known = [paths[i] for i in keep], [known[i] for i in keep]

    rt = resolve_runtime(cfg.run)
    model = place(model, rt.device, rt.channels_last).eval()
    labels = [0 if y is None else y for y in known]
    loader = DaliLoader.from_config(paths, labels, cfg, device=rt, train=False, classes=classes)
    top_p = torch.empty(len(paths), k)
    top_i = torch.empty(len(paths), k, dtype=torch.long)
    clock = _Clock(rt.device)
    for batch in loader:
        p, i = _topk(model, batch.images, rt, k)
        rows = batch.indices.cpu()
        top_p[rows], top_i[rows] = p.float().cpu(), i.cpu()
        clock.batch_done(len(rows))
    loader.close()

    atomic_write_text(out_csv, _csv_text(["path"] + _topk_header(k), (
        [path] + _topk_cells(classes, top_p[n].tolist(), top_i[n].tolist())
        for n, path in enumerate(paths))))
    labelled = [n for n, y in enumerate(known) if y is not None]
    oa = None
    if labelled:
        hits = sum(int(top_i[n, 0]) == known[n] for n in labelled)
        oa = hits / len(labelled)
    return {"images": len(paths), "skipped": [{"path": p, "reason": r} for p, r in bad.items()],
            **clock.result(time.perf_counter() - t0), "models": names, "classes": classes,
            "image_size": cfg.data.image_size, "device": str(rt.device), "topk": k,
            "oa": oa, "oa_images": len(labelled), "csv": str(out_csv)}


# --------------------------------------------------------------------------------------------
# predict --tile: one large image
# --------------------------------------------------------------------------------------------

def tile_grid(width: int, height: int, size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of SIZE x SIZE tiles at STRIDE that lie fully inside the image: tiles start at
    0, S, 2S, ... and a partial tile at the right or bottom edge is left out."""
    if size > width or size > height:
        raise DataError(f"--tile {size} is larger than the image ({width} x {height}): use a "
                        "smaller tile")
    return (height - size) // stride + 1, (width - size) // stride + 1


def decode_large(path, max_pixels: int = MAX_TILE_PIXELS) -> Image.Image:
    """The image at `path` as one decoded RGB Pillow image (4 bytes per pixel: Pillow keeps RGB
    padded to 32 bits), decoded once; tiles are cropped from it without another full copy.
    Pillow's decompression-bomb limit is raised to `max_pixels` for this call only; a larger
    image is refused in one line."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    too_large = (f"{path} is larger than --tile decodes ({max_pixels:,} pixels): cut it into "
                 "parts first")
    try:
        try:
            with warnings.catch_warnings():  # the size is checked here, in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DataError(f"{too_large} (it is {w} x {h})")
                if im.mode.startswith("I") or im.mode == "F":
                    # 16-bit and float images: the project's one converter (a transient copy)
                    return Image.fromarray(load_rgb(path))
                im.load()
                if im.getexif().get(0x0112, 1) != 1:
                    im = ImageOps.exif_transpose(im)
                return im if im.mode == "RGB" else im.convert("RGB")
        except Image.DecompressionBombError:
            raise DataError(too_large) from None
        except OSError as exc:
            raise DataError(f"{path}: cannot decode ({str(exc).splitlines()[0][:120]})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def class_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours, one per class (matplotlib's tab10 / tab20)."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([[round(255 * c) for c in cmap(k % cmap.N)[:3]] for k in range(n)], dtype=np.uint8)


def shade(colour: np.ndarray, prob: float) -> tuple[int, int, int]:
    """A class colour shaded by confidence: mixed with white, full colour at probability 1 and
    70% white at probability 0."""
    a = 0.3 + 0.7 * float(prob)
    return tuple(int(round(a * c + (1 - a) * 255)) for c in colour)


def legend_row(map_width: int, map_height: int) -> int:
    """The legend's row height: 16 px, larger for a large map (so it stays readable scaled down)."""
    return max(LEGEND_ROW, round(max(map_width, map_height) / 48))


def legend_height(n_classes: int, map_width: int, map_height: int) -> int:
    return legend_row(map_width, map_height) * (n_classes + 1) + 4


def map_scale(width: int, height: int) -> float:
    return min(1.0, MAP_MAX_SIDE / max(width, height))


def draw_class_map(width, height, size, stride, rows, cols, top_class, top_prob, classes) -> Image.Image:
    """The image's extent, scaled by `map_scale`, each tile's stride cell (its whole tile on the
    last row and column) filled with its class colour shaded by confidence, the uncovered margin
    grey; below it a legend of the class names."""
    s = map_scale(width, height)
    mw, mh = max(1, round(width * s)), max(1, round(height * s))
    row = legend_row(mw, mh)
    canvas = Image.new("RGB", (max(mw, LEGEND_MIN_WIDTH), mh + legend_height(len(classes), mw, mh)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, mw - 1, mh - 1], fill=(128, 128, 128))
    colours = class_colours(len(classes))
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * stride, c * stride
            y1 = y0 + (size if r == rows - 1 else stride)
            x1 = x0 + (size if c == cols - 1 else stride)
            box = [round(x0 * s), round(y0 * s), max(round(x0 * s), round(x1 * s) - 1),
                   max(round(y0 * s), round(y1 * s) - 1)]
            k = int(top_class[r, c])
            draw.rectangle(box, fill=shade(colours[k], top_prob[r, c]))
    font = ImageFont.load_default(size=row - 4)
    y = mh + 4
    draw.text((4, y), "top-1 class (paler: less confident)", fill=(0, 0, 0), font=font)
    for k, name in enumerate(classes):
        y += row
        draw.rectangle([4, y + 2, row - 4, y + row - 4], fill=tuple(int(v) for v in colours[k]))
        draw.text((row + 2, y), name, fill=(0, 0, 0), font=font)
    return canvas


def _box(t: int, cols: int, stride: int, tile: int) -> tuple[int, int, int, int]:
    """Tile t's (left, top, right, bottom), tiles numbered row by row."""
    x, y = (t % cols) * stride, (t // cols) * stride
    return x, y, x + tile, y + tile


def predict_tiles(image, out_csv, *, tile: int, stride: int | None = None, checkpoint=None,
                  teacher_dir=None, teachers=(), topk=3, force=False, note=print,
                  max_pixels: int = MAX_TILE_PIXELS, **options) -> dict:
    """Cut `image` into tile x tile tiles at `stride` (default: tile), classify each at the
    model's image size, write the per-tile CSV (row, col, x, y, top-k) and the class map PNG
    beside it (the CSV's name with .png). Memory: the decoded image (4 bytes/px) plus one batch."""
    t0 = time.perf_counter()
    stride = int(stride or tile)
    if tile < 1 or stride < 1:
        raise ConfigError(f"--tile {tile} --stride {stride}: use positive sizes")
    out_csv = Path(out_csv)
    out_png = out_csv.with_suffix(".png")
    if out_png == out_csv:
        raise ConfigError(f"--out {out_csv}: give a .csv file; the class map goes beside it as .png")
    _refuse_existing([out_csv, out_png], force)
    path = Path(image)
    if not path.is_file():
        raise DataError(f"{image} is not an image file: --tile takes one large image")
    model, cfg, classes, names = load_model(checkpoint, teacher_dir, teachers, note, **options)
    k = _check_topk(topk, classes)
    image_rgb = decode_large(path, max_pixels)
    width, height = image_rgb.size
    rows, cols = tile_grid(width, height, tile, stride)

    rt = resolve_runtime(cfg.run)
    model = place(model, rt.device, rt.channels_last).eval()
    size, d = cfg.data.image_size, cfg.data
    memory = torch.channels_last if rt.channels_last else torch.contiguous_format
    n_tiles, bs = rows * cols, cfg.data.batch_size
    top_p, top_i = torch.empty(n_tiles, k), torch.empty(n_tiles, k, dtype=torch.long)
    clock = _Clock(rt.device)
    for start in range(0, n_tiles, bs):
        ids = range(start, min(n_tiles, start + bs))
        # One batch of tiles at a time: crops of the decoded image, resized and normalised.
        batch = torch.stack([resize(to_tensor(np.asarray(image_rgb.crop(_box(t, cols, stride, tile)))),
                                    size) for t in ids])
        x = normalize(batch, d.mean, d.std).to(rt.device).contiguous(memory_format=memory)
        p, i = _topk(model, x, rt, k)
        top_p[start:start + len(ids)], top_i[start:start + len(ids)] = p.float().cpu(), i.cpu()
        clock.batch_done(len(ids))

    atomic_write_text(out_csv, _csv_text(["row", "col", "x", "y"] + _topk_header(k), (
        [t // cols, t % cols, *_box(t, cols, stride, tile)[:2]]
        + _topk_cells(classes, top_p[t].tolist(), top_i[t].tolist()) for t in range(n_tiles))))
    canvas = draw_class_map(width, height, tile, stride, rows, cols,
                            top_i[:, 0].view(rows, cols).numpy(), top_p[:, 0].view(rows, cols).numpy(),
                            classes)
    atomic_write(out_png, lambda tmp: canvas.save(tmp, format="PNG"))
    counts = np.bincount(top_i[:, 0].numpy(), minlength=len(classes))
    timing = clock.result(time.perf_counter() - t0)
    timing["tiles_per_s"] = timing.pop("images_per_s")
    timing["warmup_tiles"] = timing.pop("warmup_images")
    uncovered = [width - ((cols - 1) * stride + tile), height - ((rows - 1) * stride + tile)]
    return {"image": str(path), "width": width, "height": height, "tile": tile, "stride": stride,
            "rows": rows, "cols": cols, "tiles": n_tiles, "left_uncovered_px": uncovered, **timing,
            "models": names, "classes": classes, "image_size": size, "device": str(rt.device), "topk": k,
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "csv": str(out_csv), "class_map": str(out_png), "class_map_size": list(canvas.size)}


def predict(images, out_csv, *, tile: int | None = None, stride: int | None = None, **kwargs) -> dict:
    """The `predict` command: files (a folder, files, split parts) or, with `tile`, the tiles of
    one large image."""
    if tile is None:
        if stride is not None:
            raise ConfigError("--stride needs --tile SIZE")
        return predict_images(images, out_csv, **kwargs)
    if len(images) != 1:
        raise ConfigError(f"--tile takes one large image, not {len(images)} arguments")
    return predict_tiles(images[0], out_csv, tile=tile, stride=stride, **kwargs)
