"""Segmentation through the one training loop: a full tiny run, metrics, eval/predict commands, resume, DDP, peers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_mnist
from mobilevit import create_model, read_checkpoint
from mobilevit.cli import main
from mobilevit.data.scenes import generate_scenes
from mobilevit.data.segmentation import SegEvalTransform, build_segmentation_dataset, collate_segmentation
from mobilevit.models.deeplabv3 import MobileViTDeepLabV3
from mobilevit.models.peers import TorchvisionModel
from mobilevit.training.evaluate import evaluate_segmentation, segmentation_metrics
from mobilevit.training.optim import build_optimizer
from mobilevit.training.recipe import list_recipes, load_recipe
from mobilevit.training.trainer import Trainer, TrainingDiverged, eval_batches, read_train_state, train
from test_train import cli_args, read_rows

CLASSES = 11  # background + 10 Fashion-MNIST classes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    write_mnist(root / "mnist", n_train=40, n_test=10)
    out = root / "scenes"
    generate_scenes(out, num_train=12, num_val=6, num_test=4, size=48, fashion_mnist_dir=root / "mnist", progress=False)
    return out


def tiny(data: Path, out: Path, **extra: object) -> dict[str, object]:
    """A segmentation run of a few seconds: DeepLabv3-MobileViT-XXS on 48 px scenes."""
    values = dict(
        model="mobilevit_xxs_deeplabv3", data=str(data), output=str(out), val_split="val", workers=0,
        base_size=32, base_batch=4, multiscale=False, resize_scale=[0.75, 1.25], eval_size=32, eval_batch=4,
        epochs=2, effective_batch=None, lr=0.002, min_lr=0.0002, warmup_iters=2, warmup_init_lr=0.0002,
        head_lr_scale=10, label_smoothing=0.0, ema_momentum=0.01, ema_warmup=True, tensorboard=False,
        progress=False, log_every=1, channels_last=True,
    )  # fmt: skip
    return values | extra


def yaml_args(values: dict[str, object]) -> list[str]:
    """KEY=VALUE command-line overrides (None as YAML's null)."""
    return cli_args({k: "null" if v is None else v for k, v in values.items()})


def val_loader(data: Path, size: int = 32) -> torch.utils.data.DataLoader:
    val = build_segmentation_dataset(data, "val", SegEvalTransform(size))
    return torch.utils.data.DataLoader(val, batch_sampler=eval_batches(len(val), 4), collate_fn=collate_segmentation)


def test_segmentation_recipes_follow_the_official_config():
    for name in ("xxs", "xs", "s"):
        cfg = load_recipe(f"mobilevit_{name}_deeplabv3_voc")
        assert f"mobilevit_{name}_deeplabv3_voc" in list_recipes()
        assert cfg.model == f"mobilevit_{name}_deeplabv3" and cfg.weights == f"mobilevit_{name}.cvnets_in1k"
        assert (cfg.epochs, cfg.base_size, cfg.base_batch, cfg.effective_batch) == (50, 512, 32, 128)
        assert (cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.warmup_init_lr) == (0.0009, 1e-6, 500, 0.00009)
        assert (cfg.head_lr_scale, cfg.weight_decay, cfg.ema_momentum, cfg.label_smoothing) == (10, 0.01, 0.0005, 0.0)
        assert (cfg.resize_scale, cfg.multiscale, cfg.eval_size) == ((0.5, 2.0), False, 512)


def test_metrics_from_a_confusion_matrix():
    # rows = labels, columns = predictions
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    miou, acc, iou = segmentation_metrics(confusion)
    assert iou[0] == pytest.approx(100 * 5 / 8) and iou[1] == pytest.approx(100 * 3 / 6) and math.isnan(iou[2])
    assert miou == pytest.approx((100 * 5 / 8 + 50) / 2) and acc == pytest.approx(100 * 8 / 11)


class Oracle(torch.nn.Module):
    """Predicts a fixed mask (one-hot logits) at the network input size."""

    num_classes = 3

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.one_hot(self.mask, 3).permute(2, 0, 1).float()
        return logits[None].expand(len(images), -1, -1, -1)


def test_evaluation_compares_at_the_original_size_and_ignores_255():
    mask = torch.tensor([[0, 1], [2, 2]])
    big = mask.repeat_interleave(3, 0).repeat_interleave(3, 1)  # the same labels at 6x6: nearest resize matches
    big_255 = big.clone()
    big_255[0, 0] = 255
    batches = [(torch.zeros(2, 3, 2, 2), [big, big_255], 1)]
    result = evaluate_segmentation(Oracle(mask), batches, torch.device("cpu"))
    assert (result.miou, result.pixel_acc, result.count, result.skipped) == (100.0, 100.0, 2, 1)
    assert int(result.confusion.sum()) == 2 * 36 - 1
    wrong = evaluate_segmentation(Oracle(torch.zeros(2, 2, dtype=torch.long)), batches, torch.device("cpu"))
    assert wrong.pixel_acc == pytest.approx(100 * 17 / 71) and wrong.miou == pytest.approx(100 * 17 / 71 / 3)
    with pytest.raises(ValueError, match="label 7"):
        evaluate_segmentation(
            Oracle(mask), [(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7), 0)], torch.device("cpu")
        )


