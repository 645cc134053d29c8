"""The `preview` command and its library: gate rates from the plan, a grid from the real pipeline."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import write_image_tree
from dali_erkt.cli import main
from dali_erkt.config import UNITS, default_config
from dali_erkt.data.dataset import scan
from dali_erkt.commands.preview import augmented_views, gate_rates, pick_rows

SMALL = ("--set", "data.image_size=32")  # a small grid keeps the slower tests quick


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def tree(tmp_path):
    return write_image_tree(tmp_path / "data", {"beach": 15, "forest": 15, "harbor": 15, "port": 15},
                            size=(64, 48))


def within_3se(r: dict) -> bool:
    p, n = r["p"], r["n"]
    return abs(r["rate"] - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_json_rates_and_grid(tree, tmp_path):
    out = tmp_path / "grid.png"
    res = run("preview", tree, "--samples", 2000, "--json", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # stdout is exactly one JSON object
    assert list(report["gates"]) == list(UNITS)
    assert report["samples"] == 2000 and report["preset"] == "erkt" and report["seconds"] > 0
    for unit, r in report["gates"].items():
        assert within_3se(r), (unit, r)
        assert r["n"] == (report["batches"] if unit == "cutmix" else 2000)
    assert report["batches"] == math.ceil(2000 / 30)
    assert 0.9 <= report["gates"]["erasing"]["applied"] <= 1.0
    assert report["grid"] == str(out)
    with Image.open(out) as im:  # a real PNG of a size a person can read
        assert im.format == "PNG" and im.width >= 800 and im.height >= 800


def test_missing_folder_is_one_line_error(tmp_path):
    res = run("preview", tmp_path / "nope", "--json", "--out", tmp_path / "g.png")
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]


def test_set_changes_p_and_text_output(tree, tmp_path):
    out = tmp_path / "g.png"
    res = run("preview", tree, "--samples", 1000, "--rows", 2, "--out", out, "--device", "cpu",
              "--set", "vsm.grayscale.p=0.5", *SMALL, "--json")
    assert res.exit_code == 0, res.output
    gray = json.loads(res.stdout)["gates"]["grayscale"]
    assert gray["p"] == 0.5 and within_3se(gray)

    res = run("preview", tree, "--samples", 100, "--rows", 2, "--out", out, "--device", "cpu",
              "--preset", "base", *SMALL)
    assert res.exit_code == 0, res.output
    assert all(unit in res.stdout for unit in UNITS)
    assert "per batch" in res.stdout and f"grid: {out}" in res.stdout


def test_config_file_wins_over_preset(tree, tmp_path):
    """defaults < preset < config file < --set: the file's setting beats the preset's, --set the file's."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("vsm:\n  grayscale:\n    p: 0.7\n  hflip:\n    p: 0.2\n")
    res = run("preview", tree, "--preset", "base", "--config", cfg, "--set", "vsm.hflip.p=0.3",
              "--samples", 10, "--rows", 1, "--json", "--out", tmp_path / "g.png", "--device", "cpu")
    assert res.exit_code == 0, res.output
    gates = json.loads(res.stdout)["gates"]
    assert gates["grayscale"]["p"] == 0.7  # the file, not erkt's or base's 0.1
    assert gates["hflip"]["p"] == 0.3  # --set over the file
    assert gates["cutmix"]["p"] == 0.1 and json.loads(res.stdout)["preset"] == "base"  # the preset's


def test_gate_rates_counts_exactly_n_samples():
    cfg = default_config("base")
    r = gate_rates(cfg, n_images=50, samples=95, seed=3)
    # 30 per batch, 1 batch per epoch (drop_last): 95 samples take 4 batches, the last one partly.
    assert r["samples"] == 95 and r["batches"] == 4 and r["epochs"] == 4
    assert all(r["gates"][u]["n"] == 95 for u in UNITS[:-1])
    assert r["gates"]["erasing"]["rate"] == 0.0 and r["gates"]["erasing"]["applied"] == 0.0
    assert r["gates"]["hflip"]["p"] == 0.5


def test_rows_come_from_different_classes(tree):
    _, samples = scan(tree)
    rows = pick_rows(samples, 6, seed=0)
    labels = [samples[i][1] for i in rows]
    assert len(set(rows)) == 6 and sorted(set(labels[:4])) == [0, 1, 2, 3]


def test_views_are_real_pipeline_batches_matching_the_plan(tree):
    cfg = default_config("erkt")
    cfg.data.image_size = 32
    _, samples = scan(tree)
    paths = [str(tree / p) for p, _ in samples[:3]]
    views = list(augmented_views(paths, [0, 1, 2], cfg, "cpu", seed=1, views=2))
    assert [e for e, _, _ in views] == [0, 1]
    for _, plan, images in views:
        assert sorted(plan.indices) == [0, 1, 2] and images.shape == (3, 32, 32, 3)
        assert 0.0 <= images.min() and images.max() <= 1.0
    # Different epochs give different views of the same image.
    first = {int(k): views[0][2][j] for j, k in enumerate(views[0][1].indices)}
    second = {int(k): views[1][2][j] for j, k in enumerate(views[1][1].indices)}
    assert not np.allclose(first[0], second[0])


def test_the_grid_outlines_each_boxed_units_box_from_the_unit_table():
    """Erasing's box is the erased area as the final view shows it (moved and scaled by a later
    resized crop, None where the crop left it out); CutMix's is the pasted box."""
    from dali_erkt.data.plan import make_batch_plan
    from dali_erkt.data.units import UNIT_TABLE

    units = {u.name: u for u in UNIT_TABLE}
    assert {n for n, u in units.items() if u.box} == {"erasing", "cutmix"}
    size, n = 64, 200
    vsm = default_config("erkt").vsm
    vsm.erasing.p, vsm.resized_crop.p = 1.0, 0.0
    plan = make_batch_plan(vsm, size, 0, 0, 0, np.arange(n))
    fitted = [j for j in range(n) if plan.erase_box[j, 2] and plan.erase_box[j, 3]]
    assert len(fitted) > n // 2
    for j in fitted:  # no crop: the box as erased
        assert units["erasing"].box(plan, j, size) == tuple(float(v) for v in plan.erase_box[j])
    vsm.resized_crop.p = 1.0
    plan = make_batch_plan(vsm, size, 0, 0, 0, np.arange(n))
    shown = left_out = 0
    for j in range(n):
        y, x, h, w = (float(v) for v in plan.erase_box[j])
        cy, cx, ch, cw = (float(v) for v in plan.crop_box[j])
        box = units["erasing"].box(plan, j, size)
        inside = h and w and min(y + h, cy + ch) > max(y, cy) and min(x + w, cx + cw) > max(x, cx)
        if not inside:
            assert box is None
            left_out += 1
            continue
        shown += 1
        by, bx, bh, bw = box  # the intersection, in the crop's frame, scaled to the view
        assert by == pytest.approx((max(y, cy) - cy) * size / ch)
        assert bx == pytest.approx((max(x, cx) - cx) * size / cw)
        assert 0 <= by and 0 <= bx and by + bh <= size + 1e-9 and bx + bw <= size + 1e-9
    assert shown > 0 and left_out > 0
    fired = [j for j in range(n) if plan.gates["cutmix"][j]]
    assert fired and all(units["cutmix"].box(plan, j, size) ==
                         tuple(float(v) for v in plan.cutmix_box) for j in fired)
