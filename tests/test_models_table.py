"""`models` (the paper's Table 8): parameters, MACs, inference time."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dali_erkt.commands.models import count_macs, format_table, models_table, parse_at
from dali_erkt.errors import ConfigError


@pytest.fixture(scope="module")
def paper():
    return models_table(timing=False)  # 224 px, 1000 classes, the paper's models, B3 also at 300


def row(result, name):
    return next(r for r in result["rows"] if r["name"] == name)


def test_the_papers_numbers(paper):
    b0 = row(paper, "efficientnet_b0")
    assert b0["role"] == "student" and round(b0["params_m"], 1) == 5.3
    assert 0.385 <= b0["gmacs"] <= 0.40 and round(b0["gmacs"], 2) in (0.39, 0.40)
    r50 = row(paper, "resnet50")
    assert round(r50["params_m"], 1) == 25.6 and round(r50["gmacs"], 1) == 4.1
    ensemble = next(r for r in paper["rows"] if r["role"] == "ensemble")
    assert round(ensemble["params_m"], 1) == 43.1
    members = sum(row(paper, a)["gmacs"] for a in ("efficientnet_b3", "efficientnet_b0", "resnet50"))
    assert ensemble["gmacs"] == pytest.approx(members, rel=1e-3)  # the combination adds no MACs
    b3 = row(paper, "efficientnet_b3 @300")
    assert b3["image_size"] == 300 and round(b3["gmacs"], 1) == 1.8
    assert any("6.30 GMACs" in n for n in paper["notes"])  # the paper's 6.3 G for the ensemble
    assert all(r["latency_ms"] is None for r in paper["rows"])
    assert paper["image_size"] == 224 and paper["torch"] == torch.__version__


def test_format_table(paper):
    text = format_table(paper)
    assert "efficientnet_b3 @300" in text and "FLOPs / 2" in text and "43.08" in text
    assert len({len(line) for line in text.splitlines()[:2]}) == 1  # header and rule align


def test_timing_is_measured_on_tiny_settings():
    result = models_table(["mobilenetv2_050"], image_size=32, images=2, batch_size=2,
                          student="resnet10t", teachers=("resnet10t", "resnet14t"),
                          teacher_weights=(0.5, 0.5), num_classes=5, at_sizes=(("resnet14t", 48),),
                          latency_runs=2, warmup=1)
    assert [r["role"] for r in result["rows"]] == ["student", "teacher", "teacher", "ensemble",
                                                    "other", "at size"]
    for r in result["rows"]:
        for key in ("params_m", "gmacs", "latency_ms", "images_per_s", "seconds_for_n"):
            assert r[key] > 0, (r["name"], key)
    assert result["images"] == 2 and "s for 2 images" in format_table(result)


def test_macs_are_half_the_counted_flops():
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), 16) == 768 * 10
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, 16) == 8 * 16 * 16 * 3 * 9


@pytest.mark.parametrize("kwargs, words", [
    ({"archs_extra": ["resnet5O"]}, "unknown timm model"),
    ({"images": 0}, "images 0"),
    ({"image_size": 8}, "too small"),
    ({"device": "tpu"}, "use auto, cpu"),
])
def test_bad_input_is_one_line(kwargs, words):
    with pytest.raises(ConfigError) as err:
        models_table(timing=False, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_parse_at():
    assert parse_at(["efficientnet_b3@300", "resnet50@256"]) == (("efficientnet_b3", 300),
                                                                  ("resnet50", 256))
    with pytest.raises(ConfigError, match="ARCH@SIZE"):
        parse_at(["efficientnet_b3:300"])


# ---- a run's own models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two teachers (one an EfficientNet-Lite) and a student, trained 1 epoch at 32 px on 3 classes."""
    from click.testing import CliRunner

    from dali_erkt.cli import main
    from dali_erkt.synthetic import make_scenes

    root = tmp_path_factory.mktemp("models-runs")
    data = make_scenes(root / "data", classes=3, per_class=6, size=32)
    tiny = ["--epochs", "1", "--image-size", "32", "--batch-size", "3", "--device", "cpu",
            "--no-progress", "--set", "data.num_threads=1"]
    runner = CliRunner()
    commands = [["split", str(data), "--train-ratio", "0.5", "--out", str(root / "split")]]
    for arch in ("resnet10t", "tf_efficientnet_lite0"):
        commands.append(["train-teacher", "--split", str(root / "split"), "--arch", arch,
                         "--out", str(root / "teachers" / arch), *tiny])
    commands.append(["distill", "--split", str(root / "split"), "--teachers", str(root / "teachers"),
                     "--set", "model.teachers=[resnet10t,tf_efficientnet_lite0]",
                     "--set", "model.teacher_weights=[0.5,0.5]", "--set", "model.arch=resnet10t",
                     "--out", str(root / "student"), *tiny])
    for argv in commands:
        r = runner.invoke(main, argv)
        assert r.exit_code == 0, r.output
    return root


