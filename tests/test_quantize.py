"""int8 post-training quantization with ONNX Runtime: what is quantized, what stays fp32, and how close it stays."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import mobilevit as mv
from conftest import randomize, write_mnist
from mobilevit.data.datasets import FashionMNIST

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mobilevit.deployment.export import export_model, run_onnx  # noqa: E402
from mobilevit.deployment.quantize import calibration_images, quantize_onnx  # noqa: E402


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    model = randomize(mv.create_model("mobilevit_xxs", num_classes=10))
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    export_model(mv.deploy(model, channels_last=False), path, "onnx", image_size=(64, 64), dynamic=True)
    return model, path


def test_int8_quantizes_convs_and_linears_but_not_attention_or_norms(fp32_onnx, tmp_path):
    _model, fp32 = fp32_onnx
    calib = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", calib)
    graph = onnx.load(str(int8)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 50 and ops["DequantizeLinear"] > 50
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 29 + 3 * 9  # every convolution and the transformers' weight matrices
    # LayerNorm and softmax read fp32 directly (no DequantizeLinear feeding them)
    producers = {out: n.op_type for n in graph.node for out in n.output}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert producers.get(node.input[0]) != "DequantizeLinear", node.name
    assert not (tmp_path / "int8.prep.onnx").exists()  # no temporary left behind

    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref, q = run_onnx(fp32, x), run_onnx(int8, x)
    assert q.shape == ref.shape == (4, 10)
    cos = torch.nn.functional.cosine_similarity((q - q.mean()).flatten(), (ref - ref.mean()).flatten(), dim=0)
    assert cos > 0.95, f"int8 logits too far from fp32 (centred cosine {cos:.3f})"


def test_calibration_images_come_from_the_train_split(tmp_path):
    write_mnist(tmp_path / "fm", n_train=12, n_test=5)
    transform = mv.EvalTransform(32, 32)
    images = calibration_images(tmp_path / "fm", transform, 48, count=8)
    assert images.shape == (8, 3, 48, 48) and images.min() >= 0 and images.max() <= 1
    train = FashionMNIST(tmp_path / "fm", "train", lambda image, *_: transform(image, 48))
    test = FashionMNIST(tmp_path / "fm", "test", lambda image, *_: transform(image, 48))
    train_images = torch.stack([train[i][0] for i in range(len(train))])
    test_images = torch.stack([test[i][0] for i in range(len(test))])
    assert (torch.cdist(images.flatten(1), train_images.flatten(1)).min(dim=1).values == 0).all()
    assert (torch.cdist(images.flatten(1), test_images.flatten(1)).min(dim=1).values > 1).all()


def test_calibration_never_uses_the_held_out_images(tmp_path):
    """`mobilevit eval --split holdout` measures the training images `mobilevit train val_fraction=F seed=S` held
    out: calibration must leave exactly those out."""
    from mobilevit.data.datasets import split_holdout

    write_mnist(tmp_path / "fm", n_train=40, n_test=5)
    transform = mv.EvalTransform(28, 28)
    train = FashionMNIST(tmp_path / "fm", "train", lambda image, *_: transform(image, 28))
    all_train = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    for fraction, seed in ((0.25, 0), (0.5, 3)):
        images = calibration_images(
            tmp_path / "fm", transform, 28, count=100, val_fraction=fraction, holdout_seed=seed
        ).flatten(1)
        kept, held = split_holdout(40, fraction, seed)
        assert len(images) == len(kept)  # every other training image, none twice
        source = torch.cdist(images, all_train).argmin(1).tolist()
        assert sorted(source) == kept and not set(source) & set(held)


def test_bad_calibration_is_a_clear_error(fp32_onnx, tmp_path):
    _, fp32 = fp32_onnx
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        quantize_onnx(fp32, tmp_path / "int8.onnx", torch.rand(3, 64, 64))


def test_int8_file_keeps_the_metadata_and_says_int8(fp32_onnx, tmp_path):
    from mobilevit.deployment.runtime import load_exported

    _, fp32 = fp32_onnx
    int8 = quantize_onnx(
        fp32, tmp_path / "int8.onnx", torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    )
    before, after = load_exported(fp32).metadata, load_exported(int8).metadata
    assert after.pop("precision") == "int8" and "precision" not in before
    assert after.items() >= before.items() and after["task"] == "classification"  # onnxruntime adds its own keys
