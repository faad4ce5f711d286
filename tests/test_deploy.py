"""The inference form: same logits as the training form, fewer layers, original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mobilevit as mv
from conftest import randomize


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
def test_deploy_matches_training_form(name):
    model = randomize(mv.create_model(name))
    fast = mv.deploy(model)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert ref.std() > 0.1  # logits spread over classes, so 1e-4 is a real bound
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(250, 230), (128, 96), (64, 64)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_deploy_any_input_size_and_layout(size, channels_last):
    model = randomize(mv.create_model("mobilevit_xxs", patch_sizes=(2, 2, 2)))
    fast = mv.deploy(model, channels_last=channels_last)
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.forward_features(x), model.forward_features(x), atol=1e-4, rtol=0)


def test_deploy_folds_batchnorm_and_leaves_original_alone():
    model = randomize(mv.create_model("mobilevit_xxs", num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = mv.deploy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 30
    # LayerNorm affines folded into the Linear layers after them: only the normalisation is left
    assert not any(isinstance(m, nn.LayerNorm) for m in fast.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert fast.num_classes == 10 and fast.config == model.config
    # fewer parameters: BN scale/shift are gone, a bias per conv is added
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in model.parameters())


def test_deploy_runs_under_inference_mode_and_without_classifier():
    model = randomize(mv.create_model("mobilevit_xxs", num_classes=0))
    fast = mv.deploy(model)
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)
    assert fast(x).shape == (1, model.num_features)


def test_deploy_rejects_other_modules_and_bad_input():
    with pytest.raises(TypeError, match="MobileViT"):
        mv.deploy(nn.Conv2d(3, 3, 1))
    fast = mv.deploy(mv.create_model("mobilevit_xxs"))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fast(torch.rand(3, 64, 64))
