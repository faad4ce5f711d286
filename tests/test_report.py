"""Report figures are real PNGs drawn from the data given; the confusion matrix counts exactly."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mobilevit.training.report import confusion_matrix, plot_confusion, plot_curves, plot_samples, read_metrics

HEADER = (
    "epoch,step,lr,train_loss,train_top1,val_loss,val_top1,val_top5,ema_val_loss,ema_val_top1,ema_val_top5,"
    "epoch_seconds,images_per_second,skipped_images"
)
CLASSES = ["cat", "dog", "bird"]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, checking its signature and that it decodes to a non-blank image."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    pixels = imread(path)
    assert pixels.std() > 0.01, "blank image"
    return struct.unpack(">II", data[16:24])


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.suffix == ".tmp"]


def test_curves_with_empty_cells_and_missing_columns(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        HEADER + "\n"
        "1,100,0.002,2.1,20.5,1.9,30.0,70.0,,,,12.0,800.0,0\n"
        "2,200,0.001,1.7,35.0,,,,,,,11.5,810.0,1\n"
        "3,300,0.0005,1.4,45.0,1.5,48.0,85.0,1.45,50.0,86.0,11.8,805.0,0\n"
    )
    rows = read_metrics(csv_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "val_loss" not in rows[1] and "ema_val_top1" not in rows[0] and rows[2]["ema_val_top1"] == 50.0
    out = plot_curves(csv_path, tmp_path / "sub" / "curves.png", title="run")
    assert out == tmp_path / "sub" / "curves.png"
    width, height = _png_size(out)
    assert width > 600 and height > 250
    assert _no_temp_files(out.parent)

    only_train = tmp_path / "train_only.csv"  # a single row, no validation columns at all
    only_train.write_text("epoch,train_loss,train_top1\n1,2.3,10\n")
    _png_size(plot_curves(only_train, tmp_path / "single.png"))


def test_confusion_matrix_counts_exactly():
    targets = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    preds = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    expected = torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 1]])
    cm = confusion_matrix(targets, preds, 3)
    assert cm.dtype == torch.int64 and torch.equal(cm, expected)
    assert torch.equal(confusion_matrix(torch.empty(0), torch.empty(0), 2), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="lie in"):
        confusion_matrix(targets, preds, 2)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix(targets, preds[:3], 3)


def test_plot_confusion(tmp_path):
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2]), 3)
    width, height = _png_size(plot_confusion(cm, CLASSES, tmp_path / "cm.png", title="val"))
    assert width > 300 and height > 300
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion(cm, CLASSES[:2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists() and _no_temp_files(tmp_path)


def test_plot_samples_grid(tmp_path):
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)).expand(5, 3, 16, 16)  # grey
    targets, preds = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 2, 2, 1, 1])
    probs = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    wide = plot_samples(images, targets, preds, CLASSES, tmp_path / "wide.png", probs=probs)
    tall = plot_samples(images, targets, preds, CLASSES, tmp_path / "tall.png", ncols=2, probs=probs.max(1).values)
    (w1, h1), (w2, h2) = _png_size(wide), _png_size(tall)
    assert w1 > w2 and h2 > h1  # 5 columns x 1 row vs 2 columns x 3 rows
    assert _colours(tall) == {"red", "green"}  # titles of wrong and right predictions (the images are grey)
    assert _colours(plot_samples(images, targets, targets, CLASSES, tmp_path / "right.png")) == {"green"}
    with pytest.raises(ValueError, match="targets"):
        plot_samples(images, targets[:2], preds, CLASSES, tmp_path / "bad.png")


def _colours(path: Path) -> set[str]:
    r, g, b = np.moveaxis(imread(path)[..., :3], -1, 0)
    found = {"red": ((r > 0.7) & (g < 0.3) & (b < 0.3)).any(), "green": ((g > 0.4) & (r < 0.2) & (b < 0.2)).any()}
    return {name for name, present in found.items() if present}