def test_head_learning_rate_multiplier():
    model = create_model("mobilevit_xxs_deeplabv3", num_classes=CLASSES)
    opt = build_optimizer(model, 0.001, 0.01, (0.9, 0.999), head_lr_scale=10)
    backbone, head = opt.param_groups
    assert (backbone["lr_scale"], head["lr_scale"]) == (1.0, 10)
    assert len(head["params"]) == len(model.head_parameters()) > 0
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    assert len(build_optimizer(model, 0.001, 0.01, (0.9, 0.999)).param_groups) == 1


def test_segmentation_run_writes_everything(scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    result = train(load_recipe(None, tiny(scenes, out, checkpoint_every_steps=2)))
    for name in ("last.pt", "best.safetensors", "metrics.csv", "steps.csv", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == [
        "epoch", "step", "lr", "train_loss", "train_pixel_acc", "val_loss", "val_miou", "val_pixel_acc",
        "ema_val_loss", "ema_val_miou", "ema_val_pixel_acc", "epoch_seconds", "images_per_second", "skipped_images",
    ]  # fmt: skip
    assert all(0 <= float(r["val_miou"]) <= 100 and math.isfinite(float(r["train_loss"])) for r in rows)
    assert result["best_miou"] == max(max(float(r["val_miou"]), float(r["ema_val_miou"])) for r in rows)
    # the best weights: a segmentation checkpoint with class names; their val mIoU is the recorded one
    ckpt = read_checkpoint(out / "best.safetensors")
    assert ckpt.task == "segmentation" and ckpt.meta["categories"][0] == "background"
    model = create_model("mobilevit_xxs_deeplabv3", weights=out / "best.safetensors")
    assert isinstance(model, MobileViTDeepLabV3) and model.num_classes == CLASSES
    recorded = ckpt.meta["training"]["val_miou"]
    assert evaluate_segmentation(model, val_loader(scenes), torch.device("cpu")).miou == pytest.approx(recorded)
    # eval command: same number, per-class IoU, pictures
    code = main(["eval", "--weights", str(out / "best.safetensors"), "--data", str(scenes), "--split", "val",
                 "--num-workers", "0", "--samples", str(tmp_path / "s.png"), "--confusion", str(tmp_path / "c.png")])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and f"mIoU {recorded:.2f}%" in printed and "background" in printed
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
    # predict: a palette mask of class indices at the image's own size, and an overlay
    image = scenes / "JPEGImages" / "test_000000.jpg"
    code = main(
        ["predict", str(image), "--weights", str(out / "best.safetensors"), "--output-dir", str(tmp_path / "p")]
    )
    assert code == 0
    mask = Image.open(tmp_path / "p" / "test_000000_mask.png")
    assert mask.mode == "P" and mask.size == Image.open(image).size and np.asarray(mask).max() < CLASSES
    assert Image.open(tmp_path / "p" / "test_000000_overlay.png").size == mask.size
    # a segmentation model needs segmentation data
    assert main(["eval", "--weights", str(out / "best.safetensors")]) == 2
    assert "VOC tree" in capsys.readouterr().err


def test_classifier_backbone_then_segmentation(scenes: Path, tmp_path: Path):
    """The paper's protocol: a classifier's weights as the backbone, a fresh head."""
    classifier = create_model("mobilevit_xxs", num_classes=10)
    from mobilevit import save_checkpoint

    save_checkpoint(classifier.state_dict(), classifier.config, tmp_path / "cls.safetensors", arch="mobilevit_xxs")
    trainer = Trainer(load_recipe(None, tiny(scenes, tmp_path / "run", weights=str(tmp_path / "cls.safetensors"))))
    stem = trainer.model.backbone.stem.conv.weight
    assert torch.equal(stem, classifier.stem.conv.weight) and trainer.model.num_classes == CLASSES


def test_unreadable_scene_is_skipped_and_counted(scenes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    import shutil

    data = tmp_path / "scenes"
    shutil.copytree(scenes, data)
    (data / "JPEGImages" / "train_000003.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    train(load_recipe(None, tiny(data, tmp_path / "run", epochs=1, val_split=None)))
    row = read_rows(tmp_path / "run" / "metrics.csv")[0]
    assert row["skipped_images"] == "1" and row["val_miou"] == ""
    assert "train_000003" in caplog.text


def test_segmentation_divergence_stops(scenes: Path, tmp_path: Path):
    values = tiny(scenes, tmp_path / "run", lr=1e30, warmup_iters=0, ema_momentum=0.0, checkpoint_every_steps=1)
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        train(load_recipe(None, values))


def test_segmentation_resume_matches_an_uninterrupted_run(scenes: Path, tmp_path: Path):
    full = train(load_recipe(None, tiny(scenes, tmp_path / "full", epochs=2)))
    # stop inside epoch 1 (3 steps per epoch), then continue exactly
    train(load_recipe(None, tiny(scenes, tmp_path / "cut", epochs=2, max_steps=4)))
    assert read_train_state(tmp_path / "cut" / "last.pt")["step"] == 4
    resumed = Trainer(load_recipe(None, tiny(scenes, tmp_path / "cut", epochs=2)), resume=True).fit()
    assert resumed["best_miou"] == full["best_miou"]
    drop = ("epoch_seconds", "images_per_second")
    for name in ("steps.csv", "metrics.csv"):
        a, b = read_rows(tmp_path / "full" / name), read_rows(tmp_path / "cut" / name)
        assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
            {k: v for k, v in r.items() if k not in drop} for r in b
        ]
    a, b = (read_checkpoint(tmp_path / d / "best.safetensors").state_dict for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segmentation_ddp_two_processes_gloo(scenes: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mobilevit"]
    proc = subprocess.run(
        [*cmd, "train", "--config", "mobilevit_xxs_deeplabv3_voc", *yaml_args(tiny(scenes, out, device="cpu", weights=None))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_train_state(out / "last.pt")["world_size"] == 2
    # validation (6 scenes, 3 per rank) was reduced over both ranks: it equals one process's evaluation
    ckpt = read_checkpoint(out / "best.safetensors")
    model = create_model("mobilevit_xxs_deeplabv3", weights=ckpt)
    miou = evaluate_segmentation(model, val_loader(scenes), torch.device("cpu")).miou
    assert miou == pytest.approx(ckpt.meta["training"]["val_miou"])


def test_torchvision_peer_in_the_same_loop(scenes: Path, tmp_path: Path):
    """A peer's classifier trained by the loop becomes its segmentation model's backbone, as ours does."""
    classifier = TorchvisionModel("torchvision:mobilenet_v3_large", 10)
    from mobilevit.checkpoints.io import save_peer

    save_peer(classifier, tmp_path / "cls.safetensors", {"categories": [str(i) for i in range(10)]})
    peer = create_model(
        "torchvision:deeplabv3_mobilenet_v3_large", weights=tmp_path / "cls.safetensors", num_classes=CLASSES
    )
    assert torch.equal(peer.net.backbone["0"][0].weight, classifier.net.features[0][0].weight)
    values = tiny(scenes, tmp_path / "peer", model="torchvision:deeplabv3_mobilenet_v3_large", epochs=1,
                  weights=str(tmp_path / "cls.safetensors"), ema_momentum=0.0)  # fmt: skip
    result = train(load_recipe(None, values))
    assert 0 <= result["best_miou"] <= 100
    trained = create_model("torchvision:deeplabv3_mobilenet_v3_large", weights=tmp_path / "peer" / "best.safetensors")
    assert trained.num_classes == CLASSES and trained.weights_meta["categories"][0] == "background"
    assert main(["eval", "--weights", str(tmp_path / "peer" / "best.safetensors"), "--data", str(scenes),
                 "--split", "val", "--num-workers", "0", "--size", "32"]) == 0  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):
        create_model("torchvision:mobilenet_v3_large", weights=tmp_path / "peer" / "best.safetensors")
