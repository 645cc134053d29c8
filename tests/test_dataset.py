"""Scanning, splitting, saving and checking datasets on generated image trees."""
from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import write_bad_files, write_image_tree
from dali_erkt.data.dataset import (
    DataError, check_files, list_images, load_rgb, load_split, make_split, save_split, scan,
)


# --- scan -----------------------------------------------------------------------------------

def test_scan_orders_classes_and_samples(image_tree):
    (image_tree / "beach" / ".hidden.jpg").write_bytes(b"x")
    (image_tree / "beach" / "notes.txt").write_text("ignored")
    (image_tree / ".cache").mkdir()
    (image_tree / "forest" / "sub").mkdir()
    write_image_tree(image_tree / "forest" / "sub", {"deep": 1})  # nested image -> class forest
    (image_tree / "harbor" / "UPPER.JPG").write_bytes((image_tree / "harbor" / "harbor_000.jpg").read_bytes())

    classes, samples = scan(image_tree)
    assert classes == ["beach", "forest", "harbor"]
    paths = [p for p, _ in samples]
    assert paths[:8] == sorted(f"beach/beach_{i:03d}.{e}" for i, e in
                               enumerate(["jpg", "png", "tiff", "bmp", "jpg", "png", "jpg", "png"]))
    assert "forest/sub/deep/deep_000.jpg" in paths
    assert "harbor/UPPER.JPG" in paths
    assert not any("hidden" in p or p.endswith(".txt") for p in paths)
    labels = [y for _, y in samples]
    assert labels == sorted(labels) and Counter(labels) == {0: 8, 1: 9, 2: 9}
    for label in range(3):  # sorted within each class
        group = [p for p, y in samples if y == label]
        assert group == sorted(group)


def test_list_images_is_what_scan_finds(image_tree):
    """One lister: a folder's images by name (not hidden), sorted; recursive as scan walks."""
    (image_tree / "beach" / ".hidden.jpg").write_bytes(b"x")
    (image_tree / "beach" / "notes.txt").write_text("ignored")
    (image_tree / "beach" / ".cache").mkdir()
    (image_tree / "beach" / ".cache" / "x.png").write_bytes(b"x")
    write_image_tree(image_tree / "beach" / "sub", {"deep": 1})
    _, samples = scan(image_tree)
    want = sorted(image_tree / p for p, y in samples if y == 0)
    assert list_images(image_tree / "beach", recursive=True) == want
    top = list_images(image_tree / "beach")
    assert top == [p for p in want if p.parent == image_tree / "beach"] and len(top) == 8
    (image_tree / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files") as exc:
        list_images(image_tree / "empty")
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="not a folder"):
        list_images(image_tree / "missing")


def test_every_format_and_mode_loads_as_rgb(image_tree, tmp_path):
    img16 = (np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(img16).save(tmp_path / "g16.png")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).convert("P").save(tmp_path / "pal.png")
    _, samples = scan(image_tree)
    files = [image_tree / p for p, _ in samples] + [tmp_path / "g16.png", tmp_path / "pal.png"]
    for f in files:
        arr = load_rgb(f)
        assert arr.dtype == np.uint8 and arr.shape == (40, 48, 3), f
    assert load_rgb(tmp_path / "g16.png").max() == (img16.max() >> 8)  # scaled, not clipped
    # Content follows the class: mean colours of two classes are far apart.
    a, b = load_rgb(image_tree / "beach/beach_000.jpg"), load_rgb(image_tree / "forest/forest_000.jpg")
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() > 40


# --- make_split -----------------------------------------------------------------------------

@pytest.fixture
def imbalanced(tmp_path):
    return write_image_tree(tmp_path / "imb", {"a": 20, "b": 11, "c": 5, "d": 2})


def test_split_reproducible_and_seed_dependent(imbalanced):
    s1, s2 = make_split(imbalanced, 0.5, seed=3), make_split(imbalanced, 0.5, seed=3)
    assert s1 == s2
    other = make_split(imbalanced, 0.5, seed=4)
    assert other.train != s1.train


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 0.8])
def test_split_stratified_share_per_class(imbalanced, ratio):
    split = make_split(imbalanced, ratio, seed=0)
    sizes = {0: 20, 1: 11, 2: 5, 3: 2}
    got = Counter(split.labels("train"))
    for c, n in sizes.items():
        assert abs(got[c] - ratio * n) <= 1
        assert 1 <= got[c] <= n - 1  # every class on both sides
    _check_partition(imbalanced, split)


