"""DeepLabv3-MobileViT checkpoints: official ml-cvnets v0.1 and Hugging Face files load with the source's outputs.

The ml-cvnets reference is a fixture recorded once from the official code (tests/fixtures/
record_cvnets_deeplabv3.py): its state-dict keys and shapes in its own order, a seed, its calibrated
BatchNorm statistics and its logits. The test rebuilds the official file from that key list alone, so
our key rules are checked against names written by the official code, not by us.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

import mobilevit as mv
from mobilevit.checkpoints.io import _read_safetensors
from mobilevit.checkpoints.layouts import expected_keys, from_ours
from mobilevit.cli import main as cli_main
from mobilevit.models.deeplabv3 import SEGMENTATION_VARIANTS, DeepLabV3Config, MobileViTDeepLabV3

FIXTURES = Path(__file__).parent / "fixtures"
CVNETS_FIXTURE = "cvnets_v0.1_deeplabv3_mobilevit_xxs"
STATS_PREFIX = "bn_stats/"  # the fixture's calibrated BatchNorm statistics, by official key
TOL = 1e-4  # max |difference| relative to the largest |logit| of the reference
XXS = "mobilevit_xxs_deeplabv3"


def official_random_state(keys: list[tuple[str, list[int]]], seed: int) -> dict[str, Tensor]:
    """Seeded values for a state dict given only its (key, shape) list: BN statistics positive and spread."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1:  # norm weights around 1; biases and running means around 0
            state[key] = torch.randn(shape, generator=g) * 0.2 + (1.0 if key.endswith(".weight") else 0.0)
        else:
            state[key] = torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
    return state


def official_inputs(sizes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    """One seeded image in [0, 1] per size, in the official (BGR) channel order."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.rand(1, 3, h, w, generator=g) for h, w in sizes]


def _rel(ours: Tensor, reference: Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def _calibrate_bn(model: torch.nn.Module, size: int = 64) -> torch.nn.Module:
    """Set BatchNorm statistics to the true ones of random images, so the output follows the input."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # the statistics of the calibration batch itself
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def _random_seg(name: str = XXS, **overrides) -> MobileViTDeepLabV3:
    from conftest import randomize

    return _calibrate_bn(randomize(mv.create_model(name, **overrides)))


@pytest.fixture(scope="module")
def seg_model() -> MobileViTDeepLabV3:
    """A random DeepLabv3-MobileViT-XXS with calibrated BatchNorm (do not modify)."""
    return _random_seg()


# --- the model --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [
        ("mobilevit_xxs_deeplabv3", 1_854_853),
        ("mobilevit_xs_deeplabv3", 2_944_069),
        ("mobilevit_s_deeplabv3", 6_357_941),
    ],
)
def test_parameter_counts(name, params):
    with torch.device("meta"):
        model = mv.create_model(name)
    assert isinstance(model, MobileViTDeepLabV3) and model.num_classes == 21
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == len(expected_keys("cvnets", task="segmentation")) == 341


def test_create_and_list_models():
    assert mv.list_models() == ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]  # classification, as before
    assert mv.list_models("segmentation") == list(SEGMENTATION_VARIANTS)
    assert mv.list_models(None) == mv.list_models() + mv.list_models("segmentation") + mv.list_models("detection")
    model = mv.create_model(XXS, num_classes=4, patch_sizes=(8, 4, 2), output_stride=8).eval()
    assert model.config.backbone.patch_sizes == (8, 4, 2) and model.config.backbone.output_stride == 8
    with torch.no_grad():
        assert model.forward_logits(torch.rand(1, 3, 64, 96)).shape == (1, 4, 8, 12)
    with pytest.raises(ValueError, match=r"unknown model 'mobilevit_m_deeplabv3'.*mobilevit_s_deeplabv3"):
        mv.create_model("mobilevit_m_deeplabv3")


# --- Hugging Face MobileViTForSemanticSegmentation ----------------------------------------------------

HF_SIZES = [(512, 512), (256, 256), (375, 500)]


