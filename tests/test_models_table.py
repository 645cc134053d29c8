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
