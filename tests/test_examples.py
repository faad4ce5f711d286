"""The weights committed in examples/weights load and classify real Fashion-MNIST test images as reported."""

from pathlib import Path

import pytest
import torch

import mobilevit
from conftest import needs_fashion_mnist
from mobilevit.data.datasets import build_dataset, collate
from mobilevit.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "examples" / "weights"
# each committed file, its model and the least top-1 it must give on the first 1,000 test images (64 px with
# mirroring), a few points under its whole-test-set number in the README (stage 1: 94.30%, here 95.7%; stage 2: 94.61%,
# here 95.2%; stage 3: 94.76%, here 95.4%; stage 5, stored as float16: 94.95%, here 95.8%; stage 6, stored as float16:
# 94.99%, here 96.1%; stage 8, the best, stored as float16: 95.01%, here 95.6%; S stage 1, stored as float16: 92.24%,
# here 94.1%)
MINIMUM = {
    "fashion_mnist_xs_22ep.safetensors": ("mobilevit_xs", 91.0),
    "fashion_mnist_xs_50ep.safetensors": ("mobilevit_xs", 92.0),
    "fashion_mnist_xs_65ep.safetensors": ("mobilevit_xs", 92.0),
    "fashion_mnist_xs_80ep.safetensors": ("mobilevit_xs", 92.0),
    "fashion_mnist_xs_94ep.safetensors": ("mobilevit_xs", 92.0),
    "fashion_mnist_best.safetensors": ("mobilevit_xs", 92.0),
    "fashion_mnist_s_8ep.safetensors": ("mobilevit_s", 88.0),
}


def test_every_committed_weights_file_is_tested():
    assert sorted(path.name for path in WEIGHTS.glob("*.safetensors")) == sorted(MINIMUM)


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_fashion_mnist_weights_describe_themselves(name):
    weights = str(WEIGHTS / name)
    arch = MINIMUM[name][0]
    assert mobilevit.load_checkpoint(weights).arch == arch
    model = mobilevit.create_model(arch, weights=weights)
    assert mobilevit.model_categories(model)[:2] == ["T-shirt/top", "Trouser"] and model.num_classes == 10


@needs_fashion_mnist
@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_fashion_mnist_weights_reach_their_accuracy(name):
    """The reported test top-1 (README, 64 px with mirroring) holds on the first 1,000 test images within a margin,
    far above what the same weights give with the input's contrast inverted (a preprocessing mistake)."""
    weights = str(WEIGHTS / name)
    model = mobilevit.create_model(mobilevit.load_checkpoint(weights).arch, weights=weights).eval()
    transform = mobilevit.model_transform(model)
    assert transform.crop_size == 64
    dataset = build_dataset("fashion-mnist", "test", transform).subset(range(1000))
    batches = [collate([dataset[i] for i in range(start, start + 250)]) for start in range(0, 1000, 250)]
    result = evaluate(model, batches, torch.device("cpu"), hflip=True)
    assert result.top1 >= MINIMUM[name][1]
    inverted = evaluate(model, [(1.0 - images, labels, n) for images, labels, n in batches], torch.device("cpu"))
    assert inverted.top1 < 60.0