@pytest.fixture(scope="module")
def hf_seg(tmp_path_factory) -> dict:
    """A random HF model (calibrated BN) saved with save_pretrained, ours loaded from it, and both outputs."""
    transformers = pytest.importorskip("transformers")
    from conftest import VARIANT_HF, randomize

    cfg = transformers.MobileViTConfig(**VARIANT_HF["mobilevit_xxs"], output_stride=16, num_labels=21)
    ref = _calibrate_bn(randomize(transformers.MobileViTForSemanticSegmentation(cfg)))
    path = tmp_path_factory.mktemp("hf") / "deeplabv3-mobilevit-xx-small"
    ref.save_pretrained(path)
    ours = mv.create_model(XXS, weights=path).eval()
    captured = []  # forward_logits as computed inside model(x), to run the 512x512 model once
    ours.classifier.register_forward_hook(lambda module, args, out: captured.append(out))
    run = {"path": path, "ours": ours, "inputs": {}, "hf": {}, "ours_logits": {}}
    with torch.no_grad():
        for size in HF_SIZES:
            x = run["inputs"][size] = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
            run["hf"][size] = ref(x.flip(1)).logits  # HF (like the official weights) takes BGR, ours RGB
            if size == (512, 512):
                run["ours_full"] = ours(x)
                run["ours_logits"][size] = captured[-1]
            else:
                run["ours_logits"][size] = ours.forward_logits(x)
    return run


def test_hf_directory_reads_as_segmentation(hf_seg):
    ckpt = mv.read_checkpoint(hf_seg["path"])
    assert (ckpt.layout, ckpt.task, ckpt.arch) == ("hf", "segmentation", XXS)
    assert isinstance(ckpt.config, DeepLabV3Config)
    assert ckpt.config == SEGMENTATION_VARIANTS[XXS].replace(dropout=0.1)  # HF's default hidden_dropout_prob
    assert len(ckpt.state_dict) == 341


@pytest.mark.parametrize("size", HF_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_hf_parity(hf_seg, size):
    ours, reference = hf_seg["ours_logits"][size], hf_seg["hf"][size]
    assert ours.shape == reference.shape == (1, 21, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert _rel(ours, reference) <= TOL, size


def test_hf_parity_full_resolution(hf_seg):
    size = (512, 512)
    ours, reference = hf_seg["ours_full"], hf_seg["hf"][size]
    assert ours.shape == (1, 21, *size)
    assert _rel(ours, F.interpolate(reference, size=size, mode="bilinear", align_corners=False)) <= TOL
    # the test would catch upsampling with align_corners=True (as later ml-cvnets versions do)
    assert _rel(ours, F.interpolate(reference, size=size, mode="bilinear", align_corners=True)) > 1e-2


def test_hf_parity_fails_without_channel_swap(hf_seg):
    size = (256, 256)
    with torch.no_grad():
        ours = hf_seg["ours"].forward_logits(hf_seg["inputs"][size].flip(1))  # BGR into our RGB model
    assert _rel(ours, hf_seg["hf"][size]) > 1e-2


def test_written_hf_directory_loads_in_transformers(tmp_path, seg_model):
    transformers = pytest.importorskip("transformers")
    src = seg_model
    mv.save_checkpoint(
        src.state_dict(), src.config, tmp_path / "hf", layout="hf", meta={"categories": list("abcdefghijklmnopqrstu")}
    )
    ref = transformers.MobileViTForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.id2label[20] == "u" and ref.config.output_stride == 16
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        assert _rel(src.forward_logits(x), ref(x.flip(1)).logits) <= TOL


# --- official ml-cvnets v0.1 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cvnets_fixture():
    info = json.loads((FIXTURES / f"{CVNETS_FIXTURE}.json").read_text())
    return info, load_file(FIXTURES / f"{CVNETS_FIXTURE}.safetensors")


def test_cvnets_keys_are_the_official_ones(cvnets_fixture):
    info, _ = cvnets_fixture
    official = [k for k, _ in info["keys"]]
    assert len(official) == 341 and info["params"] == 1_854_853
    assert sorted(expected_keys("cvnets", task="segmentation")) == sorted(official)
    model = mv.create_model(XXS)
    written = from_ours(model.state_dict(), "cvnets", task="segmentation")
    assert [[k, list(v.shape)] for k, v in written.items()] == info["keys"]  # same names, shapes and order


@pytest.fixture(scope="module")
def cvnets_model(cvnets_fixture, tmp_path_factory):
    info, outputs = cvnets_fixture
    path = tmp_path_factory.mktemp("cvnets") / "deeplabv3_mobilevit_xxs.pt"
    state = official_random_state(info["keys"], info["seed"])
    state |= {k.removeprefix(STATS_PREFIX): v for k, v in outputs.items() if k.startswith(STATS_PREFIX)}
    torch.save(state, path)  # an official-layout file, official names
    return path, mv.create_model(XXS, weights=path).eval()


def test_cvnets_checkpoint_reads_as_segmentation(cvnets_model):
    ckpt = mv.read_checkpoint(cvnets_model[0])
    assert (ckpt.layout, ckpt.task, ckpt.arch) == ("cvnets", "segmentation", XXS)
    assert ckpt.config == SEGMENTATION_VARIANTS[XXS]


def test_cvnets_parity(cvnets_fixture, cvnets_model):
    info, outputs = cvnets_fixture
    model = cvnets_model[1]
    sizes = [tuple(s) for s in info["sizes"]]
    for (h, w), x in zip(sizes, official_inputs(sizes, info["seed"]), strict=True):
        with torch.no_grad():
            ours, swapped = model.forward_logits(x.flip(1)), model.forward_logits(x)
        reference = outputs[f"logits_{h}x{w}"]
        assert ours.shape == reference.shape and _rel(ours, reference) <= TOL, (h, w)
        assert _rel(swapped, reference) > 1e-2  # not swapping BGR -> RGB would fail
    (h, w), x = sizes[0], official_inputs(sizes, info["seed"])[0]
    with torch.no_grad():
        logits = model.forward_logits(x.flip(1))
        full = model(x.flip(1))
    reference = outputs[f"upsampled_{h}x{w}_every4"]
    assert _rel(full[..., ::4, ::4], reference) <= TOL
    corners = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
    assert _rel(corners[..., ::4, ::4], reference) > 1e-2  # later ml-cvnets' align_corners=True would fail


# --- our format and conversions ------------------------------------------------------------------------


def _assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_our_format_keeps_the_segmentation_config(tmp_path):
    src = _random_seg(num_classes=5, patch_sizes=(8, 4, 2), output_stride=8, aspp_dropout=0.2)
    path = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "seg.safetensors", arch=XXS, meta={"epoch": 3})
    ckpt = mv.read_checkpoint(path)
    assert (ckpt.layout, ckpt.task, ckpt.arch, ckpt.meta) == ("mobilevit", "segmentation", XXS, {"epoch": 3})
    assert ckpt.config == src.config and json.loads(_read_safetensors(path)[1]["config"])["task"] == "segmentation"
    _assert_same_state(ckpt.state_dict, src.state_dict())
    loaded = mv.create_model(XXS, weights=path)
    assert loaded.num_classes == 5 and loaded.config.backbone.patch_sizes == (8, 4, 2)  # these follow the checkpoint
    assert loaded.config.backbone.output_stride == 8 and loaded.config.aspp_rates == src.config.aspp_rates
    _assert_same_state(loaded.state_dict(), src.state_dict())


@pytest.mark.parametrize("layout", ["cvnets", "hf"])
def test_round_trip_through_official_layouts_is_exact(tmp_path, seg_model, layout):
    src = seg_model
    ours = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "a.safetensors", arch=XXS)
    theirs = mv.save_checkpoint(
        src.state_dict(), src.config, tmp_path / ("b" if layout == "hf" else "b.pt"), layout=layout
    )
    ckpt = mv.read_checkpoint(theirs)
    assert (ckpt.layout, ckpt.task, ckpt.arch) == (layout, "segmentation", XXS)
    back = mv.read_checkpoint(
        mv.save_checkpoint(ckpt.state_dict, ckpt.config, tmp_path / "c.safetensors", arch=ckpt.arch)
    )
    assert back.config == src.config
    _assert_same_state(back.state_dict, mv.read_checkpoint(ours).state_dict)


