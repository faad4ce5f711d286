"""Detection evaluation gives COCO AP values computed by hand; detection pictures draw what they are given."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from matplotlib.image import imread
from torch import Tensor, nn

from mobilevit.training.evaluate import DetectionResult, evaluate_detection
from mobilevit.training.report import draw_detections, label_colors, plot_detections

S = 100  # input size of the fake batches
CPU = torch.device("cpu")
Batches = list[tuple[Tensor, list[dict], int]]


def target(image_id: int, boxes: list, labels: list, orig: tuple[int, int] = (S, S), iscrowd: list | None = None):
    """A target as the data pipeline gives it: boxes in input pixels, area in original pixels."""
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    h, w = orig
    area = (boxes_t[:, 2] - boxes_t[:, 0]) * (w / S) * (boxes_t[:, 3] - boxes_t[:, 1]) * (h / S)
    return {
        "boxes": boxes_t, "labels": torch.tensor(labels, dtype=torch.int64), "image_id": image_id, "orig_size": orig,
        "iscrowd": torch.tensor(iscrowd or [0] * len(labels), dtype=torch.int64), "area": area,
    }  # fmt: skip


def batches_of(targets: list[dict], batch_size: int = 2) -> Batches:
    g = torch.Generator().manual_seed(0)
    chunks = [targets[i : i + batch_size] for i in range(0, len(targets), batch_size)]
    return [(torch.rand(len(c), 3, S, S, generator=g), c, 0) for c in chunks]


def passthrough(t: dict) -> dict:
    """Detect exactly the ground truth (crowd included), score 1."""
    return {"boxes": t["boxes"].clone(), "scores": torch.ones(len(t["labels"])), "labels": t["labels"].clone()}


class Replay(nn.Module):
    """A stand-in detector: each call answers ``detect(target)`` for the targets of the next batch."""

    def __init__(self, batches: Batches, detect: Callable[[dict], dict]):
        super().__init__()
        self.pending = [targets for _, targets, _ in batches]
        self.detect = detect

    def forward(self, images: Tensor) -> list[dict]:
        assert not self.training
        targets = self.pending.pop(0)
        assert len(targets) == len(images)
        return [self.detect(t) for t in targets]


def run(targets: list[dict], detect: Callable[[dict], dict], **kw) -> DetectionResult:
    batches = batches_of(targets)
    return evaluate_detection(Replay(batches, detect), batches, CPU, **kw)


def shifted(fraction: float, score: float = 1.0) -> Callable[[dict], dict]:
    """Detections moved right by ``fraction`` of their width: IoU (1 - f) / (1 + f) with the ground truth."""

    def detect(t: dict) -> dict:
        boxes = t["boxes"].clone()
        boxes[:, 0::2] += fraction * (boxes[:, 2:3] - boxes[:, 0:1])
        return {"boxes": boxes, "scores": torch.full((len(boxes),), score), "labels": t["labels"].clone()}

    return detect


SCENE = [  # non-square originals, two classes of three, one image without objects
    target(11, [[10, 10, 40, 50], [50, 20, 90, 60]], [1, 2], orig=(200, 400)),
    target(12, [[5, 5, 60, 30]], [1], orig=(300, 150)),
    target(13, [], [], orig=(120, 90)),
    target(14, [[30, 30, 70, 80], [0, 0, 20, 20], [55, 10, 90, 40]], [2, 2, 1]),
    target(15, [[20, 40, 80, 90]], [2], orig=(480, 640)),
]


def test_perfect_detections_score_100_and_absent_classes_are_nan():
    result = run(SCENE, passthrough, num_classes=3)
    assert (result.map, result.map50, result.map75) == (pytest.approx(100), pytest.approx(100), pytest.approx(100))
    assert result.per_class_ap[:2] == [pytest.approx(100), pytest.approx(100)]
    assert len(result.per_class_ap) == 3 and math.isnan(result.per_class_ap[2])  # class 3 has no ground truth
    assert result.num_images == 5 and result.num_detections == 7 and len(result.stats) == 12
    assert math.isnan(result.loss)  # no forward_raw / loss: no validation loss
    assert run(SCENE, passthrough).per_class_ap == [pytest.approx(100)] * 2  # K defaults to the largest label
    assert set(result.to_dict()) >= {"loss", "map", "map50", "map75", "per_class_ap", "num_images"}


def test_hand_computed_ap_of_misplaced_and_ranked_boxes():
    # IoU 2/3: a hit at the IoU thresholds .50, .55, .60, .65 only -> AP@[.5:.95] = 4/10
    result = run(SCENE, shifted(0.2))
    assert (result.map, result.map50, result.map75) == (pytest.approx(40), pytest.approx(100), pytest.approx(0))
    # IoU 1/3: a miss at every threshold
    result = run(SCENE, shifted(0.5))
    assert (result.map, result.map50) == (0, 0)
    # two objects, the exact one ranked first, the other missed: precision 1 up to recall 0.5 -> 51 of 101 points
    pair = [target(1, [[10, 10, 40, 40], [50, 50, 90, 90]], [1, 1])]

    def half_right(t: dict) -> dict:
        boxes = t["boxes"].clone()
        boxes[1, 0::2] += 20  # half the width to the right: IoU 1/3
        return {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": t["labels"].clone()}

    result = run(pair, half_right)
    assert result.map == pytest.approx(100 * 51 / 101) and result.map50 == pytest.approx(100 * 51 / 101)


def test_wrong_labels_and_no_detections_score_0():
    result = run(SCENE, lambda t: {**passthrough(t), "labels": 3 - t["labels"]}, num_classes=2)
    assert result.map == 0 and result.map50 == 0 and result.per_class_ap == [0, 0]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    result = run(SCENE, lambda t: empty, num_classes=3)
    assert result.map == 0 and result.map50 == 0 and result.num_detections == 0 and result.detections == []
    assert result.per_class_ap[:2] == [0, 0] and math.isnan(result.per_class_ap[2])
    with pytest.raises(ValueError, match=r"not 1\.\.1"):
        run(SCENE, passthrough, num_classes=1)


def test_crowd_regions_are_ignored():
    crowd = [target(1, [[10, 10, 40, 40], [50, 50, 95, 95]], [1, 1], iscrowd=[0, 1])]

    def without_crowd(t: dict) -> dict:
        return {"boxes": t["boxes"][:1], "scores": torch.ones(1), "labels": t["labels"][:1]}

    assert run(crowd, without_crowd).map == pytest.approx(100)  # a missed crowd region costs nothing

    def crowd_first(t: dict) -> dict:  # a detection on the crowd region outranks the true one
        return {"boxes": t["boxes"].flip(0), "scores": torch.tensor([1.0, 0.5]), "labels": t["labels"]}

    assert run(crowd, crowd_first).map == pytest.approx(100)  # ...and a detection on it is no false positive
    crowd[0]["iscrowd"] = torch.zeros(2, dtype=torch.int64)  # the same object counted: recall 1/2
    assert run(crowd, without_crowd).map == pytest.approx(100 * 51 / 101)


def test_false_positives_on_images_without_objects_count():
    images = [target(1, [[10, 10, 50, 50]], [1]), target(2, [], [])]

    def detect(score_on_empty: float) -> Callable[[dict], dict]:
        def fn(t: dict) -> dict:
            if len(t["labels"]):
                return passthrough(t) | {"scores": torch.tensor([0.8])}
            return {"boxes": torch.tensor([[0.0, 0, 30, 30]]), "scores": torch.tensor([score_on_empty]),
                    "labels": torch.tensor([1])}  # fmt: skip

        return fn

    assert run(images, detect(0.5)).map == pytest.approx(100)  # ranked below the hit: precision 1 at recall 1
    assert run(images, detect(0.9)).map == pytest.approx(50)  # ranked above it: precision 1/2 at every recall


def test_boxes_are_scaled_to_the_original_size_and_clipped():
    t = target(7, [[10, 20, 50, 60]], [1], orig=(200, 400))  # x by 4, y by 2

    def detect(t: dict) -> dict:
        boxes = torch.cat([t["boxes"], torch.tensor([[-10.0, 90, 120, 110]])])  # the second sticks out
        return {"boxes": boxes, "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([1, 1])}

    result = run([t], detect)
    assert [d["image_id"] for d in result.detections] == [7, 7]
    assert result.detections[0]["bbox"] == pytest.approx([40, 40, 160, 80])
    assert result.detections[1]["bbox"] == pytest.approx([0, 180, 400, 20])
    assert result.map == pytest.approx(100)  # the ground truth was scaled alike: the exact box still matches
    # size ranges come from the target's area (original pixels): 160 x 80 = 12800 > 96^2 is large
    assert result.map_large == pytest.approx(100) and math.isnan(result.map_small) and math.isnan(result.map_medium)
    small = target(8, [[0, 0, 10, 10]], [1], orig=(S, S))  # 100 px^2 < 32^2
    result = run([t, small], passthrough)
    assert result.map_small == pytest.approx(100) and result.map_large == pytest.approx(100)


class FakeDetector(nn.Module):
    """Our models' protocol: ``forward_raw`` -> raw outputs, ``loss``, ``postprocess``; ``forward`` is not used."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.sizes: list[list[tuple[int, int]]] = []
        self.targets: list[list[dict]] = []

    def forward(self, images: Tensor) -> list[dict]:
        raise AssertionError("forward_raw + postprocess should be used")

    def forward_raw(self, images: Tensor) -> dict[str, Tensor]:
        assert not self.training
        return {"feat": self.proj(images.mean(dim=(2, 3))), "n": torch.tensor(len(images))}

    def loss(self, raw: dict[str, Tensor], targets: list[dict], image_size: tuple[int, int]) -> dict[str, Tensor]:
        self.targets.append(targets)
        boxes = torch.tensor([float(len(t["labels"])) for t in targets])
        return {"loss_box": boxes.mean(), "loss_cls": torch.tensor(0.5), "num_pos": torch.tensor(100.0)}

    def postprocess(self, raw: dict[str, Tensor], image_sizes: list[tuple[int, int]]) -> list[dict]:
        assert raw["feat"].dtype == torch.float32  # cast back from the autocast dtype before decoding
        self.sizes.append(image_sizes)
        return [passthrough(t) for t in self.targets[-1]]


