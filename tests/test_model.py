"""Architecture: exact sizes, any input size, feature extraction, classifier replacement."""

from __future__ import annotations

import pytest
import torch

import mobilevit as mv
from mobilevit.models.flops import count_params
from mobilevit.models.layers import fold_patches, unfold_patches

PARAMS = {"mobilevit_xxs": 1_272_024, "mobilevit_xs": 2_317_848, "mobilevit_s": 5_578_632}
GMACS = {"mobilevit_xxs": 0.418, "mobilevit_xs": 1.052, "mobilevit_s": 2.033}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_is_official(name):
    assert count_params(mv.create_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", list(GMACS))
def test_macs_match_paper_within_3_percent(name):
    macs = mv.count_macs(mv.create_model(name), (256, 256)) / 1e9
    assert abs(macs - GMACS[name]) / GMACS[name] < 0.03, macs


def test_macs_scale_with_input_size():
    model = mv.create_model("mobilevit_xxs")
    assert mv.count_macs(model, (512, 512)) > 3.5 * mv.count_macs(model, (256, 256))


@pytest.mark.parametrize("size", [(256, 256), (224, 224), (250, 250), (192, 320), (97, 131), (32, 32)])
def test_any_input_size(size):
    model = mv.create_model("mobilevit_xxs", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_unfold_fold_roundtrip_and_token_layout():
    x = torch.randn(2, 8, 6, 10)
    tokens, size = unfold_patches(x, 2)
    assert tokens.shape == (2 * 4, 15, 8)
    # sequence p holds pixel (p // 2, p % 2) of every 2x2 patch
    assert torch.equal(tokens[1, 0], x[0, :, 0, 1]) and torch.equal(tokens[4 + 3, 14], x[1, :, 5, 9])
    assert torch.equal(fold_patches(tokens, 2, size), x)


def test_unfold_resizes_non_multiple_maps_bilinearly():
    x = torch.randn(1, 4, 7, 9)
    tokens, size = unfold_patches(x, 2)
    assert tokens.shape == (4, 4 * 5, 4) and size == (7, 9)
    ref = torch.nn.functional.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False)
    assert torch.equal(fold_patches(tokens, 2, (8, 10)), ref)
    assert fold_patches(tokens, 2, size).shape == x.shape


@pytest.mark.parametrize("patch_sizes", [(8, 4, 2), (2, 2, 2), 4])
def test_patch_size_override(patch_sizes):
    model = mv.create_model("mobilevit_xs", patch_sizes=patch_sizes).eval()
    expected = (patch_sizes,) * 3 if isinstance(patch_sizes, int) else patch_sizes
    assert tuple(b.patch_size for b in (model.stages[i][1] for i in (2, 3, 4))) == expected
    assert count_params(model) == PARAMS["mobilevit_xs"]  # patch size changes compute, not weights
    with torch.no_grad():
        assert model(torch.rand(1, 3, 256, 256)).shape == (1, 1000)
    small, large = (mv.count_macs(mv.create_model("mobilevit_xs", patch_sizes=p)) for p in ((2, 2, 2), (8, 4, 2)))
    assert large < small  # bigger patches: fewer tokens per sequence, cheaper attention


def test_intermediates_strides_and_channels():
    model = mv.create_model("mobilevit_s").eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.rand(1, 3, 256, 192), out_indices=(0, 2, 4))
    assert [f.shape[1] for f in feats] == [32, 96, 160]
    assert [f.shape[-2:] for f in feats] == [(128, 96), (32, 24), (8, 6)]
    assert [fi["reduction"] for fi in model.feature_info] == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="out_indices"):
        model.forward_intermediates(torch.rand(1, 3, 64, 64), out_indices=(5,))


def test_forward_features_and_pre_logits():
    model = mv.create_model("mobilevit_xxs").eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 320, 8, 8)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 320)
        assert torch.allclose(model.forward_head(feats), model(x))


def test_reset_classifier_keeps_backbone():
    model = mv.create_model("mobilevit_xxs").eval()
    before = model.final_conv.conv.weight.clone()
    model.reset_classifier(10)
    assert model.num_classes == 10 and model.config.num_classes == 10
    assert torch.equal(model.final_conv.conv.weight, before)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 320)


def test_bad_input_and_options_give_clear_errors():
    model = mv.create_model("mobilevit_xxs")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="unknown model"):
        mv.create_model("mobilevit_xl")
    with pytest.raises(TypeError, match="unknown MobileViT option"):
        mv.create_model("mobilevit_xs", patchsize=4)
    with pytest.raises(ValueError, match="patch_sizes"):
        mv.create_model("mobilevit_xs", patch_sizes=(2, 2))


def test_training_step_updates_every_parameter():
    model = mv.create_model("mobilevit_xxs", num_classes=4).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = {n: p.clone() for n, p in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_official_init():
    model = mv.create_model("mobilevit_s")
    lin = model.stages[2][1].transformer[0].attn.qkv
    assert lin.bias.abs().max() == 0 and abs(lin.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.stem.bn.weight, torch.ones(16))