def test_new_num_classes_keeps_all_but_the_classifier(tmp_path, seg_model):
    src = seg_model
    path = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "seg.pt", layout="cvnets")
    model = mv.create_model(XXS, weights=path, num_classes=11)
    assert model.num_classes == 11 and model.config.num_classes == 11
    state, reference = model.state_dict(), src.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items() if not k.startswith("classifier."))


# --- a classifier as the backbone (the paper's protocol) -----------------------------------------------


def _assert_backbone_from(model: MobileViTDeepLabV3, classifier_state: dict[str, Tensor]) -> None:
    backbone = model.backbone.state_dict()
    assert set(backbone) == {k for k in classifier_state if not k.startswith(("final_conv.", "fc."))}
    assert all(torch.equal(v, classifier_state[k]) for k, v in backbone.items())


@pytest.mark.parametrize("layout", ["mobilevit", "cvnets"])
def test_classification_checkpoint_fills_the_backbone(tmp_path, caplog, layout):
    from conftest import randomize

    patch_sizes = (4, 4, 2) if layout == "mobilevit" else (2, 2, 2)  # only our format records them
    classifier = randomize(mv.create_model("mobilevit_xxs", num_classes=10, patch_sizes=patch_sizes))
    suffix = ".safetensors" if layout == "mobilevit" else ".pt"
    path = mv.save_checkpoint(
        classifier.state_dict(), classifier.config, tmp_path / f"cls{suffix}", layout=layout, arch="mobilevit_xxs"
    )
    torch.manual_seed(0)
    fresh = mv.create_model(XXS, patch_sizes=patch_sizes)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="mobilevit.factory"):
        model = mv.create_model(XXS, weights=path)
    assert "loaded the backbone of mobilevit_xxs" in caplog.text and "final_conv, fc" in caplog.text
    assert model.num_classes == 21 and model.config.backbone.patch_sizes == patch_sizes
    _assert_backbone_from(model, classifier.state_dict())
    head = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in head.items())  # the head keeps its initialisation


