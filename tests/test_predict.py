"""`dali-erkt predict`: the README's command lines as written, OA equal to `evaluate`'s on the same
files, unreadable files named and skipped, --topk, the ensemble, and --tile's grid and class map."""
from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dali_erkt.cli import main
from dali_erkt.commands.predict import class_colours, decode_large, legend_height, shade
from dali_erkt.errors import DataError
from dali_erkt.synthetic import make_scenes

README = Path(__file__).resolve().parents[1] / "README.md"
ENSEMBLE = ["--set", "model.teachers=[resnet10t,resnet18]", "--set", "model.teacher_weights=[0.6,0.4]"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def readme_lines() -> list[list[str]]:
    """The `dali-erkt predict` lines of the README's section, split as bash splits them."""
    text = README.read_text()
    section = text[text.index("## Predicting new imagery"):]
    section = section[:section.index("\n## ", 4)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected one bash block under 'Predicting new imagery'"
    lines = [shlex.split(ln) for ln in blocks[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines and all(ln[:2] == ["dali-erkt", "predict"] for ln in lines)
    return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 classes x 8 scenes, a 50/50 split, and two 1-epoch teachers (resnet10t, resnet18)."""
    base = tmp_path_factory.mktemp("predict")
    data = make_scenes(base / "data", classes=3, per_class=8, size=32)
    split = base / "split"
    assert run("split", data, "--train-ratio", "0.5", "--out", split).exit_code == 0
    common = ["--split", split, "--epochs", "1", "--image-size", "32", "--batch-size", "4",
              "--device", "cpu", "--no-progress"]
    for arch in ("resnet10t", "resnet18"):
        ok(run("train-teacher", "--arch", arch, "--out", base / "teachers" / arch, *common))
    return {"base": base, "data": data, "split": split, "teachers": base / "teachers",
            "run": base / "teachers" / "resnet10t"}


def scene_image(path, width=300, height=200) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_readme_lines_run_as_written(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene_image(tmp_path / "scene.tif")
    subst = {"runs/erkt-s0/last.pt": str(world["run"] / "last.pt"), "runs/erkt-s0": str(world["run"]),
             "new-images": str(world["data"]), "splits/nwpu-10-s0:test": f"{world['split']}:test",
             "runs/teachers": str(world["teachers"]), "256": "64", "128": "32"}
    results = {}
    for line in readme_lines():
        args = [subst.get(a, a) for a in line[2:]]
        if "--teachers" in args:
            args += ENSEMBLE  # small teachers in place of the default three
        results[args[args.index("--out") + 1]] = ok(run("predict", *args))
    assert len(results) == 4
    folder, part, ens, tiles = (results[k] for k in ("predictions.csv", "test-predictions.csv",
                                                       "ensemble.csv", "scene.csv"))
    assert folder["images"] == 24 and folder["oa_images"] == 24 and len(rows("predictions.csv")) == 24
    assert part["images"] == 12 and part["topk"] == 2
    assert list(rows("test-predictions.csv")[0]) == ["path", "class1", "prob1", "class2", "prob2"]
    assert len(ens["models"]) == 2 and ens["images"] == 12
    # 300 x 200 at tile 64, stride 32: rows (200 - 64) // 32 + 1 = 5, cols (300 - 64) // 32 + 1 = 8
    assert (tiles["rows"], tiles["cols"], tiles["tiles"]) == (5, 8, 40)
    assert Path("scene.png").is_file() and len(rows("scene.csv")) == 40


def test_oa_equals_evaluate_on_the_same_files(world, tmp_path):
    ev = {}
    for part in ("test", "train"):
        ev[part] = ok(run("evaluate", "--split", world["split"], "--checkpoint", world["run"] / "last.pt",
                          "--part", part, "--out", tmp_path / "eval", "--json", "--device", "cpu"))
    got = ok(run("predict", world["run"] / "last.pt", f"{world['split']}:test", "--out",
                 tmp_path / "p.csv", "--device", "cpu"))
    assert got["oa"] == pytest.approx(ev["test"]["oa"]) and got["oa_images"] == ev["test"]["images"] == 12
    # The whole folder, labelled by its class sub-folders: the split's two parts together.
    whole = ok(run("predict", world["run"], world["data"], "--out", tmp_path / "w.csv", "--device", "cpu"))
    hits = sum(round(ev[p]["oa"] * ev[p]["images"]) for p in ev)
    assert whole["oa_images"] == 24 and whole["oa"] == pytest.approx(hits / 24)
    # The CSV's top-1 agrees with that OA.
    names = {"forest", "farmland", "river"}
    top1 = [(Path(r["path"]).parent.name, r["class1"]) for r in rows(tmp_path / "w.csv")]
    assert {t for t, _ in top1} <= names and sum(t == c for t, c in top1) == hits
    assert whole["images_per_s"] is None or whole["images_per_s"] > 0
    assert whole["warmup_images"] > 0 and whole["seconds"] > 0


def test_unreadable_file_is_named_and_skipped(world, tmp_path):
    data = shutil.copytree(world["data"], tmp_path / "data")
    bad = data / "forest" / "x.jpg"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    r = run("predict", world["run"], data, "--out", tmp_path / "p.csv", "--topk", "1")
    got = ok(r)
    assert "Traceback" not in r.output
    assert [ln for ln in r.stderr.splitlines() if "x.jpg" in ln] == \
        [f"skipped {bad}: not an image (format not recognised)"]
    assert got["skipped"] == [{"path": str(bad), "reason": "not an image (format not recognised)"}]
    table = rows(tmp_path / "p.csv")
    assert got["images"] == len(table) == 24 and all("x.jpg" not in t["path"] for t in table)
    assert list(table[0]) == ["path", "class1", "prob1"]
    # Only broken files: one error line, exit 2.
    r = run("predict", world["run"], bad, "--out", tmp_path / "q.csv")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 2 and lines[0].startswith("skipped ")
    assert lines[1].startswith("error: none of the 1 images is readable")


def test_topk_is_respected_and_checked(world, tmp_path):
    got = ok(run("predict", world["run"], f"{world['split']}:test", "--out", tmp_path / "p.csv",
                 "--topk", "3"))
    table = rows(tmp_path / "p.csv")
    assert got["topk"] == 3
    assert list(table[0])[1:] == ["class1", "prob1", "class2", "prob2", "class3", "prob3"]
    for t in table:
        p = [float(t[f"prob{j}"]) for j in (1, 2, 3)]
        assert p == sorted(p, reverse=True) and sum(p) == pytest.approx(1.0, abs=1e-4)
        assert len({t["class1"], t["class2"], t["class3"]}) == 3
    r = run("predict", world["run"], world["data"], "--out", tmp_path / "q.csv", "--topk", "4")
    assert r.exit_code == 2 and r.stderr.strip() == "error: --topk 4: the model has 3 classes; use 1 to 3"
    r = run("predict", world["run"], world["data"], "--out", tmp_path / "p.csv")  # exists
    assert r.exit_code == 2 and "--force" in r.stderr


def test_ensemble_matches_evaluate(world, tmp_path):
    ev = ok(run("evaluate", "--split", world["split"], "--teachers", world["teachers"], *ENSEMBLE,
                "--out", tmp_path / "eval", "--json", "--device", "cpu"))
    got = ok(run("predict", "--teachers", world["teachers"], f"{world['split']}:test", *ENSEMBLE,
                 "--out", tmp_path / "e.csv"))
    assert got["oa"] == pytest.approx(ev["oa"])
    assert [m.split(" (")[0] for m in got["models"]] == ["teacher-resnet10t x 0.6", "teacher-resnet18 x 0.4"]
    r = run("predict", world["run"], world["data"], "--teachers", world["teachers"],
            "--out", tmp_path / "x.csv")
    assert r.exit_code == 2 and r.stderr.startswith("error: ")  # the first argument is then an image


def test_tiles_grid_csv_and_class_map(world, tmp_path):
    big = scene_image(tmp_path / "big.png")  # 300 wide, 200 high
    got = ok(run("predict", world["run"], big, "--tile", "32", "--out", tmp_path / "t.csv",
                 "--batch-size", "7"))
    # Tiles fully inside: floor(200 / 32) = 6 rows, floor(300 / 32) = 9 cols; 300 - 288 = 12 and
    # 200 - 192 = 8 px are left uncovered.
    assert (got["rows"], got["cols"], got["tiles"]) == (6, 9, 54)
    assert got["left_uncovered_px"] == [12, 8]
    table = rows(tmp_path / "t.csv")
    assert len(table) == 54 and list(table[0])[:4] == ["row", "col", "x", "y"]
    assert {(int(t["row"]), int(t["col"])) for t in table} == {(r, c) for r in range(6) for c in range(9)}
    assert all(int(t["x"]) == 32 * int(t["col"]) and int(t["y"]) == 32 * int(t["row"]) for t in table)
    with Image.open(tmp_path / "t.png") as im:
        assert im.size == (300, 200 + legend_height(3, 300, 200)) == tuple(got["class_map_size"])
        px = np.asarray(im.convert("RGB"))
    classes = got["classes"]
    colours = class_colours(3)
    for t in table:  # each tile's cell centre has its class colour, shaded by its probability
        y, x = int(t["y"]) + 16, int(t["x"]) + 16
        assert tuple(px[y, x]) == shade(colours[classes.index(t["class1"])], float(t["prob1"]))
    assert tuple(px[196, 295]) == (128, 128, 128)  # the uncovered corner
    # A tile's class is the class of the same crop predicted as a file.
    Image.open(big).crop((64, 32, 96, 64)).save(tmp_path / "crop.png")
    one = ok(run("predict", world["run"], tmp_path / "crop.png", "--out", tmp_path / "c.csv"))
    assert one["images"] == 1
    tile = next(t for t in table if (t["row"], t["col"]) == ("1", "2"))
    assert rows(tmp_path / "c.csv")[0]["class1"] == tile["class1"]
    # With a stride: (200 - 32) // 16 + 1 = 11 rows, (300 - 32) // 16 + 1 = 17 cols.
    got = ok(run("predict", world["run"], big, "--tile", "32", "--stride", "16", "--out", tmp_path / "s.csv"))
    assert got["tiles"] == 187 and len(rows(tmp_path / "s.csv")) == 187


def test_tile_errors_are_one_line(world, tmp_path):
    big = scene_image(tmp_path / "big.jpg")
    r = run("predict", world["run"], big, "--tile", "256", "--out", tmp_path / "t.csv")
    assert r.exit_code == 2 and r.stderr.strip() == \
        "error: --tile 256 is larger than the image (300 x 200): use a smaller tile"
    r = run("predict", world["run"], big, big, "--tile", "32", "--out", tmp_path / "t.csv")
    assert r.exit_code == 2 and "one large image" in r.stderr
    with pytest.raises(DataError, match=r"larger than --tile decodes .*\(it is 300 x 200\)"):
        decode_large(big, max_pixels=300 * 200 - 1)
    with pytest.raises(DataError, match="larger than --tile decodes"):  # Pillow's own refusal
        decode_large(big, max_pixels=1000)
    with pytest.raises(DataError, match="cannot decode"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
        decode_large(tmp_path / "bad.png")
    assert decode_large(big).size == (300, 200) and decode_large(big).mode == "RGB"


def test_overflowing_model_is_refused_in_one_line(world, tmp_path):
    from dali_erkt.checkpoint import load_checkpoint, save_checkpoint
    state = load_checkpoint(world["run"] / "last.pt")
    for name in ("fc.weight", "fc.bias"):  # finite weights near float32's maximum: logits overflow
        state["model"][name] = torch.full_like(state["model"][name], 3.4e38)
    save_checkpoint(tmp_path / "huge.pt", state)
    r = run("predict", tmp_path / "huge.pt", world["data"], "--out", tmp_path / "p.csv")
    assert r.exit_code == 3 and "Traceback" not in r.output
    assert r.stderr.strip().startswith("error: the model computes NaN or infinite logits")
    assert not (tmp_path / "p.csv").exists()
