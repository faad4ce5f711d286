"""The ``mobilevit`` command: models table, predict (incl. unreadable images), checkpoint conversion, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mobilevit as mv
from conftest import randomize
from mobilevit.cli import main

ARCH = "mobilevit_xxs"
CATEGORIES = ["cat", "dog", "bird"]
PREPROCESS = {"resize_size": 176, "crop_size": 160, "interpolation": "bilinear"}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with a sharpened classifier: confident, image-dependent class probabilities."""
    randomize(model, seed)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    return model


def _sample_photos() -> list[Path]:
    """Real photos bundled with scikit-image (no download), if it is installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return []
    data = Path(spec.origin).parent / "data"
    photos = [data / n for n in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")]
    return photos if all(p.is_file() for p in photos) else []


def _generated_photos(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (name, size) in enumerate(
        [
            ("chelsea.png", (300, 451)),
            ("coffee.png", (400, 600)),
            ("rocket.jpg", (427, 640)),
            ("astronaut.png", (512, 512)),
        ]
    ):
        yy, xx = np.mgrid[: size[0], : size[1]]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, rng.integers(0, 256, size)], -1).astype(np.uint8)
        Image.fromarray(img).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """A folder of images: 4 good ones (two nested, one with an upper-case suffix), 2 corrupt ones, a text file."""
    root = tmp_path_factory.mktemp("photos")
    sources = _sample_photos() or _generated_photos(tmp_path_factory.mktemp("generated"))
    chelsea, coffee, rocket, astronaut = sources
    (root / "nested" / "deeper").mkdir(parents=True)
    good = {
        "chelsea": root / "chelsea.png",
        "rocket": root / "rocket.jpg",
        "coffee": root / "nested" / "deeper" / "COFFEE.PNG",
        "astronaut": root / "nested" / "astronaut.png",
    }
    for src, dst in zip((chelsea, rocket, coffee, astronaut), good.values(), strict=True):
        shutil.copyfile(src, dst)
    garbage = root / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = root / "nested" / "truncated.png"
    data = chelsea.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (root / "nested" / "notes.txt").write_text("not an image")
    return {"root": root, **good, "garbage": garbage, "truncated": truncated}


@pytest.fixture(scope="module")
def three_class_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = _perturb(mv.create_model(ARCH, num_classes=3))
    path = tmp_path_factory.mktemp("ckpt") / "pets.safetensors"
    meta = {"categories": CATEGORIES, "preprocess": PREPROCESS}
    return mv.save_checkpoint(model.state_dict(), model.config, path, arch=ARCH, meta=meta)


# ------------------------------------------------------------------------------------ basics


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"mobilevit {mv.__version__}"


def test_help_and_usage_errors(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert all(cmd in out for cmd in ("models", "predict", "convert"))
    code, _, err = _run(capsys, "predict")  # no input
    assert code == 2 and "IMAGE_OR_DIR" in err
    code, _, err = _run(capsys, "predict", "x.jpg", "--model", "resnet50")
    assert code == 2 and "invalid choice" in err
    code, _, err = _run(capsys, "models", "--size", "0")
    assert code == 2 and "must be >= 1" in err


# ------------------------------------------------------------------------------------ models


def test_models_table(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    tasks = [mv.list_models(t) for t in ("classification", "segmentation", "detection")]
    assert list(rows) == mv.list_models(None) == [name for names in tasks for name in names]
    expected = {
        "mobilevit_xxs": ("1,272,024", "0.42", "69.0"),
        "mobilevit_xs": ("2,317,848", "1.05", "74.7"),
        "mobilevit_s": ("5,578,632", "2.03", "78.3"),
    }
    for name, (params, macs, top1) in expected.items():
        row = rows[name]
        assert row[1:5] == [params, macs, "G", "256x256"]
        assert row[5] == f"{name}.cvnets_in1k"
        assert row[6] == f"({top1}"
    for name, params in (("xxs", "1,854,853"), ("xs", "2,944,069"), ("s", "6,357,941")):  # 21 VOC classes
        assert rows[f"mobilevit_{name}_deeplabv3"][1:2] == [params] and "512x512" in rows[f"mobilevit_{name}_deeplabv3"]
    for name, params in (("xxs", "1,755,050"), ("xs", "2,742,042"), ("s", "5,738,826")):  # 80 COCO classes + background
        assert rows[f"mobilevit_{name}_ssdlite"][1:2] == [params] and "320x320" in rows[f"mobilevit_{name}_ssdlite"]


def test_models_json(capsys):
    code, out, _ = _run(capsys, "models", "--json", "--size", "224")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert [r["params"] for r in rows.values() if r["task"] == "classification"] == [1_272_024, 2_317_848, 5_578_632]
    assert rows[ARCH]["macs"] == mv.count_macs(mv.create_model(ARCH), (224, 224))
    assert rows[ARCH]["input_size"] == [224, 224]
    assert 0.30e9 < rows[ARCH]["macs"] < 0.42e9 * (224 / 256) ** 2 * 1.05  # smaller input, fewer MACs
    (w,) = rows["mobilevit_s"]["weights"]
    assert (w["name"], w["top1"], w["top5"]) == ("mobilevit_s.cvnets_in1k", 78.3, 94.1)


# ----------------------------------------------------------------------------------- predict


def test_predict_json_walks_dirs_and_skips_unreadable(capsys, photos, tmp_path):
    missing = tmp_path / "missing.png"
    argv = ["predict", photos["root"], missing, "--model", ARCH, "--topk", "3", "--batch-size", "2", "--json"]
    code, out, err = _run(capsys, *argv)
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    good = [str(photos[k]) for k in ("chelsea", "rocket", "coffee", "astronaut")]
    assert sorted(r["path"] for r in results) == sorted(good)  # the .txt file is not picked up
    imagenet = mv.imagenet_categories()
    for r in results:
        assert set(r) == {"path", "topk"}
        probs = [p["probability"] for p in r["topk"]]
        assert len(probs) == 3
        assert probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert all(imagenet[p["index"]] == p["label"] for p in r["topk"])
    for bad in (photos["garbage"], photos["truncated"], missing):
        assert f"skipped {bad}: " in err
    assert "notes.txt" not in err
    assert "randomly initialised" in err and "meaningless" in err


def test_predict_human_readable_with_workers(capsys, photos):
    argv = ["predict", photos["chelsea"], photos["rocket"], "--model", ARCH, "--topk", "2", "--num-workers", "1"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == str(photos["chelsea"]) and lines[3] == str(photos["rocket"])
    for line in lines[1:3] + lines[4:6]:
        pct, label = line.strip().split("%  ")
        assert 0 <= float(pct) <= 100 and label in mv.imagenet_categories()


def test_predict_with_checkpoint_uses_its_categories_and_preprocess(capsys, photos, three_class_ckpt):
    # no --model: the architecture comes from the checkpoint; --topk is clamped to the 3 classes
    code, out, err = _run(
        capsys, "predict", photos["chelsea"], photos["rocket"], "--weights", three_class_ckpt, "--json"
    )
    assert code == 0
    assert "randomly initialised" not in err
    results = {r["path"]: r["topk"] for r in map(json.loads, out.splitlines())}
    assert len(results) == 2

    model = mv.create_model(ARCH, weights=three_class_ckpt).eval()
    for key in ("chelsea", "rocket"):
        topk = results[str(photos[key])]
        assert sorted(p["label"] for p in topk) == sorted(CATEGORIES)
        assert all(CATEGORIES[p["index"]] == p["label"] for p in topk)
        assert sum(p["probability"] for p in topk) == pytest.approx(1, abs=1e-5)
        image = Image.open(photos[key]).convert("RGB")
        with torch.no_grad():
            want = model(mv.EvalTransform(**PREPROCESS)(image)[None]).softmax(-1)[0]
            default = model(mv.EvalTransform()(image)[None]).softmax(-1)[0]
        got = torch.zeros(3)
        for p in topk:
            got[p["index"]] = p["probability"]
        assert (got - want).abs().max() <= 1e-5  # the checkpoint's preprocessing was used...
        assert (default - want).abs().max() > 1e-4  # ...which is distinguishable from the default one


def test_predict_nothing_readable(capsys, photos, tmp_path):
    code, out, err = _run(capsys, "predict", photos["garbage"], photos["truncated"], "--model", ARCH)
    assert code == 1
    assert out == ""
    assert "skipped" in err and "error: none of the 2 image file(s) could be read" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(capsys, "predict", empty, "--model", ARCH)
    assert code == 1 and out == ""
    assert "no image files" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- convert


def _logits(weights: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mv.create_model(ARCH, weights=weights).eval()(x)


def test_convert_round_trip_through_timm_and_hf(capsys, tmp_path):
    torch.manual_seed(0)
    original = _perturb(mv.create_model(ARCH, num_classes=5), seed=3)
    src = mv.save_checkpoint(original.state_dict(), original.config, tmp_path / "ours.safetensors", arch=ARCH)
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        want = original(x)
    assert want.std() > 0.1

    steps = [
        (src, tmp_path / "timm.safetensors", "timm", "mobilevit"),
        (tmp_path / "timm.safetensors", tmp_path / "hf", "hf", "timm"),
        (tmp_path / "hf", tmp_path / "back.safetensors", "mobilevit", "hf"),
    ]
    for source, dst, to, detected in steps:
        code, out, _ = _run(capsys, "convert", source, dst, "--to", to)
        assert code == 0
        assert f"{detected} layout, {ARCH}, 5 classes" in out
        assert f"wrote {dst} ({to} layout)" in out
        assert mv.read_checkpoint(dst).layout == to
        assert (_logits(dst, x) - want).abs().max() <= 1e-5, to
    assert (tmp_path / "hf" / "config.json").is_file()


def test_convert_keeps_categories_and_preprocess(capsys, tmp_path, three_class_ckpt):
    code, _, _ = _run(capsys, "convert", three_class_ckpt, tmp_path / "copy.safetensors")
    assert code == 0
    model = mv.create_model(ARCH, weights=tmp_path / "copy.safetensors")
    assert mv.model_categories(model) == CATEGORIES
    assert mv.model_transform(model) == mv.EvalTransform(**PREPROCESS)

    code, out, _ = _run(capsys, "convert", three_class_ckpt, tmp_path / "hf", "--to", "hf")
    assert code == 0 and "not stored in this layout: preprocess" in out
    assert mv.model_categories(mv.create_model(ARCH, weights=tmp_path / "hf")) == CATEGORIES  # as id2label

    code, out, _ = _run(capsys, "convert", three_class_ckpt, tmp_path / "c.pt", "--to", "cvnets")
    assert code == 0 and "not stored in this layout: categories, preprocess" in out


def test_convert_half_stores_float16_and_loads_as_float32(capsys, tmp_path):
    torch.manual_seed(0)
    original = _perturb(mv.create_model(ARCH, num_classes=5), seed=3)
    src = mv.save_checkpoint(original.state_dict(), original.config, tmp_path / "ours.safetensors", arch=ARCH)
    dst = tmp_path / "half.safetensors"
    code, out, _ = _run(capsys, "convert", src, dst, "--half")
    assert code == 0 and f"wrote {dst} (mobilevit layout as float16)" in out
    stored = mv.read_checkpoint(dst).state_dict
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert 0.45 < dst.stat().st_size / src.stat().st_size < 0.55

    model = mv.create_model(ARCH, weights=dst).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        want, got = original.eval()(x), model(x)
    assert want.std() > 0.1
    assert 0 < (got - want).abs().max() < 2e-2 * want.abs().max()
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_average_writes_the_mean_of_every_float_tensor(capsys, tmp_path):
    # three fine-tunes of one model: the soup's tensors are their mean (BatchNorm statistics too), its counters the
    # first's, and averaging one model's weights with themselves changes no logit
    torch.manual_seed(0)
    models = [_perturb(mv.create_model(ARCH, num_classes=3), seed=s) for s in (1, 2, 3)]
    for i, m in enumerate(models):
        m.stem.bn.num_batches_tracked.fill_(100 * (i + 1))
    meta = {"categories": CATEGORIES, "preprocess": PREPROCESS}
    paths = [
        mv.save_checkpoint(m.state_dict(), m.config, tmp_path / f"m{i}.safetensors", arch=ARCH, meta=meta)
        for i, m in enumerate(models)
    ]
    dst = tmp_path / "soup.safetensors"
    code, out, _ = _run(capsys, "average", *paths, "-o", dst)
    assert code == 0 and f"wrote {dst}: the average of 3 {ARCH} checkpoints" in out
    soup = mv.read_checkpoint(dst)
    states = [m.state_dict() for m in models]
    for key, value in soup.state_dict.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(s[key] for s in states) / 3, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, states[0][key])
    assert soup.state_dict["stem.bn.num_batches_tracked"] == 100
    assert soup.state_dict["stem.bn.running_var"].std() > 0  # randomized statistics, so the mean is a real test
    assert soup.meta["categories"] == CATEGORIES and soup.meta["preprocess"] == PREPROCESS

    same = tmp_path / "same.safetensors"
    assert _run(capsys, "average", paths[0], paths[0], "-o", same, "--half")[0] == 0
    assert {v.dtype for v in mv.read_checkpoint(same).state_dict.values() if v.is_floating_point()} == {torch.float16}
    x = torch.rand(2, 3, 160, 160)
    want, got = _logits(paths[0], x), _logits(same, x)
    assert torch.equal(got.argmax(1), want.argmax(1)) and (got - want).abs().max() < 2e-2 * want.abs().max()


def test_average_refuses_different_models(capsys, tmp_path, three_class_ckpt):
    other = mv.create_model("mobilevit_xs", num_classes=3)
    xs = mv.save_checkpoint(other.state_dict(), other.config, tmp_path / "xs.safetensors", arch="mobilevit_xs")
    code, _, err = _run(capsys, "average", three_class_ckpt, xs, "-o", tmp_path / "no.safetensors")
    assert code == 2 and "checkpoint 2 is a different model (mobilevit_xs" in err
    renamed = mv.read_checkpoint(three_class_ckpt)
    relabelled = mv.save_checkpoint(
        renamed.state_dict, renamed.config, tmp_path / "r.safetensors", arch=ARCH, meta={"categories": ["a", "b", "c"]}
    )
    code, _, err = _run(capsys, "average", three_class_ckpt, relabelled, "-o", tmp_path / "no.safetensors")
    assert code == 2 and "checkpoint 2 names other classes" in err
    code, _, err = _run(capsys, "average", three_class_ckpt, "-o", tmp_path / "no.safetensors")
    assert code == 2 and "at least 2 checkpoints; got 1" in err
    assert not (tmp_path / "no.safetensors").exists()


def test_convert_layout_in(capsys, tmp_path, three_class_ckpt):
    cvnets = tmp_path / "c.pt"
    assert _run(capsys, "convert", three_class_ckpt, cvnets, "--to", "cvnets")[0] == 0
    code, out, _ = _run(capsys, "convert", cvnets, tmp_path / "ok.safetensors", "--layout-in", "cvnets")
    assert code == 0 and "cvnets layout" in out
    code, _, err = _run(capsys, "convert", cvnets, tmp_path / "no.safetensors", "--layout-in", "timm")
    assert code == 2
    assert (
        err.startswith("error: ") and "looks like a timm MobileViT classification checkpoint but its keys differ" in err
    )
    assert not (tmp_path / "no.safetensors").exists()


# ------------------------------------------------------------------------------------ errors


def _error_cases(tmp_path: Path, three_class_ckpt: Path) -> dict[str, list]:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    cases = {
        "missing weights": ["predict", "x.jpg", "--weights", tmp_path / "nope.pt"],
        "wrong arch": ["predict", "x.jpg", "--model", "mobilevit_s", "--weights", three_class_ckpt],
        "garbage checkpoint": ["convert", garbage, tmp_path / "out.safetensors"],
        "missing src": ["convert", tmp_path / "nope.safetensors", tmp_path / "out.safetensors"],
        "our format needs safetensors": ["convert", three_class_ckpt, tmp_path / "out.pt"],
    }
    if not torch.cuda.is_available():
        cases["no cuda"] = ["predict", "x.jpg", "--model", ARCH, "--device", "cuda"]
    return cases


def test_library_errors_exit_2_without_traceback(capsys, tmp_path, three_class_ckpt):
    for name, argv in _error_cases(tmp_path, three_class_ckpt).items():
        code, _, err = _run(capsys, *argv)
        assert code == 2, name
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err, name


def test_console_script_runs(photos, tmp_path):
    """``python -m mobilevit`` in a real process: output streams, exit code, no traceback."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(mv.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        sys.executable,
        "-m",
        "mobilevit",
        "predict",
        photos["coffee"],
        photos["garbage"],
        "--model",
        ARCH,
        "--json",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["path"] == str(photos["coffee"])
    assert f"skipped {photos['garbage']}: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_known_weights_name(capsys, photos, tmp_path, monkeypatch):
    """A known weights name (fetched from a local mirror, no network) gives its architecture and ImageNet labels."""
    mirror = tmp_path / "mirror"
    torch.manual_seed(0)
    model = _perturb(mv.create_model(ARCH))
    mv.save_checkpoint(model.state_dict(), model.config, mirror / f"{ARCH}.pt", layout="cvnets")
    monkeypatch.setenv("MOBILEVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOBILEVIT_WEIGHTS_MIRROR", mirror.as_uri())
    code, out, err = _run(capsys, "predict", photos["chelsea"], "--weights", f"{ARCH}.cvnets_in1k", "--json")
    assert code == 0, err
    assert "randomly initialised" not in err and "Traceback" not in err
    (result,) = map(json.loads, out.splitlines())
    assert len(result["topk"]) == 5
    assert all(mv.imagenet_categories()[p["index"]] == p["label"] for p in result["topk"])
