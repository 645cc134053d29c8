"""Configuration: defaults, presets, YAML round trip, overrides and one-line validation errors."""
from __future__ import annotations

import re

import pytest
import yaml

from dali_erkt.config import (UNITS, apply_overrides, crop_size, default_config, differences,
                              from_dict, load_config, read_config_file, resolve_config, save_config,
                              to_dict)
from dali_erkt.errors import ConfigError


def test_paper_defaults_in_one_place():
    cfg = default_config()
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.optim.epochs) == (256, 30, 600)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == (2e-4, 1e-6, "cosine")
    assert (cfg.loss.ratio, cfg.loss.tau, cfg.loss.tau_squared) == (1.0, 2.0, True)
    assert cfg.model.teachers == ("efficientnet_b3", "efficientnet_b0", "resnet50")
    assert cfg.model.teacher_weights == (0.4, 0.3, 0.3) and cfg.model.arch == "efficientnet_b0"
    v = cfg.vsm
    assert (v.color_jitter.brightness, v.rotation.degrees) == (0.5, (-180.0, 180.0))
    assert (v.erasing.scale, v.erasing.ratio) == ((0.02, 0.33), (0.3, 3.3))
    # The crop's size follows the training size unless set: the paper's 176 at 256 px.
    assert (v.resized_crop.size, v.resized_crop.scale) == (0, (0.08, 1.0))
    assert crop_size(v.resized_crop, 256) == 176 and crop_size(v.resized_crop, 64) == 44
    v.resized_crop.size = 100
    assert crop_size(v.resized_crop, 64) == 100
    assert UNITS == ("color_jitter", "rotation", "hflip", "vflip", "grayscale", "autocontrast",
                     "erasing", "resized_crop", "cutmix")


@pytest.mark.parametrize("preset", ["erkt", "base", "none"])
def test_yaml_round_trip(tmp_path, preset):
    cfg = default_config(preset)
    cfg.data.batch_size = 64
    cfg.model.teachers, cfg.model.teacher_weights = ("resnet50",), (1.0,)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["preset"] == preset


def test_overrides_are_typed():
    cfg = apply_overrides(default_config(), ["vsm.cutmix.p=0.5", "data.batch_size=64",
                                             "loss.tau_squared=false", "vsm.erasing.scale=[0.1, 0.2]",
                                             "model.teachers=[resnet50, resnet18]",
                                             "model.teacher_weights=[0.5, 0.5]"])
    assert cfg.vsm.cutmix.p == 0.5 and cfg.data.batch_size == 64 and cfg.loss.tau_squared is False
    assert cfg.vsm.erasing.scale == (0.1, 0.2) and cfg.model.teachers == ("resnet50", "resnet18")


