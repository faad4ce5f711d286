"""Checkpoints of every ecosystem load with outputs equal to the source implementation's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import mobilevit as mv
from mobilevit.checkpoints.layouts import expected_keys

SIZES = [(256, 256), (224, 224), (250, 250), (192, 320)]
TOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _assert_same_outputs(reference, ours, bgr_reference: bool = False, sizes=SIZES):
    torch.manual_seed(0)
    for size in sizes:
        x = torch.rand(2, 3, *size)
        ref = _logits(reference, x.flip(1) if bgr_reference else x)
        assert ref.std() > 0.05  # a degenerate reference would make the comparison meaningless
        assert _max_diff(ref, _logits(ours.eval(), x)) <= TOL, size


# --- timm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", mv.list_models())
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_parity(tmp_path, timm_model, name, suffix):
    ref = timm_model(name)
    path = tmp_path / f"{name}{suffix}"
    save_file(ref.state_dict(), path) if suffix == ".safetensors" else torch.save(ref.state_dict(), path)
    model = mv.create_model(name, weights=path)
    assert mv.read_checkpoint(path).layout == "timm"
    _assert_same_outputs(ref, model)


# --- Hugging Face -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", mv.list_models())
def test_hf_directory_parity(tmp_path, hf_model, name):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path / "hf")
    model = mv.create_model(name, weights=tmp_path / "hf")
    assert mv.read_checkpoint(tmp_path / "hf").layout == "hf"
    _assert_same_outputs(ref, model, bgr_reference=True)  # HF copies of the official weights take BGR


def test_hf_pytorch_model_bin_and_patch_size_from_config(tmp_path, hf_model):
    ref = hf_model("mobilevit_xxs", patch_size=4, num_labels=5, id2label={i: f"c{i}" for i in range(5)})
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()  # the older layout: a pickled state dict
    torch.save(ref.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model = mv.create_model("mobilevit_xxs", weights=tmp_path / "hf")
    assert model.config.patch_sizes == (4, 4, 4) and model.num_classes == 5
    assert mv.model_categories(model) == [f"c{i}" for i in range(5)]
    _assert_same_outputs(ref, model, bgr_reference=True, sizes=[(256, 256), (200, 280)])


# --- ml-cvnets and mmpretrain: checkpoints renamed from timm's by independent rules ---------------

_CVNETS_RULES = [  # timm name -> ml-cvnets v0.1 name (REFERENCE.md)
    (r"^stem\.conv\.", "conv_1.block.conv."),
    (r"^stem\.bn\.", "conv_1.block.norm."),
    (r"^stages\.(\d)\.(\d)\.conv1_1x1\.", lambda m: f"layer_{int(m[1]) + 1}.{m[2]}.block.exp_1x1.block."),
    (r"^stages\.(\d)\.(\d)\.conv2_kxk\.", lambda m: f"layer_{int(m[1]) + 1}.{m[2]}.block.conv_3x3.block."),
    (r"^stages\.(\d)\.(\d)\.conv3_1x1\.", lambda m: f"layer_{int(m[1]) + 1}.{m[2]}.block.red_1x1.block."),
    (r"^stages\.(\d)\.1\.conv_kxk\.", lambda m: f"layer_{int(m[1]) + 1}.1.local_rep.conv_3x3.block."),
    (r"^stages\.(\d)\.1\.conv_1x1\.weight", lambda m: f"layer_{int(m[1]) + 1}.1.local_rep.conv_1x1.block.conv.weight"),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.norm1\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{m[2]}.pre_norm_mha.0."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.attn\.qkv\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{m[2]}.pre_norm_mha.1.qkv_proj."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.attn\.proj\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{m[2]}.pre_norm_mha.1.out_proj."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.norm2\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{m[2]}.pre_norm_ffn.0."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.mlp\.fc1\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{m[2]}.pre_norm_ffn.1."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.mlp\.fc2\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{m[2]}.pre_norm_ffn.4."),
    (r"^stages\.(\d)\.1\.norm\.", lambda m: f"layer_{int(m[1]) + 1}.1.global_rep.{(2, 4, 3)[int(m[1]) - 2]}."),
    (r"^stages\.(\d)\.1\.conv_proj\.", lambda m: f"layer_{int(m[1]) + 1}.1.conv_proj.block."),
    (r"^stages\.(\d)\.1\.conv_fusion\.", lambda m: f"layer_{int(m[1]) + 1}.1.fusion.block."),
    (r"^final_conv\.", "conv_1x1_exp.block."),
    (r"^head\.fc\.", "classifier.fc."),
    (r"\.bn\.", ".norm."),
]  # fmt: skip

_MMPRETRAIN_RULES = [  # timm name -> mmpretrain name
    (r"^stem\.", "backbone.stem."),
    (r"^stages\.(\d)\.(\d)\.conv1_1x1\.", r"backbone.layers.\1.\2.conv.0."),
    (r"^stages\.(\d)\.(\d)\.conv2_kxk\.", r"backbone.layers.\1.\2.conv.1."),
    (r"^stages\.(\d)\.(\d)\.conv3_1x1\.", r"backbone.layers.\1.\2.conv.2."),
    (r"^stages\.(\d)\.1\.conv_kxk\.", r"backbone.layers.\1.1.local_rep.0."),
    (r"^stages\.(\d)\.1\.conv_1x1\.weight", r"backbone.layers.\1.1.local_rep.1.conv.weight"),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.norm1\.", r"backbone.layers.\1.1.global_rep.\2.ln1."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.attn\.", r"backbone.layers.\1.1.global_rep.\2.attn."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.norm2\.", r"backbone.layers.\1.1.global_rep.\2.ln2."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.mlp\.fc1\.", r"backbone.layers.\1.1.global_rep.\2.ffn.layers.0.0."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.mlp\.fc2\.", r"backbone.layers.\1.1.global_rep.\2.ffn.layers.1."),
    (r"^stages\.(\d)\.1\.norm\.", lambda m: f"backbone.layers.{m[1]}.1.global_rep.{(2, 4, 3)[int(m[1]) - 2]}."),
    (r"^stages\.(\d)\.1\.conv_proj\.", r"backbone.layers.\1.1.conv_proj."),
    (r"^stages\.(\d)\.1\.conv_fusion\.", r"backbone.layers.\1.1.conv_fusion."),
    (r"^final_conv\.", "backbone.conv_1x1_exp."),
]  # fmt: skip


def _rename(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _to_bgr(state, stem_key):
    state = dict(state)
    state[stem_key] = state[stem_key].flip(1)
    return state


@pytest.mark.parametrize("name", mv.list_models())
def test_cvnets_checkpoint_parity(tmp_path, timm_model, name):
    ref = timm_model(name)
    state = _to_bgr(_rename(ref.state_dict(), _CVNETS_RULES), "conv_1.block.conv.weight")
    assert sorted(state) == sorted(expected_keys("cvnets"))
    torch.save(state, tmp_path / f"{name}.pt")
    ckpt = mv.read_checkpoint(tmp_path / f"{name}.pt")
    assert (ckpt.layout, ckpt.arch) == ("cvnets", name)
    _assert_same_outputs(ref, mv.create_model(name, weights=tmp_path / f"{name}.pt"))


@pytest.mark.parametrize("name", mv.list_models())
def test_mmpretrain_checkpoint_parity(tmp_path, timm_model, name):
    ref = timm_model(name)
    state = _to_bgr(_rename(ref.state_dict(), _MMPRETRAIN_RULES), "backbone.stem.conv.weight")
    assert sorted(state) == sorted(expected_keys("mmpretrain"))
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, tmp_path / "mm.pth")
    assert mv.read_checkpoint(tmp_path / "mm.pth").layout == "mmpretrain"
    _assert_same_outputs(ref, mv.create_model(name, weights=tmp_path / "mm.pth"))


# --- our format and writing every layout ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["mobilevit", "timm", "cvnets", "mmpretrain", "hf"])
def test_save_then_load_every_layout(tmp_path, layout):
    from conftest import randomize

    src = randomize(mv.create_model("mobilevit_xs", num_classes=3))
    dst = tmp_path / ("out" if layout == "hf" else f"out{mv.checkpoints.io.WRITABLE[layout]}")
    meta = {"categories": ["a", "b", "c"]}
    mv.save_checkpoint(src.state_dict(), src.config, dst, layout=layout, arch="mobilevit_xs", meta=meta)
    ckpt = mv.read_checkpoint(dst)
    assert ckpt.layout == layout and ckpt.arch == "mobilevit_xs" and ckpt.config.num_classes == 3
    loaded = mv.create_model("mobilevit_xs", weights=dst)
    if layout in ("mobilevit", "hf"):
        assert mv.model_categories(loaded) == ["a", "b", "c"]
    _assert_same_outputs(src, loaded, sizes=[(256, 256), (250, 250)])


def test_our_format_keeps_config_and_metadata(tmp_path):
    src = mv.create_model("mobilevit_xxs", patch_sizes=(8, 4, 2), num_classes=10, dropout=0.0)
    path = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "m.safetensors", arch="mobilevit_xxs")
    ckpt = mv.read_checkpoint(path)
    assert ckpt.config == src.config and ckpt.layout == "mobilevit"
    assert mv.create_model("mobilevit_xxs", weights=path).config.patch_sizes == (8, 4, 2)
    path = mv.save_checkpoint(src.state_dict(), src.config, path, meta={"training": {"epoch": 3}})
    assert mv.read_checkpoint(path).meta == {"training": {"epoch": 3}}  # any JSON metadata round-trips
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # atomic writes keep the usual permissions


def test_written_hf_directory_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import randomize

    src = randomize(mv.create_model("mobilevit_xxs"))
    mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "hf", layout="hf")
    ref = transformers.MobileViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    _assert_same_outputs(ref, src, bgr_reference=True, sizes=[(256, 256)])


def test_written_timm_checkpoint_loads_in_timm(tmp_path):
    timm = pytest.importorskip("timm")
    from conftest import randomize

    src = randomize(mv.create_model("mobilevit_s"))
    mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "t.safetensors", layout="timm")
    ref = timm.create_model("mobilevit_s", pretrained_cfg_overlay={"file": str(tmp_path / "t.safetensors")})
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(tmp_path / "t.safetensors"))
    _assert_same_outputs(ref.eval(), src, sizes=[(256, 256)])


# --- fine-tuning heads, wrong files, safety ------------------------------------------------------


def test_new_num_classes_loads_backbone_only(tmp_path, timm_model):
    ref = timm_model("mobilevit_xxs")
    save_file(ref.state_dict(), tmp_path / "t.safetensors")
    model = mv.create_model("mobilevit_xxs", weights=tmp_path / "t.safetensors", num_classes=10).eval()
    assert model.num_classes == 10
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert _max_diff(model.forward_features(x), ref.forward_features(x)) <= TOL


def test_wrong_variant_names_the_variant_it_looks_like(tmp_path, timm_model):
    save_file(timm_model("mobilevit_s").state_dict(), tmp_path / "s.safetensors")
    with pytest.raises(
        mv.CheckpointError,
        match=r"is mobilevit_s \(timm layout\).*model is mobilevit_xs: \d+ tensors differ in shape, e.g. stages.1.0",
    ):
        mv.create_model("mobilevit_xs", weights=tmp_path / "s.safetensors")


def test_not_a_mobilevit_checkpoint(tmp_path):
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(mv.CheckpointError, match=r"not a MobileViT v1 checkpoint.*weight"):
        mv.create_model("mobilevit_s", weights=tmp_path / "linear.pt")


def test_partial_checkpoint_lists_differing_keys(tmp_path, timm_model):
    state = timm_model("mobilevit_xxs").state_dict()
    del state["stages.2.1.norm.weight"]
    state["stages.2.1.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(
        mv.CheckpointError, match=r"timm.*1 missing \[stages.2.1.norm.weight\].*stages.2.1.extra.weight"
    ):
        mv.read_checkpoint(tmp_path / "p.safetensors")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(mv.CheckpointError, match="refusing to load"):
        mv.read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "content, match",
    [(b"garbage" * 10, "not a readable PyTorch checkpoint"), (b"", "not a readable PyTorch checkpoint")],
)
def test_corrupt_files(tmp_path, content, match):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(mv.CheckpointError, match=match):
        mv.read_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(mv.CheckpointError, match="not a readable safetensors"):
        mv.read_checkpoint(tmp_path / "bad.safetensors")


def test_missing_file_and_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local path nor a known name"):
        mv.create_model("mobilevit_s", weights=tmp_path / "nope.pt")
    with pytest.raises(mv.CheckpointError, match=r"config\.json"):
        mv.read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(mv.CheckpointError, match="model_type='vit'"):
        mv.read_checkpoint(tmp_path)


def test_ddp_and_wrapped_checkpoints(tmp_path, timm_model):
    ref = timm_model("mobilevit_xxs")
    wrapped = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    torch.save(wrapped, tmp_path / "train.pt")
    _assert_same_outputs(ref, mv.create_model("mobilevit_xxs", weights=tmp_path / "train.pt"), sizes=[(256, 256)])


# --- download by name ----------------------------------------------------------------------------


def test_download_known_weights_by_name(tmp_path, monkeypatch, timm_model):
    ref = timm_model("mobilevit_xxs")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    state = _to_bgr(_rename(ref.state_dict(), _CVNETS_RULES), "conv_1.block.conv.weight")
    torch.save(state, mirror / "mobilevit_xxs.pt")
    digest = hashlib.sha256((mirror / "mobilevit_xxs.pt").read_bytes()).hexdigest()
    monkeypatch.setenv("MOBILEVIT_WEIGHTS_MIRROR", mirror.as_uri())
    monkeypatch.setenv("MOBILEVIT_CACHE", str(tmp_path / "cache"))
    w = mv.get_weights("mobilevit_xxs.cvnets_in1k")
    monkeypatch.setitem(mv.checkpoints.hub.WEIGHTS, w.name, dataclasses.replace(w, sha256=digest))

    model = mv.create_model("mobilevit_xxs", weights="mobilevit_xxs.cvnets_in1k")
    assert (tmp_path / "cache" / "mobilevit_xxs.pt").exists()
    assert mv.model_categories(model)[0] == "tench"
    assert mv.model_transform(model) == mv.EvalTransform(288, 256)
    _assert_same_outputs(ref, model, sizes=[(256, 256)])

    (mirror / "mobilevit_xxs.pt").unlink()  # the second use comes from the cache
    mv.create_model("mobilevit_xxs", weights="mobilevit_xxs.cvnets_in1k")


def test_download_checksum_mismatch_removes_file(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"not the real weights")
    monkeypatch.setenv("MOBILEVIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="checksum mismatch"):
        mv.checkpoints.hub.download((tmp_path / "w.pt").as_uri(), "0" * 64)
    assert not (tmp_path / "cache" / "w.pt").exists()


def test_download_without_checksum_records_one(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"v1")
    monkeypatch.setenv("MOBILEVIT_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="no published checksum"):
        path = mv.checkpoints.hub.download((tmp_path / "w.pt").as_uri())
    path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum mismatch"):
        mv.checkpoints.hub.download((tmp_path / "w.pt").as_uri())


def test_unreachable_url_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEVIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError, match="MOBILEVIT_WEIGHTS_MIRROR"):
        mv.checkpoints.hub.download((tmp_path / "missing.pt").as_uri())


@pytest.mark.parametrize("name, arch", [("mobilevit_xxs", "xx_small"), ("mobilevit_s", "small")])
def test_real_mmpretrain_model_parity(tmp_path, name, arch):
    """Against mmpretrain's own MobileViT (BGR input, as its configs use), not renamed keys."""
    pytest.importorskip("mmpretrain")
    import mmpretrain.utils.dependency

    # with pycocotools installed mmpretrain imports its multimodal models, which transformers 5 breaks
    mmpretrain.utils.dependency.WITH_MULTIMODAL = False
    from mmpretrain.models import build_classifier

    from conftest import randomize

    channels = {"xx_small": 320, "small": 640}[arch]
    ref = build_classifier(
        dict(
            type="ImageClassifier",
            backbone=dict(type="MobileViT", arch=arch),
            neck=dict(type="GlobalAveragePooling"),
            head=dict(type="LinearClsHead", num_classes=1000, in_channels=channels),
        )
    )
    randomize(ref)
    torch.save({"meta": {}, "state_dict": ref.state_dict()}, tmp_path / "mm.pth")
    model = mv.create_model(name, weights=tmp_path / "mm.pth")

    class Logits(torch.nn.Module):
        def forward(self, x):
            return ref(x, mode="tensor")

    _assert_same_outputs(Logits().eval(), model, bgr_reference=True, sizes=[(256, 256), (250, 250)])