def test_loss_and_detections_from_one_raw_forward():
    # batches of 2 and 1 images with 1, 1 and 4 boxes: per image (1 + 1 + 4) / 3, not per batch (1 + 4) / 2
    targets = [
        target(1, [[0, 0, 10, 10]], [1]),
        target(2, [[5, 5, 20, 20]], [2]),
        target(3, [[1, 1, 9, 9]] * 4, [1] * 4),
    ]
    model = FakeDetector().train()
    result = evaluate_detection(model, batches_of(targets), CPU, amp="bf16")
    assert result.loss == pytest.approx(2 + 0.5)  # keys without the "loss" prefix are not summed
    assert model.training  # mode restored
    assert model.sizes == [[(S, S)] * 2, [(S, S)]]
    assert result.map == pytest.approx(100) and result.num_images == 3


def mixed(t: dict) -> dict:
    """Class 1 misplaced to IoU 2/3 (AP 40), class 2 exact (AP 100)."""
    out = shifted(0.2)(t)
    exact = t["labels"] == 2
    out["boxes"][exact] = t["boxes"][exact]
    return out


ONE_CLASS = [target(i, [[10, 10, 50, 50]], [1]) for i in range(3)]


def _ddp_worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork: no parallel regions here
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shard = (SCENE + SCENE[:1])[rank::2]  # padded to equal shards as the sampler does: image 11 twice
        batches, one = batches_of(shard), batches_of(ONE_CLASS[rank::2])
        results = {  # 3 classes over 2 ranks: 1 and 3 on rank 0, 2 on rank 1; a single class: rank 1 has none
            "mixed": evaluate_detection(Replay(batches, mixed), batches, CPU, num_classes=3).to_dict(),
            "one": evaluate_detection(Replay(one, shifted(0.2)), one, CPU).to_dict(),
            "raw": evaluate_detection(FakeDetector(), batches_of(shard), CPU).to_dict(),
        }
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_ddp_two_processes_gather_the_whole_set(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("fork")  # forked gloo ranks: no second torch import, the test takes a second
    workers = [context.Process(target=_ddp_worker, args=(rank, port, tmp_path)) for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    for w in workers:
        if w.is_alive():
            w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    texts = [(tmp_path / f"rank{r}.json").read_text() for r in (0, 1)]
    assert texts[0] == texts[1]  # every rank reports the same numbers
    ranks = [json.loads(text) for text in texts]
    single = run(SCENE, mixed, num_classes=3).to_dict()
    assert single["per_class_ap"] == pytest.approx([40, 100, math.nan], nan_ok=True)
    for key in ("map", "map50", "map75", "per_class_ap", "num_images", "num_detections"):
        assert ranks[0]["mixed"][key] == pytest.approx(single[key], nan_ok=True), key
    assert ranks[0]["mixed"]["num_images"] == 5  # the padding duplicate counts once
    assert ranks[0]["one"]["map"] == pytest.approx(40) and ranks[0]["one"]["num_images"] == 3
    assert ranks[0]["raw"]["map"] == pytest.approx(100)
    # loss: mean over the 6 images the ranks passed (boxes 2, 0, 1 | 1, 3, 2) of boxes + 0.5
    assert ranks[0]["raw"]["loss"] == pytest.approx(9 / 6 + 0.5)


def _png_ok(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).std() > 0.01
    return struct.unpack(">II", data[16:24])


def test_draw_detections_colours_boxes_by_class_and_drops_low_scores():
    image = torch.zeros(3, 64, 64)
    boxes = torch.tensor([[10.0, 10, 40, 40], [44, 46, 62, 62]])
    labels, scores = torch.tensor([1, 2]), torch.tensor([0.9, 0.1])
    classes = ["background", "Sneaker", "Bag"]
    out = draw_detections(image, boxes, labels, scores, classes)
    colors = label_colors(3)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64) and image.abs().sum() == 0  # input untouched
    for y, x in ((25, 10), (40, 25), (25, 40), (39, 25)):  # left, bottom, right edges; width 2 goes inwards
        assert out[:, y, x].tolist() == colors[1].tolist()
    assert out[:, 54, 44].tolist() == [0, 0, 0] and out[:, 62, 55].tolist() == [0, 0, 0]  # 0.1 < 0.3: not drawn
    caption = out[:, 12:26, 12:39]
    assert (caption > 200).all(0).any()  # white caption text on the class colour
    out = draw_detections((image * 255).byte(), boxes, labels, scores, classes, score_thresh=0.05)
    assert out[:, 54, 44].tolist() == colors[2].tolist() and out[:, 25, 10].tolist() == colors[1].tolist()
    assert torch.equal(draw_detections(image, boxes[:0], labels[:0]), torch.zeros(3, 64, 64, dtype=torch.uint8))


def test_plot_detections_writes_a_png(tmp_path: Path):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = [target(i, [[8, 8, 40, 48]], [1 + i % 2]) for i in range(3)]
    predictions = [shifted(0.1, score=0.8)(t) for t in targets]
    width, height = _png_ok(plot_detections(images, predictions, targets, ["bg", "a", "b"], tmp_path / "d.png", "val"))
    assert width > 400 and height > 150
    _png_ok(plot_detections(list(images[:1]), predictions[:1], None, None, tmp_path / "sub" / "one.png"))
    with pytest.raises(ValueError, match="3 images but 2 predictions"):
        plot_detections(images, predictions[:2], targets, None, tmp_path / "bad.png")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_matches_pycocotools_own_results_loading():
    """Random boxes and scores: the in-memory detections give the numbers of ``COCO.loadRes`` on the same results."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(3)
    targets, predictions = [], {}
    for i in range(12):
        xy, wh = torch.rand(4, 2, generator=g) * 60, torch.rand(4, 2, generator=g) * 30 + 5
        targets.append(target(100 + i, torch.cat([xy, xy + wh], 1).tolist(), [1, 2, 3, 1], orig=(150, 250)))
        jitter = torch.randn(4, 4, generator=g) * 4
        predictions[100 + i] = {"boxes": targets[-1]["boxes"] + jitter, "scores": torch.rand(4, generator=g),
                                "labels": torch.tensor([1, 2, 3, 3])}  # fmt: skip
    result = run(targets, lambda t: predictions[t["image_id"]])
    scale = torch.tensor([2.5, 1.5, 2.5, 1.5])
    gt = {"images": [{"id": t["image_id"], "height": 150, "width": 250} for t in targets],
          "categories": [{"id": k} for k in (1, 2, 3)], "annotations": []}  # fmt: skip
    for t in targets:
        rows = zip((t["boxes"] * scale).tolist(), t["labels"].tolist(), t["area"].tolist(), strict=True)
        for box, label, area in rows:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": t["image_id"], "iscrowd": 0,
                                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                      "category_id": label, "area": area})  # fmt: skip
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    keys = ("image_id", "category_id", "bbox", "score")
    coco = COCOeval(coco_gt, coco_gt.loadRes([{k: d[k] for k in keys} for d in result.detections]), "bbox")
    coco.evaluate()
    coco.accumulate()
    coco.summarize()
    assert 5 < result.map < 95 and result.stats == pytest.approx(coco.stats.tolist())
