"""Advanced augmentation (RandAugment, TrivialAugment, MixUp, CutMix, repeated augmentation) and distillation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T

from conftest import write_mnist
from mobilevit import create_model, read_checkpoint, save_checkpoint
from mobilevit.data.datasets import FASHION_MNIST_CLASSES, TrainTransform
from mobilevit.data.sampler import mix_seed
from mobilevit.data.transforms import BatchMix
from mobilevit.training.recipe import TrainConfig, list_recipes, load_recipe, parse_overrides
from mobilevit.training.tasks import ClassificationTask, classification_loss, dominant_label, load_teacher
from mobilevit.training.trainer import Trainer, read_train_state
from test_train import RECIPE, tiny

ADVANCED = {
    "auto_augment": "randaugment", "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "repeated_aug": 2,
    "distill_alpha": 0.5, "distill_temperature": 2.0,
}  # fmt: skip


@pytest.fixture
def mnist(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "mnist", n_train=48, n_test=20)
    return tmp_path / "mnist"


def save_classifier(path: Path, classes: list[str] | None = FASHION_MNIST_CLASSES, seed: int = 1, **meta) -> Path:
    """A MobileViT-XXS with random weights for ``classes`` (10 when None), in our format."""
    torch.manual_seed(seed)
    model = create_model("mobilevit_xxs", num_classes=len(classes or range(10)))
    extra = ({"categories": classes} if classes else {}) | meta
    return save_checkpoint(model.state_dict(), model.config, path, arch="mobilevit_xxs", meta=extra)


# ------------------------------------------------------------------------------------------- options


def test_options_are_off_by_default_and_in_every_bundled_recipe():
    cfg = TrainConfig()
    assert (cfg.auto_augment, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.repeated_aug, cfg.teacher) == (
        "none", 0.0, 0.0, 1, None
    )  # fmt: skip
    assert not cfg.mixing and cfg.classification_only() == []
    for name in list_recipes():
        cfg = load_recipe(name)
        assert cfg.classification_only() == [] and not cfg.mixing, name


def test_option_values_are_checked():
    cfg = load_recipe(RECIPE, parse_overrides(["auto_augment=trivialaugment", "mixup_alpha=0.2", "cutmix_alpha=1"]))
    assert cfg.mixing and cfg.classification_only() == ["auto_augment", "mixup_alpha", "cutmix_alpha"]
    assert load_recipe(RECIPE, parse_overrides(["auto_augment=null"])).auto_augment == "none"
    bad = [
        ({"auto_augment": "autoaugment"}, "auto_augment must be one of"),
        ({"randaugment_magnitude": 31}, "0..30"),
        ({"mixup_alpha": -1}, "mixup_alpha must be >= 0"),
        ({"mix_prob": 1.5}, r"mix_prob must be in \[0, 1\]"),
        ({"mix_switch_prob": -0.1}, "mix_switch_prob"),
        ({"distill_alpha": 2}, "distill_alpha"),
        ({"distill_temperature": 0}, "distill_temperature must be > 0"),
        ({"repeated_aug": 0}, "repeated_aug must be >= 1"),
    ]
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**values)


@pytest.mark.parametrize(
    "recipe, option",
    [
        ("mobilevit_xxs_deeplabv3_scenes", {"mixup_alpha": 0.2}),
        ("mobilevit_xxs_ssdlite_scenes", {"teacher": "t"}),
        ("mobilevit_xxs_deeplabv3_scenes", {"data_on_device": True}),
    ],
)
def test_dense_tasks_refuse_the_classification_only_options(tmp_path: Path, recipe: str, option: dict):
    cfg = load_recipe(recipe, {"data": str(tmp_path / "none"), "output": str(tmp_path / "run"), **option})
    with pytest.raises(ValueError, match=f"{next(iter(option))}: classification only, but .* model"):
        Trainer(cfg)


# -------------------------------------------------------------------------------------- auto augment


def test_auto_augment_is_torchvisions_applied_to_the_crop_and_seeded_per_image():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)  # grayscale, as Fashion-MNIST
    crop = dict(size=32, scale=(0.5, 1.0))
    plain = TrainTransform(**crop)
    augment = TrainTransform(**crop, auto_augment="randaugment", randaugment_ops=2, randaugment_magnitude=15)
    state = torch.get_rng_state()
    for seed in range(5):
        out = augment(image, None, torch.Generator().manual_seed(seed))
        assert torch.equal(out, augment(image, None, torch.Generator().manual_seed(seed)))  # seeded per image
        # what it does: the plain crop (same crop, as the crop's draws come first), then torchvision's RandAugment
        # seeded by the next draw of the image's generator, on the image's one channel, broadcast back to RGB
        g = torch.Generator().manual_seed(seed)
        resized = plain(image, None, g)
        aug_seed = int(torch.randint(2**62, (), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            ref = T.RandAugment(2, 15)(resized[:1])
        assert torch.equal(out, ref.expand(3, -1, -1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (dropout's) is untouched
    outputs = {augment(image, 24, torch.Generator().manual_seed(s)).sum().item() for s in range(8)}
    assert len(outputs) == 8
    # no operations: exactly the plain transform (nothing else changes)
    identity = TrainTransform(**crop, auto_augment="randaugment", randaugment_ops=0)
    assert torch.equal(
        identity(image, None, torch.Generator().manual_seed(3)), plain(image, None, torch.Generator().manual_seed(3))
    )
    trivial = TrainTransform(**crop, auto_augment="trivialaugment")
    rgb = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    changed = [
        not torch.equal(trivial(rgb, None, torch.Generator().manual_seed(s)), plain(rgb, None, torch.Generator().manual_seed(s)))
        for s in range(10)
    ]  # fmt: skip
    assert sum(changed) >= 5
    out = trivial(rgb, 16, torch.Generator())
    assert out.shape == (3, 16, 16) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="auto_augment"):
        TrainTransform(auto_augment="autoaugment")


# ------------------------------------------------------------------------------------- MixUp, CutMix


def batch(n: int = 8, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.randperm(10, generator=g)[:n]  # distinct labels


def sources(images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """The (input image, weight) pairs a mixed target names (labels are distinct: one image per label)."""
    return [(images[(labels == c).nonzero()[0, 0]], target[c].item()) for c in target.nonzero()[:, 0]]


def test_mixup_mixes_images_as_their_targets_say():
    images, labels = batch()
    mix = BatchMix(10, mixup_alpha=0.4)
    state = torch.get_rng_state()
    out, targets = mix(images, labels, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
    o2, t2 = mix(images, labels, seed=3)
    assert torch.equal(out, o2) and torch.equal(targets, t2)  # reproducible from the seed
    assert not torch.equal(mix(images, labels, seed=4)[1], targets)
    for i in range(8):
        parts = sources(images, labels, targets[i])
        assert len(parts) == 2 and min(w for _, w in parts) > 0
        assert torch.allclose(out[i], sum(w * x for x, w in parts), atol=1e-6)  # lam * x_a + (1 - lam) * x_b
    pairs = {tuple(sorted(targets[i].nonzero()[:, 0].tolist())) for i in range(8)}
    assert len(pairs) == 8  # random pairs (each image in two of them)


def test_cutmix_pastes_a_box_of_the_area_the_target_says():
    images, labels = batch()
    out, targets = BatchMix(10, cutmix_alpha=1.0)(images, labels, seed=5)
    for i in range(8):
        parts = sources(images, labels, targets[i])
        provenance = torch.stack([(out[i] == x).all(0) for x, _ in parts])
        assert provenance.any(0).all()  # every pixel comes from one of the two images
        for from_x, (_, weight) in zip(provenance, parts, strict=True):
            assert from_x.float().mean().item() == pytest.approx(weight)


def test_mix_probability_and_switch():
    images, labels = batch()
    unmixed = BatchMix(10, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)
    out, targets = unmixed(images, labels, seed=0)
    assert out is images and targets is labels  # integer labels: plain cross-entropy

    def is_cutmix(out: torch.Tensor) -> bool:
        return bool(torch.isin(out, images).all())  # CutMix copies pixels, MixUp blends them

    both = dict(mixup_alpha=1.0, cutmix_alpha=1.0)
    assert all(is_cutmix(BatchMix(10, **both, switch_prob=1.0)(images, labels, s)[0]) for s in range(5))
    assert not any(is_cutmix(BatchMix(10, **both, switch_prob=0.0)(images, labels, s)[0]) for s in range(5))
    half = BatchMix(10, **both, prob=0.5)
    mixed = [half(images, labels, s)[1].ndim == 2 for s in range(200)]
    assert 70 < sum(mixed) < 130
    kinds = [is_cutmix(BatchMix(10, **both)(images, labels, s)[0]) for s in range(200)]
    assert 70 < sum(kinds) < 130
    with pytest.raises(ValueError):
        BatchMix(10)


# ---------------------------------------------------------------------------------------- loss, top-1


def test_soft_targets_with_label_smoothing_equal_mixing_smoothed_one_hots():
    g = torch.Generator().manual_seed(0)
    logits, a, b, lam, eps, k = torch.randn(6, 5, generator=g), torch.arange(6) % 5, torch.arange(1, 7) % 5, 0.3, 0.1, 5

    def smooth(y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, k).float() * (1 - eps) + eps / k

    mixed = lam * F.one_hot(a, k).float() + (1 - lam) * F.one_hot(b, k).float()
    expected = -(lam * smooth(a) + (1 - lam) * smooth(b)).mul(logits.log_softmax(1)).sum(1).mean()
    assert classification_loss(logits, mixed, eps).item() == pytest.approx(expected.item(), rel=1e-6)
    one_hot = F.one_hot(a, k).float()  # unmixed: the same as integer labels
    assert classification_loss(logits, one_hot, eps).item() == pytest.approx(classification_loss(logits, a, eps).item())
    # training top-1 under mixing: agreement with the dominant label (the larger weight)
    assert dominant_label(mixed).tolist() == b.tolist() and dominant_label(a) is a
    cfg = TrainConfig(label_smoothing=eps)
    pred = torch.nn.functional.one_hot(b, k).float() * 10
    _, hits, total = ClassificationTask().loss(pred, mixed, cfg)
    assert (hits.item(), total.item()) == (6, 6)
    _, hits, _ = ClassificationTask().loss(pred, 0.7 * F.one_hot(a, k).float() + 0.3 * F.one_hot(b, k).float(), cfg)
    assert hits.item() == 0


def test_distillation_loss():
    g = torch.Generator().manual_seed(1)
    student, teacher, labels = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g), torch.arange(4)
    temp, alpha, eps = 2.0, 0.3, 0.1
    ce = F.cross_entropy(student, labels, label_smoothing=eps)
    p_t = (teacher / temp).softmax(1)
    kl = (p_t * (p_t.log() - (student / temp).log_softmax(1))).sum(1).mean()
    got = classification_loss(student, labels, eps, teacher, alpha, temp)
    assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * temp**2 * kl).item(), rel=1e-5)
    assert classification_loss(student, labels, eps, teacher, 0.0, temp).item() == pytest.approx(ce.item())
    assert classification_loss(student, labels, eps, student, 1.0, temp).item() == pytest.approx(0.0, abs=1e-6)
    s = student.clone().requires_grad_()
    classification_loss(s, labels, eps, teacher, 1.0, temp).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- teacher


def test_teacher_loading_and_its_checks(tmp_path: Path):
    path = save_classifier(tmp_path / "t.safetensors")
    teacher = load_teacher(str(path), FASHION_MNIST_CLASSES)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert load_teacher(str(save_classifier(tmp_path / "anon.safetensors", None)), FASHION_MNIST_CLASSES)
    with pytest.raises(ValueError, match="predicts 10 classes, the student 3"):
        load_teacher(str(path), ["a", "b", "c"])
    with pytest.raises(ValueError, match="other classes"):
        load_teacher(str(path), sorted(FASHION_MNIST_CLASSES))
    normalised = save_classifier(tmp_path / "n.safetensors", preprocess={"mean": [0.485, 0.456, 0.406]})
    with pytest.raises(ValueError, match=r"mean=\[0.485, 0.456, 0.406\].*RGB in \[0, 1\]"):
        load_teacher(str(normalised), FASHION_MNIST_CLASSES)
    with pytest.raises(ValueError, match="an architecture, not trained weights"):
        load_teacher("mobilevit_xs", FASHION_MNIST_CLASSES)
    seg = create_model("mobilevit_xxs_deeplabv3", num_classes=10)
    save_checkpoint(seg.state_dict(), seg.config, tmp_path / "seg.safetensors", arch="mobilevit_xxs_deeplabv3")
    with pytest.raises(ValueError, match="not a standard classifier"):
        load_teacher(str(tmp_path / "seg.safetensors"), FASHION_MNIST_CLASSES)


def test_trainer_step_mixes_then_distils_at_the_students_input(mnist: Path, tmp_path: Path):
    teacher_path = save_classifier(tmp_path / "t.safetensors")
    no_dropout = {"dropout": 0.0, "classifier_dropout": 0.0}  # a deterministic student forward
    cfg = load_recipe(RECIPE, tiny(mnist, tmp_path / "run", **ADVANCED, teacher=str(teacher_path),
                                   model_overrides=no_dropout) | {"auto_augment": "trivialaugment"})  # fmt: skip
    trainer = Trainer(cfg)
    teacher = trainer.teacher
    assert teacher is not None and teacher not in list(trainer.model.modules())
    images, labels, _ = next(iter(trainer.loader))
    mixed, targets = trainer.mix(images, labels, mix_seed(cfg.seed, 0, 0))
    assert targets.ndim == 2
    with torch.no_grad():
        expected = classification_loss(
            trainer.model(mixed), targets, cfg.label_smoothing, teacher(mixed), 0.5, 2.0
        ).item()
    loss, _, counted = trainer._forward_backward(images, labels, True, 0.001)
    assert loss == pytest.approx(expected, rel=1e-5) and counted == len(labels)
    assert all(p.grad is None for p in teacher.parameters())
    # a short run: the teacher stays frozen in eval mode and is never saved with the student
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.fit()
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    state = read_train_state(tmp_path / "run" / "last.pt")
    assert state["model"].keys() == trainer.model.state_dict().keys() and state["teacher_digest"]
    assert read_checkpoint(tmp_path / "run" / "best.safetensors").state_dict.keys() == state["model"].keys()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and all(math.isfinite(float(r.split(",")[3])) for r in rows[1:])
    # --resume refuses other weights behind the same teacher path (the run would not continue exactly)
    save_classifier(teacher_path, seed=2)
    with pytest.raises(ValueError, match="not those the run started with"):
        Trainer(cfg, resume=True)