def test_timm_classifier_fills_the_backbone(tmp_path, timm_model):
    ref = timm_model("mobilevit_xxs")
    save_file(ref.state_dict(), tmp_path / "timm.safetensors")
    model = mv.create_model(XXS, weights=tmp_path / "timm.safetensors", num_classes=11)
    _assert_backbone_from(model, mv.create_model("mobilevit_xxs", weights=tmp_path / "timm.safetensors").state_dict())


# --- clear errors --------------------------------------------------------------------------------------


def test_incomplete_detection_checkpoint_says_what_differs(tmp_path, cvnets_fixture):
    info, _ = cvnets_fixture
    state = {k: v for k, v in official_random_state(info["keys"], 0).items() if k.startswith("encoder.")}
    state["extra_layers.os_64.dw_conv.block.conv.weight"] = torch.zeros(80, 1, 3, 3)
    state["ssd_heads.0.proj_layer.block.conv.weight"] = torch.zeros(512, 64, 1, 1)
    torch.save(state, tmp_path / "ssd.pt")
    with pytest.raises(
        mv.CheckpointError,
        match=r"ssd\.pt looks like a cvnets MobileViT detection checkpoint but its keys differ: 76 missing "
        r"\[extra_layers\.os_128.*0 unexpected",
    ):
        mv.create_model(XXS, weights=tmp_path / "ssd.pt")


def test_random_state_dict_is_not_a_checkpoint(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, tmp_path / "random.pt")
    with pytest.raises(mv.CheckpointError, match=r"random\.pt is not a MobileViT v1 checkpoint.*conv\.weight"):
        mv.create_model(XXS, weights=tmp_path / "random.pt")


def test_other_variant_names_the_variant(tmp_path):
    src = mv.create_model("mobilevit_s_deeplabv3")
    path = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "s.pt", layout="cvnets")
    with pytest.raises(
        mv.CheckpointError,
        match=r"s\.pt is mobilevit_s_deeplabv3 \(cvnets layout\) but the model is mobilevit_xxs_deeplabv3: "
        r"\d+ tensors differ in shape, e.g. backbone\.stages\.0",
    ):
        mv.create_model(XXS, weights=path)


def test_segmentation_checkpoint_does_not_fill_a_classifier(tmp_path):
    src = mv.create_model(XXS)
    path = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "seg.safetensors", arch=XXS)
    with pytest.raises(
        mv.CheckpointError, match=r"seg\.safetensors is a segmentation checkpoint.*Build mobilevit_xxs_deeplabv3"
    ):
        mv.create_model("mobilevit_xxs", weights=path)


@pytest.mark.parametrize(
    "suffix, match", [(".pt", "not a readable PyTorch checkpoint"), (".safetensors", "not a readable safetensors")]
)
def test_truncated_file(tmp_path, suffix, match):
    src = mv.create_model(XXS)
    layout = "mobilevit" if suffix == ".safetensors" else "cvnets"
    full = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / f"full{suffix}", layout=layout, arch=XXS)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(mv.CheckpointError, match=rf"cut\{suffix}.*{match}|{match}.*cut\{suffix}"):
        mv.create_model(XXS, weights=cut)


def test_layouts_without_segmentation_are_refused(tmp_path):
    src = mv.create_model(XXS)
    for layout in ("timm", "mmpretrain"):
        with pytest.raises(mv.CheckpointError, match=f"cannot write a segmentation model in the {layout} layout"):
            mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "x.pth", layout=layout)


# --- mobilevit convert ---------------------------------------------------------------------------------


def test_cli_convert_between_official_layouts(tmp_path, seg_model, capsys):
    src = seg_model
    ours = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "ours.safetensors", arch=XXS)
    assert cli_main(["convert", str(ours), str(tmp_path / "cvnets.pt"), "--to", "cvnets"]) == 0
    assert cli_main(["convert", str(tmp_path / "cvnets.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "cvnets layout, mobilevit_xxs_deeplabv3 (segmentation), 21 classes, 341 tensors" in out
    back = mv.read_checkpoint(tmp_path / "back.safetensors")
    assert back.config == src.config and back.arch == XXS
    _assert_same_state(back.state_dict, mv.read_checkpoint(ours).state_dict)
    assert cli_main(["convert", str(ours), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 2
    assert "cannot write a segmentation model in the timm layout" in capsys.readouterr().err
