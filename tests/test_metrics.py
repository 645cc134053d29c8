"""Metrics on hand-computed cases, the on-device meter, and the confusion report files."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from dali_erkt.metrics import (
    ConfusionMeter, agreement, confusion_matrix, overall_accuracy, per_class_accuracy,
)
from dali_erkt.reports.confusion import write_confusion

PRED = [0, 1, 2, 2, 1, 0]
TRUE = [0, 1, 1, 2, 2, 0]
# By hand: rows are true classes, columns predictions.
CM = np.array([[2, 0, 0],
               [0, 1, 1],
               [0, 1, 1]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TRUE, 3)
    assert cm.dtype == np.int64 and np.array_equal(cm, CM)
    assert np.array_equal(confusion_matrix(torch.tensor(PRED), np.array(TRUE), 3), CM)
    assert np.array_equal(confusion_matrix([], [], 2), np.zeros((2, 2)))


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="target"):
        confusion_matrix([0, 1], [-1, 1], 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], 3)
    with pytest.raises(TypeError):
        confusion_matrix([0.0, 1.0], [0, 1], 3)


def test_overall_and_per_class_accuracy():
    assert overall_accuracy(CM) == pytest.approx(4 / 6)
    assert np.isnan(overall_accuracy(np.zeros((3, 3))))
    cm = np.zeros((4, 4), dtype=np.int64)
    cm[:3, :3] = CM  # class 3 never occurs in the test set
    acc = per_class_accuracy(cm)
    assert acc[:3] == pytest.approx([1.0, 0.5, 0.5])
    assert np.isnan(acc[3])
    assert np.nanmean(acc) == pytest.approx(2 / 3)


def test_agreement():
    assert agreement(PRED, TRUE) == pytest.approx(4 / 6)
    assert agreement(torch.tensor(PRED), PRED) == 1.0
    with pytest.raises(ValueError):
        agreement([0, 1], [0])


def test_meter_matches_confusion_matrix_over_batches():
    gen = torch.Generator().manual_seed(0)
    meter, preds, targets = ConfusionMeter(5), [], []
    for n in (7, 1, 16, 3):
        logits = torch.randn(n, 5, generator=gen)
        target = torch.randint(0, 5, (n,), generator=gen)
        meter.update(logits, target)
        preds.append(logits.argmax(1))
        targets.append(target)
    meter.update(torch.tensor([4, 0]), torch.tensor([4, 4]))  # labels instead of logits
    pred, target = torch.cat(preds + [torch.tensor([4, 0])]), torch.cat(targets + [torch.tensor([4, 4])])
    cm = meter.matrix()
    assert cm.dtype == np.int64 and cm.sum() == 29
    assert np.array_equal(cm, confusion_matrix(pred, target, 5))
    meter.reset()
    assert np.array_equal(meter.matrix(), np.zeros((5, 5)))


def test_meter_reports_out_of_range_labels_at_the_end():
    meter = ConfusionMeter(3)
    meter.update(torch.tensor([0, 1]), torch.tensor([0, -100]))  # e.g. an ignore_index
    with pytest.raises(ValueError, match="1 label"):
        meter.matrix()


# --- reports ---------------------------------------------------------------------------------

def test_write_confusion_csv_and_png(tmp_path):
    names = ["farm,land", "forest", "river"]  # a comma must survive the CSV round trip
    csv_path, png_path = write_confusion(CM, names, tmp_path / "out", stem="cm", title="student")
    assert (csv_path.name, png_path.name) == ("cm.csv", "cm.png")
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == names
    assert [r[0] for r in rows[1:]] == names
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == CM.tolist()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png_path) as im:
        im.verify()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cm.csv", "cm.png"]  # no .tmp left


def test_write_confusion_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(5, 20, 45)) + (rng.random((45, 45)) < 0.05)
    names = [f"class_with_a_long_name_{i}" for i in range(45)]
    _, png_path = write_confusion(cm, names, tmp_path)
    with Image.open(png_path) as im:
        assert min(im.size) > 1500  # grows with the class count so labels stay readable


def test_write_confusion_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match="square"):
        write_confusion(CM, ["a", "b"], tmp_path)
