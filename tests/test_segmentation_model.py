"""DeepLabv3-MobileViT: shapes at any size, output strides, patch sizes, the upsampling of the official forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize
from mobilevit import create_model
from mobilevit.models.deeplabv3 import MobileViTDeepLabV3


@pytest.fixture(scope="module")
def model() -> MobileViTDeepLabV3:
    torch.manual_seed(0)
    return randomize(create_model("mobilevit_xxs_deeplabv3")).eval()


@pytest.mark.parametrize("size", [(512, 512), (375, 500), (97, 131)])
def test_logits_at_the_output_stride_and_at_the_input_size(model: MobileViTDeepLabV3, size: tuple[int, int]):
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        coarse, full = model.forward_logits(x), model(x)
    assert coarse.shape == (2, 21, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert full.shape == (2, 21, *size)
    expected = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(full, expected, atol=1e-5)
    # an align_corners mistake would not pass for it
    corners = F.interpolate(coarse, size=size, mode="bilinear", align_corners=True)
    assert (full - corners).abs().max() > 1e-3


def test_output_stride_8_and_16_backbones():
    for stride in (16, 8):
        m = create_model("mobilevit_xxs_deeplabv3", output_stride=stride, num_classes=5).eval()
        assert [f["reduction"] for f in m.backbone.feature_info] == [2, 4, 8, min(16, stride), stride]
        dw = [stage[0].dw.conv for stage in m.backbone.stages]
        assert [c.stride[0] for c in dw] == [1, 2, 2, 2 if stride == 16 else 1, 1]
        assert [c.dilation[0] for c in dw] == [1, 1, 1, 1, 1 if stride == 16 else 2]
        with torch.no_grad():
            assert m.forward_logits(torch.rand(1, 3, 64, 96)).shape == (1, 5, 64 // stride, 96 // stride)
    # no final 1x1 expansion, no classifier in the backbone; ASPP reads layer_5
    assert isinstance(m.backbone.final_conv, torch.nn.Identity) and m.backbone.num_classes == 0
    assert m.aspp.branches[0].conv.in_channels == 80 and m.aspp.project.conv.in_channels == 5 * 256


def test_patch_sizes_and_new_classes():
    m = create_model("mobilevit_xxs_deeplabv3", patch_sizes=(8, 4, 2), num_classes=11).eval()
    assert m.config.patch_sizes == (8, 4, 2) and m.num_classes == 11
    with torch.no_grad():
        assert m(torch.rand(1, 3, 100, 150)).shape == (1, 11, 100, 150)
    m.reset_classifier(3)
    assert m.num_classes == 3 and m.config.num_classes == 3


def test_dropout_layers_and_parameter_groups(model: MobileViTDeepLabV3):
    assert model.aspp.drop.p == 0.1 and isinstance(model.drop, torch.nn.Dropout2d) and model.drop.p == 0.1
    head = {id(p) for p in model.head_parameters()}
    assert head == {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert model.classifier.bias is not None and model.aspp.project.conv.bias is None
