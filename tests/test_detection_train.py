"""Detection through the one training loop: a tiny run, COCO mAP, eval/predict commands, resume, peers, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_mnist
from mobilevit import create_model, read_checkpoint, save_checkpoint
from mobilevit.cli import main
from mobilevit.data.detection import DetEvalTransform, build_detection_dataset, collate_detection
from mobilevit.data.scenes import generate_scenes
from mobilevit.models.peers import TorchvisionModel
from mobilevit.models.ssdlite import MobileViTSSDLite
from mobilevit.training.evaluate import evaluate_detection
from mobilevit.training.recipe import list_recipes, load_recipe
from mobilevit.training.trainer import Trainer, eval_batches, read_train_state, train
from test_segmentation_train import yaml_args
from test_train import read_rows

CLASSES = 11  # background + 10 Fashion-MNIST classes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det")
    write_mnist(root / "mnist", n_train=40, n_test=10)
    out = root / "scenes"
    generate_scenes(out, num_train=12, num_val=6, num_test=4, size=64, fashion_mnist_dir=root / "mnist", progress=False)
    return out


def tiny(data: Path, out: Path, **extra: object) -> dict[str, object]:
    """A detection run of a few seconds: SSDLite-MobileViT-XXS on 64 px scenes."""
    values = dict(
        model="mobilevit_xxs_ssdlite", data=str(data), output=str(out), val_split="val", workers=0,
        base_size=64, base_batch=4, multiscale=False, eval_size=64, eval_batch=4,
        epochs=2, effective_batch=None, lr=0.002, min_lr=0.0002, warmup_iters=2, warmup_init_lr=0.0002,
        label_smoothing=0.0, ema_momentum=0.01, ema_warmup=True, tensorboard=False,
        progress=False, log_every=1, channels_last=True,
    )  # fmt: skip
    return values | extra


def val_loader(data: Path, size: int = 64) -> torch.utils.data.DataLoader:
    val = build_detection_dataset(data, "val", DetEvalTransform(size))
    return torch.utils.data.DataLoader(val, batch_sampler=eval_batches(len(val), 4), collate_fn=collate_detection)


def test_detection_recipes_follow_the_official_config():
    for name in ("xxs", "xs", "s"):
        cfg = load_recipe(f"mobilevit_{name}_ssdlite_coco")
        assert f"mobilevit_{name}_ssdlite_coco" in list_recipes()
        assert cfg.model == f"mobilevit_{name}_ssdlite" and cfg.weights == f"mobilevit_{name}.cvnets_in1k"
        assert (cfg.epochs, cfg.base_size, cfg.base_batch, cfg.effective_batch) == (200, 320, 32, 128)
        assert (cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.warmup_init_lr) == (0.0009, 1e-6, 500, 0.00009)
        assert (cfg.weight_decay, cfg.ema_momentum, cfg.label_smoothing, cfg.multiscale) == (0.01, 0.0005, 0.0, False)
        assert (cfg.val_split, cfg.eval_size) == ("val", 320)


def test_detection_run_writes_everything(scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    result = train(load_recipe(None, tiny(scenes, out)))
    for name in ("last.pt", "best.safetensors", "metrics.csv", "steps.csv", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == [
        "epoch", "step", "lr", "train_loss", "val_loss", "val_map", "val_map50", "val_map75",
        "ema_val_loss", "ema_val_map", "ema_val_map50", "ema_val_map75", "epoch_seconds", "images_per_second",
        "skipped_images",
    ]  # fmt: skip
    assert all(0 <= float(r["val_map"]) <= 100 and float(r["train_loss"]) > 0 for r in rows)
    assert result["best_map"] == max(max(float(r["val_map"]), float(r["ema_val_map"])) for r in rows)
    ckpt = read_checkpoint(out / "best.safetensors")
    assert ckpt.task == "detection" and ckpt.meta["categories"][0] == "background"
    model = create_model("mobilevit_xxs_ssdlite", weights=out / "best.safetensors")
    assert isinstance(model, MobileViTSSDLite) and model.num_classes == CLASSES
    recorded = ckpt.meta["training"]["val_map"]
    assert evaluate_detection(model, val_loader(scenes), torch.device("cpu")).map == pytest.approx(recorded)
    # eval command: the same number, per-class AP, a picture
    code = main(["eval", "--weights", str(out / "best.safetensors"), "--data", str(scenes), "--split", "val",
                 "--num-workers", "0", "--json", "--samples", str(tmp_path / "s.png")])  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert code == 0 and metrics["map"] == pytest.approx(recorded) and len(metrics["ap"]) == CLASSES - 1
    assert (tmp_path / "s.png").stat().st_size > 0
    # predict: a picture at the image's own size and JSON boxes in its pixels
    image = scenes / "JPEGImages" / "test_000000.jpg"
    code = main(["predict", str(image), "--weights", str(out / "best.safetensors"), "--output-dir",
                 str(tmp_path / "p"), "--json", "--score-thresh", "0"])  # fmt: skip
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and Image.open(record["picture"]).size == Image.open(image).size
    assert record["detections"] and all(0 <= v <= 64 for d in record["detections"] for v in d["box"])
    assert {d["label"] for d in record["detections"]} <= set(ckpt.meta["categories"][1:])


def test_classifier_backbone_then_detection(scenes: Path, tmp_path: Path):
    """The paper's protocol: a classifier's weights as the backbone, a fresh head."""
    classifier = create_model("mobilevit_xxs", num_classes=10)
    save_checkpoint(classifier.state_dict(), classifier.config, tmp_path / "cls.safetensors", arch="mobilevit_xxs")
    trainer = Trainer(load_recipe(None, tiny(scenes, tmp_path / "run", weights=str(tmp_path / "cls.safetensors"))))
    assert torch.equal(trainer.model.backbone.stem.conv.weight, classifier.stem.conv.weight)
    assert trainer.model.num_classes == CLASSES


def test_detection_resume_matches_an_uninterrupted_run(scenes: Path, tmp_path: Path):
    full = train(load_recipe(None, tiny(scenes, tmp_path / "full")))
    train(load_recipe(None, tiny(scenes, tmp_path / "cut", max_steps=4)))  # 3 steps per epoch: stop inside epoch 2
    assert read_train_state(tmp_path / "cut" / "last.pt")["step"] == 4
    resumed = Trainer(load_recipe(None, tiny(scenes, tmp_path / "cut")), resume=True).fit()
    assert resumed["best_map"] == full["best_map"]
    drop = ("epoch_seconds", "images_per_second")
    for name in ("steps.csv", "metrics.csv"):
        a, b = read_rows(tmp_path / "full" / name), read_rows(tmp_path / "cut" / name)
        assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
            {k: v for k, v in r.items() if k not in drop} for r in b
        ]
    a, b = (read_checkpoint(tmp_path / d / "best.safetensors").state_dict for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crowd_boxes_are_left_out_of_the_loss(scenes: Path, tmp_path: Path):
    trainer = Trainer(load_recipe(None, tiny(scenes, tmp_path / "run", ema_momentum=0.0)))
    images, targets, _ = next(iter(trainer.loader))
    torch.manual_seed(0)
    trainer.model.eval()  # no dropout: the same forward twice
    plain = trainer.task.forward_loss(trainer.net, images, targets, trainer.cfg)[0]
    crowded = [t | {"boxes": torch.cat([t["boxes"], torch.tensor([[0.0, 0.0, 64.0, 64.0]])]),
                    "labels": torch.cat([t["labels"], torch.tensor([1])]),
                    "iscrowd": torch.cat([t["iscrowd"], torch.tensor([1])])} for t in targets]  # fmt: skip
    assert torch.equal(trainer.task.forward_loss(trainer.net, images, crowded, trainer.cfg)[0], plain)


def test_torchvision_peer_in_the_same_loop(scenes: Path, tmp_path: Path):
    """A peer's classifier trained by the loop becomes its detector's backbone, as ours does."""
    from mobilevit.checkpoints.io import save_peer

    classifier = TorchvisionModel("torchvision:mobilenet_v3_large", 10)
    save_peer(classifier, tmp_path / "cls.safetensors", {"categories": [str(i) for i in range(10)]})
    name = "torchvision:ssdlite320_mobilenet_v3_large"
    peer = create_model(name, weights=tmp_path / "cls.safetensors", num_classes=CLASSES)
    assert torch.equal(peer.net.backbone.features[0][0][0].weight, classifier.net.features[0][0].weight)
    assert torch.equal(peer.net.backbone.features[1][-1][0].weight, classifier.net.features[-1][0].weight)  # full tail
    values = tiny(scenes, tmp_path / "peer", model=name, epochs=1, weights=str(tmp_path / "cls.safetensors"),
                  ema_momentum=0.0)  # fmt: skip
    result = train(load_recipe(None, values))
    assert 0 <= result["best_map"] <= 100
    trained = create_model(name, weights=tmp_path / "peer" / "best.safetensors")
    assert trained.num_classes == CLASSES and trained.weights_meta["categories"][0] == "background"
    assert main(["eval", "--weights", str(tmp_path / "peer" / "best.safetensors"), "--data", str(scenes),
                 "--split", "val", "--num-workers", "0"]) == 0  # fmt: skip


def test_detection_ddp_two_processes_gloo(scenes: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mobilevit"]
    proc = subprocess.run(
        [*cmd, "train", "--config", "mobilevit_xxs_ssdlite_coco", *yaml_args(tiny(scenes, out, device="cpu", weights=None, epochs=1))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_train_state(out / "last.pt")["world_size"] == 2
    # validation (6 scenes, 3 per rank): detections gathered from both ranks equal one process's evaluation
    ckpt = read_checkpoint(out / "best.safetensors")
    model = create_model("mobilevit_xxs_ssdlite", weights=ckpt)
    assert evaluate_detection(model, val_loader(scenes), torch.device("cpu")).map == pytest.approx(
        ckpt.meta["training"]["val_map"]
    )