@pytest.mark.parametrize("override,message", [
    ("vsm.grayscale.p=1.5", "vsm.grayscale.p = 1.5 is not a probability"),
    ("vsm.cutmix.p=-0.1", "not a probability"),
    ("vsm.erasing.scale=[0.3, 0.1]", "empty or reversed"),
    ("vsm.rotation.degrees=[10, 10]", "empty or reversed"),
    ("vsm.solarize.p=0.5", "unknown setting 'vsm.solarize'"),
    ("data.batch_size=abc", "not a valid int"),
    ("data.batch_size=0", "at least 1"),
    ("vsm.erasing.scale=[0.1]", "needs 2 values"),
    ("model.teacher_weights=[0.5]", "give one weight per teacher"),
    ("run.precision=fp8", "use auto, fp32, fp16 or bf16"),
    ("optim.lr=nan", "optim.lr = nan must be a positive number"),
    ("optim.lr=inf", "must be a positive number"),
    ("optim.weight_decay=-1", "optim.weight_decay = -1.0 must be >= 0"),
    ("loss.tau=nan", "loss.tau = nan must be > 0"),
    ("vsm.grayscale.p=nan", "is not a probability"),
    ("vsm.erasing.scale=[nan, 0.2]", "empty or reversed"),
    ("data.num_threads=0", "data.num_threads = 0 must be at least 1"),
    ("data.prefetch=0", "data.prefetch = 0 must be at least 1"),
    ("loss.ratio=nan", "loss.ratio = nan must be in [0, 2]"),
    ("batch_size", "must look like section.key=value"),
    ("run.seed=18446744073709551616", "run.seed = 18446744073709551616 must be in [0, 2"),
    ("data.image_size=100000", "data.image_size = 100000 is too large: one float image of it is 120.0 GB"),
    ("vsm.resized_crop.size=20000", "vsm.resized_crop.size = 20000: use 8 to 4096"),
    ("data.batch_size=1000000", "data.batch_size = 1000000 is too large"),
    ("model.teacher_weights=[1,2,[3]]", "not a valid float"),
])
def test_bad_values_fail_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        apply_overrides(default_config(), [override])
    assert "\n" not in str(info.value)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown VSM preset 'paper'"):
        default_config("paper")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("vsm: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- vsm\n- data\n")
    with pytest.raises(ConfigError, match="holds a list, not a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "noise.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is not text"):
        load_config(tmp_path / "noise.yaml")
    (tmp_path / "unit.yaml").write_text("vsm:\n  mixup:\n    p: 0.5\n")
    with pytest.raises(ConfigError, match="unknown setting 'vsm.mixup'"):
        load_config(tmp_path / "unit.yaml")


def test_from_dict_applies_preset_first():
    cfg = from_dict({"preset": "base", "vsm": {"grayscale": {"p": 0.2}}})
    assert cfg.vsm.cutmix.p == 0.1 and cfg.vsm.grayscale.p == 0.2
    assert to_dict(cfg)["vsm"]["erasing"]["p"] == 0.0


def test_resolver_precedence(tmp_path):
    """defaults < preset < config file < --set < dedicated flags, for every command."""
    f = tmp_path / "c.yaml"
    f.write_text("preset: erkt\nvsm:\n  grayscale:\n    p: 0.7\n  hflip:\n    p: 0.3\n"
                 "data:\n  batch_size: 12\n  image_size: 96\n")
    cfg = resolve_config("erkt", f, preset="base", overrides=["vsm.hflip.p=0.4", "data.batch_size=16"],
                         flags={"data.batch_size": 20, "optim.epochs": None})
    assert cfg.preset == "base" and cfg.vsm.cutmix.p == 0.1  # --preset chose the layer below the file
    assert cfg.vsm.grayscale.p == 0.7  # the file beats the preset (0.1 in both presets)
    assert cfg.vsm.hflip.p == 0.4  # --set beats the file
    assert cfg.data.batch_size == 20  # a dedicated flag beats --set
    assert cfg.data.image_size == 96 and cfg.optim.epochs == 600  # None: flag not given
    # Without --preset the file's own preset is the layer; without a file the command's default.
    assert resolve_config("base", f).preset == "erkt"
    assert resolve_config("base").preset == "base" and resolve_config("base").vsm.cutmix.p == 0.1
    # A checkpoint's stored settings sit below the file.
    cfg = resolve_config("erkt", f, base={"data": {"image_size": 48, "dtype": "float32"}})
    assert cfg.data.image_size == 96 and cfg.data.dtype == "float32"


def test_differences_name_each_changed_setting():
    a, b = default_config(), default_config()
    b.optim.epochs, b.vsm.cutmix.p = 10, 0.5
    assert differences(to_dict(a), to_dict(b)) == [("optim.epochs", 600, 10), ("vsm.cutmix.p", 1.0, 0.5)]


@pytest.mark.parametrize("text, message", [
    ("optim: {lr: yes}", "optim.lr = True is not a valid float"),
    ("optim: {epochs: true}", "optim.epochs = True is not a valid int"),
    ("loss: {tau_squared: [1, 2]}", "loss.tau_squared = [1, 2] is not a valid bool"),
    ("run: {channels_last: 2}", "run.channels_last = 2 is not a valid bool"),
    ("optim: {epochs: .inf}", "optim.epochs = inf is not a valid int"),
    ("optim: {lr: 1.0}\noptim: {lr: 2.0}", "the key 'optim' is given twice"),
    ("optim:\n  lr: 1.0\n  lr: 2.0", "the key 'lr' is given twice"),
])
def test_yaml_types_are_strict_and_keys_unique(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        from_dict(read_config_file(path))
    assert "\n" not in str(err.value)


def test_overflowing_and_textual_values(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.epochs = '1e400' is not a valid int"):
        apply_overrides(default_config(), ["optim.epochs=1e400"])
    with pytest.raises(ConfigError, match=r"data.batch_size = 'inf' is not a valid int"):
        apply_overrides(default_config(), ["data.batch_size=inf"])
    cfg = apply_overrides(default_config(), ["run.channels_last=off", "loss.tau_squared=1"])
    assert cfg.run.channels_last is False and cfg.loss.tau_squared is True