def test_split_without_stratification_draws_from_whole_set(imbalanced):
    seen, refused = set(), 0
    for seed in range(20):
        try:
            split = make_split(imbalanced, 0.2, seed=seed, stratify=False)
        except DataError as exc:  # a draw that leaves a class without training images is named
            assert re.search(r"class .* with no (training|test) image", str(exc)) and "--no-stratify" in str(exc)
            refused += 1
            continue
        assert len(split.train) == round(0.2 * 38) and not split.stratified
        assert set(split.labels("train")) == {0, 1, 2, 3} and set(split.labels("test")) == {0, 1, 2, 3}
        _check_partition(imbalanced, split)
        seen.add(tuple(sorted(Counter(split.labels("train")).items())))
    assert len(seen) > 1  # per-class counts vary, unlike a stratified draw
    assert 0 < refused < 20  # class d (2 of 38 images) often draws both or neither into training


def _check_partition(root, split):
    _, samples = scan(root)
    train, test = set(split.train), set(split.test)
    assert not train & test and train | test == set(samples)
    assert split.train == sorted(split.train, key=samples.index)  # scan order kept
    assert split.paths("train")[0] == os.path.join(os.path.abspath(root), split.train[0][0])


def test_save_load_round_trip(image_tree, tmp_path):
    split = make_split(image_tree, 0.25, seed=7)
    out = save_split(split, tmp_path / "split")
    assert sorted(os.listdir(out)) == ["classes.txt", "split.yaml", "test.txt", "train.txt"]
    assert (out / "classes.txt").read_text() == "beach\nforest\nharbor\n"
    assert (out / "train.txt").read_text().splitlines()[0] == "\t".join(map(str, split.train[0]))
    assert load_split(out) == split

    moved = tmp_path / "moved"
    image_tree.rename(moved)
    with pytest.raises(DataError, match="missing"):
        load_split(out)
    assert load_split(out, root=moved).paths("test")[0].startswith(str(moved))


# --- errors ---------------------------------------------------------------------------------

def test_scan_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        scan(tmp_path / "file.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        scan(empty)
    write_image_tree(empty, {"full": 2})
    with pytest.raises(DataError, match="'cls' .* has no images"):
        scan(empty)


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_ratio_out_of_range(image_tree, ratio):
    with pytest.raises(DataError, match="between 0 and 1"):
        make_split(image_tree, ratio)


def test_negative_seed(image_tree):
    with pytest.raises(DataError, match="seed"):
        make_split(image_tree, 0.5, seed=-1)


def test_make_split_refuses_bad_files(image_tree):
    names = write_bad_files(image_tree / "forest")
    bad = [f"forest/{n}" for n in names]
    with pytest.raises(DataError) as err:
        make_split(image_tree, 0.5, bad=bad + ["elsewhere/x.jpg"])
    msg = str(err.value)
    assert "3 unreadable" in msg and "check-data" in msg and "\n" not in msg
    assert all(b in msg for b in bad)
    make_split(image_tree, 0.5, bad=["elsewhere/x.jpg"])  # unrelated entries are harmless


def test_load_split_errors(image_tree, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "none")
    out = save_split(make_split(image_tree, 0.5), tmp_path / "s")
    lines = (out / "train.txt").read_text()
    (out / "train.txt").write_text(lines + "no-tab-here\n")
    with pytest.raises(DataError, match="line .* malformed"):
        load_split(out)
    (out / "train.txt").write_text(lines)
    first = lines.split("\t")[0]
    (image_tree / first).unlink()
    with pytest.raises(DataError, match=first):
        load_split(out)
    (out / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt"):
        load_split(out)


# --- check_files ----------------------------------------------------------------------------

def test_check_files_finds_exactly_the_bad_files(image_tree):
    names = write_bad_files(image_tree / "harbor")
    _, samples = scan(image_tree)
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a lenient setting elsewhere must not hide truncation
    try:
        bad = dict(check_files(image_tree, [p for p, _ in samples], workers=3))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert set(bad) == {f"harbor/{n}" for n in names}
    assert "0 bytes" in bad["harbor/zero.jpg"]
    assert "truncated" in bad["harbor/truncated.jpg"]
    assert "not an image" in bad["harbor/text.png"]
    assert check_files(image_tree, ["beach/beach_000.jpg"]) == []