def run_models(*argv):
    import json

    from click.testing import CliRunner

    from dali_erkt.cli import main
    r = CliRunner().invoke(main, ["models", *map(str, argv), "--json"])
    return r, (json.loads(r.stdout) if r.exit_code == 0 else None)


def test_a_runs_own_models_at_its_size_and_classes(trained):
    r, result = run_models(trained / "student", trained / "teachers",
                           trained / "teachers" / "tf_efficientnet_lite0" / "best.pt", "--no-timing")
    assert r.exit_code == 0, r.output
    got = [(row["name"], row["role"], row["image_size"], row["num_classes"]) for row in result["rows"]]
    assert got == [("resnet10t", "student", 32, 3),
                   ("resnet10t", "teacher", 32, 3), ("tf_efficientnet_lite0", "teacher", 32, 3),
                   ("ensemble(resnet10t+tf_efficientnet_lite0)", "ensemble", 32, 3),
                   ("tf_efficientnet_lite0", "teacher", 32, 3)]  # the paper's trio not asked for
    assert not result["paper"] and all(row["latency_ms"] is None for row in result["rows"])
    rows = result["rows"]
    assert rows[0]["source"] == str(trained / "student" / "last.pt")
    assert rows[3]["source"] == str(trained / "teachers")
    # Each row is the model as built for 3 classes at 32 px (not 1,000 classes, not 224 px).
    from dali_erkt.models import create_model
    for row, arch in ((rows[0], "resnet10t"), (rows[2], "tf_efficientnet_lite0")):
        model = create_model(arch, 3)
        assert row["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
        assert row["gmacs"] == pytest.approx(count_macs(model, 32) / 1e9)
    # The ensemble is the sum of its members; the checkpoint given by itself equals its run's row.
    for key in ("params_m", "gmacs"):
        assert rows[3][key] == pytest.approx(rows[1][key] + rows[2][key], rel=1e-6)
        assert rows[4][key] == rows[2][key]
    text = format_table(result)
    assert "1000" not in text and str(trained / "teachers") in text and "random" not in text
    assert [line.split()[1] for line in text.splitlines()[2:7]] == [
        "student", "teacher", "teacher", "ensemble", "teacher"]


def test_a_run_timed_and_with_the_paper_on_request(trained):
    r, result = run_models(trained / "teachers", "--runs", "1", "--images", "4", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    assert [row["role"] for row in result["rows"]] == ["teacher", "teacher", "ensemble"]
    for row in result["rows"]:
        assert row["latency_ms"] > 0 and row["images_per_s"] > 0 and row["image_size"] == 32
    r, result = run_models(trained / "student", "mobilenetv2_050", "--paper", "--no-timing")
    assert r.exit_code == 0, r.output
    roles = [(row["name"], row["role"], row["num_classes"]) for row in result["rows"]]
    assert roles[0] == ("resnet10t", "student", 3)
    assert ("efficientnet_b3 @300", "at size", 1000) in roles and ("mobilenetv2_050", "other", 1000) in roles
    assert [n for n, role, _ in roles if role == "teacher"] == list(
        ("efficientnet_b3", "efficientnet_b0", "resnet50"))


def test_names_alone_are_the_papers_table(tmp_path):
    # The README's Table 8 form: arch names only give the paper's models and the names.
    r, result = run_models("mobilenetv2_050", "--no-timing", "--image-size", "32")
    assert r.exit_code == 0, r.output
    assert result["paper"] and result["rows"][-1]["name"] == "efficientnet_b3 @300"
    assert ("mobilenetv2_050", "other") in [(row["name"], row["role"]) for row in result["rows"]]


def test_bad_runs_are_one_line(tmp_path, trained):
    (tmp_path / "empty").mkdir()
    for arg, words in ((tmp_path / "empty", "holds no last.pt"),
                       (tmp_path / "nope" / "last.pt", "not a run folder"),
                       (trained / "split" / "train.txt", "")):
        r, _ = run_models(arg, "--no-timing")
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
