"""Training: recipe loading, schedule, EMA, a full tiny run, exact resume after a kill, DDP, divergence."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import save_image, write_mnist
from mobilevit import create_model, model_transform, read_checkpoint, save_checkpoint
from mobilevit.cli import main
from mobilevit.data import datasets
from mobilevit.data.datasets import FASHION_MNIST_CLASSES, build_dataset, collate
from mobilevit.data.transforms import EvalTransform
from mobilevit.training.evaluate import evaluate
from mobilevit.training.optim import ModelEMA, cosine_lr
from mobilevit.training.recipe import TrainConfig, list_recipes, load_recipe, parse_overrides
from mobilevit.training.trainer import Trainer, TrainingDiverged, eval_batches, read_train_state, train

RECIPE = "mobilevit_xxs_fashion_mnist"
ROOT = Path(__file__).resolve().parents[1]


def tiny(data: Path, out: Path, **extra: object) -> dict[str, object]:
    """Overrides that make the Fashion-MNIST recipe run in seconds on a few synthetic images."""
    values = dict(
        data=str(data), output=str(out), val_fraction=0.25, workers=0, base_size=32, base_batch=8, min_size=24,
        max_size=40, num_scales=3, size_divisor=8, eval_resize=32, eval_size=32, eval_batch=16, epochs=2, warmup_iters=3,
        ema_momentum=0.01, tensorboard=False, progress=False, log_every=1,
    )  # fmt: skip
    return values | extra


def cli_args(values: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mnist(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "mnist", n_train=48, n_test=20)
    return tmp_path / "mnist"


def test_bundled_recipes_follow_the_paper():
    assert {"mobilevit_xxs_in1k", "mobilevit_xs_in1k", "mobilevit_s_in1k", RECIPE} <= set(list_recipes())
    for name in ("xxs", "xs", "s"):
        cfg = load_recipe(f"mobilevit_{name}_in1k")
        assert cfg.model == f"mobilevit_{name}" and cfg.epochs == 300 and cfg.effective_batch == 1024
        assert (cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.warmup_init_lr) == (0.002, 0.0002, 3000, 0.0002)
        assert (cfg.weight_decay, cfg.betas, cfg.label_smoothing, cfg.ema_momentum) == (0.01, (0.9, 0.999), 0.1, 0.0005)
        assert (cfg.base_size, cfg.base_batch, cfg.min_size, cfg.max_size) == (256, 128, 160, 320)
    # epochs are selected on held-out training images, never on test
    for name in (RECIPE, f"{RECIPE}_full", "mobilevit_xs_fashion_mnist_long"):
        cfg = load_recipe(name)
        assert cfg.data == "fashion-mnist" and cfg.val_fraction > 0


def test_recipe_overrides_and_errors(tmp_path: Path):
    cfg = load_recipe(RECIPE, parse_overrides(["lr=0.01", "model_overrides={dropout: 0.0}", "grad_clip=1"]))
    assert cfg.lr == 0.01 and cfg.model_overrides == {"dropout": 0.0} and cfg.grad_clip == 1
    cfg = load_recipe(RECIPE, parse_overrides(["lr=1e-4", "warmup_init_lr=2e-05"]))  # YAML: strings without a dot
    assert (cfg.lr, cfg.warmup_init_lr) == (1e-4, 2e-5)
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        load_recipe(RECIPE, {"lr": "fast"})
    with pytest.raises(ValueError, match=r"unknown training option.*'lrr'"):
        load_recipe(RECIPE, {"lrr": 1})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(FileNotFoundError, match="bundled recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


def test_cosine_lr_with_linear_warmup():
    kw = dict(total_steps=1000, lr=0.002, min_lr=0.0002, warmup_iters=100, warmup_init_lr=0.0002)
    assert cosine_lr(0, **kw) == pytest.approx(0.0002)
    assert cosine_lr(50, **kw) == pytest.approx(0.0011)
    assert cosine_lr(100, **kw) == pytest.approx(0.002)
    assert cosine_lr(550, **kw) == pytest.approx(0.0011)
    assert cosine_lr(1000, **kw) == pytest.approx(0.0002)
    values = [cosine_lr(s, **kw) for s in range(100, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_ema_is_a_moving_average():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, momentum=0.25)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 3
    ema.update(model)
    after = ema.module.state_dict()
    assert torch.allclose(after["0.weight"], before["0.weight"] + 0.25)
    assert after["1.num_batches_tracked"] == 3
    assert not any(p.requires_grad for p in ema.module.parameters())
    warm = ModelEMA(model, momentum=0.001, warmup=True)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    warm.update(model, step=0)  # momentum 0.9 at the first step
    assert torch.allclose(warm.module[0].weight, model[0].weight - 0.1)


def test_training_run_writes_everything(mnist: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = train(load_recipe(RECIPE, tiny(mnist, out, checkpoint_every_steps=2)))
    for name in ("last.pt", "best.safetensors", "metrics.csv", "steps.csv", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["train_loss"])) and r["ema_val_top1"] for r in rows)
    assert result["best_top1"] == max(max(float(r["val_top1"]), float(r["ema_val_top1"])) for r in rows)
    steps = read_rows(out / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1))
    assert {int(r["size"]) for r in steps} <= {24, 32, 40}
    # the best weights are a standalone checkpoint that create_model / eval understand
    ckpt = read_checkpoint(out / "best.safetensors")
    assert ckpt.arch == "mobilevit_xxs" and ckpt.meta["categories"] == FASHION_MNIST_CLASSES
    model = create_model("mobilevit_xxs", weights=out / "best.safetensors")
    assert model.num_classes == 10
    # the held-out validation images give back the accuracy recorded in the checkpoint
    val_idx = build_val_indices(mnist)
    val = build_dataset(mnist, "train", EvalTransform(32, 32)).subset(val_idx)
    loader = torch.utils.data.DataLoader(val, batch_sampler=eval_batches(len(val), 16), collate_fn=collate)
    assert evaluate(model, loader, torch.device("cpu")).top1 == pytest.approx(ckpt.meta["training"]["val_top1"])
    # a second run into the same directory is refused instead of overwriting it
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(load_recipe(RECIPE, tiny(mnist, out)))


def build_val_indices(mnist: Path) -> list[int]:
    from mobilevit.data.datasets import split_holdout

    return split_holdout(48, 0.25, 0)[1]


def test_eval_command_reports_accuracy_and_pictures(mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    train(load_recipe(RECIPE, tiny(mnist, out, epochs=1)))
    args = ["eval", "--weights", str(out / "best.safetensors"), "--data", str(mnist), "--num-workers", "0"]
    pictures = ["--confusion", str(tmp_path / "cm.png"), "--samples", str(tmp_path / "samples.png")]
    assert main([*args, "--json", *pictures]) == 0
    import json

    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 20 and 0 <= metrics["top1"] <= metrics["top5"] <= 100
    # --split holdout: the training images the run held out, giving back the validation accuracy it recorded
    holdout = [*args, "--split", "holdout", "--val-fraction", "0.25", "--json"]
    assert main(holdout) == 0
    metrics = json.loads(capsys.readouterr().out)
    recorded = read_checkpoint(out / "best.safetensors").meta["training"]["val_top1"]
    assert metrics["count"] == 12 and metrics["top1"] == pytest.approx(recorded)
    assert (tmp_path / "cm.png").stat().st_size > 1000 and (tmp_path / "samples.png").stat().st_size > 1000
    # --size: the weights' preprocessing at another crop size, as evaluate() on images read at that size
    assert main([*args, "--size", "24", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    model = create_model("mobilevit_xxs", weights=out / "best.safetensors").eval()
    test = build_dataset(mnist, "test", model_transform(model).at_size(24))
    loader = torch.utils.data.DataLoader(test, batch_sampler=eval_batches(len(test), 7), collate_fn=collate)
    expected = evaluate(model, loader, torch.device("cpu"))
    assert metrics["size"] == 24 and model_transform(model).crop_size == 32
    assert metrics["loss"] == pytest.approx(expected.loss) and metrics["top1"] == pytest.approx(expected.top1)
    # a 1000-class model cannot be evaluated on 10 classes: clear error
    create = create_model("mobilevit_xxs")
    save_checkpoint(create.state_dict(), create.config, tmp_path / "in1k.safetensors", arch="mobilevit_xxs")
    assert main(["eval", "--weights", str(tmp_path / "in1k.safetensors"), "--data", str(mnist)]) == 2
    assert "10 classes but the model predicts 1000" in capsys.readouterr().err


def test_hflip_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images, labels = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,))
    batches, cpu = [(images, labels, 0)], torch.device("cpu")
    with torch.no_grad():
        mean = (model(images) + model(images.flip(-1))) / 2
    result = evaluate(model, batches, cpu, hflip=True, keep_predictions=True)
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(mean, labels).item())
    assert result.preds.tolist() == mean.argmax(1).tolist()
    assert evaluate(model, batches, cpu).loss != pytest.approx(result.loss)


def test_fine_tuning_loads_the_backbone_with_a_new_head(mnist: Path, tmp_path: Path):
    pretrained = create_model("mobilevit_xxs")
    save_checkpoint(pretrained.state_dict(), pretrained.config, tmp_path / "p.safetensors", arch="mobilevit_xxs")
    trainer = Trainer(load_recipe(RECIPE, tiny(mnist, tmp_path / "ft", weights=str(tmp_path / "p.safetensors"))))
    assert trainer.model.fc.out_features == 10
    assert torch.equal(trainer.model.stem.conv.weight, pretrained.stem.conv.weight)


def test_gradient_accumulation_reaches_the_effective_batch(mnist: Path, tmp_path: Path):
    cfg = load_recipe(RECIPE, tiny(mnist, tmp_path / "acc", effective_batch=16, multiscale=False, epochs=1))
    trainer = Trainer(cfg)
    assert trainer.accum == 2 and trainer.steps_per_epoch == 2  # 36 images: 4 full batches of 8 -> 2 steps
    trainer.fit()
    assert trainer.run.step == 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_clipping(mnist: Path, tmp_path: Path, amp: str):
    cfg = load_recipe(RECIPE, tiny(mnist, tmp_path / amp, amp=amp, grad_clip=0.5, max_steps=2, tensorboard=True))
    trainer = Trainer(cfg)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    trainer.fit()
    assert trainer.run.step == 2
    losses = [float(r["loss"]) for r in read_rows(tmp_path / amp / "steps.csv")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert list((tmp_path / amp / "tensorboard").glob("events.out.tfevents.*"))


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "folder"
    for i in range(12):
        save_image(root / ("cat" if i % 2 else "dog") / f"{i}.png", (20 * i, 100, 200 - 10 * i))
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    values = tiny(root, tmp_path / "run", val_fraction=0.0, val_split=None, multiscale=False, epochs=1, base_batch=13)
    train(load_recipe(RECIPE, values))
    row = read_rows(tmp_path / "run" / "metrics.csv")[0]
    assert row["skipped_images"] == "1" and row["val_top1"] == ""
    assert "broken.jpg" in caplog.text
    # a batch left with one readable image (BatchNorm cannot train on it) is skipped, not a crash
    for path in sorted(root.glob("*/*.png"))[1:]:
        path.write_bytes(b"broken")
    values |= dict(output=str(tmp_path / "one"))
    train(load_recipe(RECIPE, values))
    row = read_rows(tmp_path / "one" / "metrics.csv")[0]
    assert row["skipped_images"] == "12" and row["train_loss"] == "0.0"


def test_divergence_stops_with_a_usable_checkpoint(mnist: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = load_recipe(RECIPE, tiny(mnist, out, lr=1e30, warmup_iters=0, ema_momentum=0.0, checkpoint_every_steps=1))
    with pytest.raises(TrainingDiverged, match="Lower the learning rate") as info:
        train(cfg)
    state = read_train_state(out / "last.pt")
    assert f"last.pt holds the last finite weights (step {state['step']})" in str(info.value)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.dtype.is_floating_point)


def advanced_options(tmp_path: Path) -> dict[str, object]:
    """Every advanced option on: RandAugment, MixUp + CutMix, repeated augmentation, distillation (random teacher)."""
    torch.manual_seed(1)
    teacher = create_model("mobilevit_xxs", num_classes=10)
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher.state_dict(), teacher.config, path, arch="mobilevit_xxs")
    return dict(
        auto_augment="randaugment", mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.8, repeated_aug=2,
        teacher=str(path), distill_alpha=0.5, distill_temperature=2.0,
    )  # fmt: skip


def _run(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("variant", ["paper", "advanced", "data_on_device"])
def test_resume_after_kill_matches_an_uninterrupted_run(mnist: Path, tmp_path: Path, variant: str):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mobilevit", "train", "--config", RECIPE]
    common: dict[str, object] = dict(epochs=6, checkpoint_every_steps=2)
    if variant == "advanced":
        common |= advanced_options(tmp_path)
    elif variant == "data_on_device":  # batches augmented in one go (plans drawn by a worker process)
        common |= dict(data_on_device=True, random_erase=0.5, workers=1)
    full = _run([*cmd, *cli_args(tiny(mnist, tmp_path / "full", **common))], env)
    killed = _run([*cmd, *cli_args(tiny(mnist, tmp_path / "killed", **common))], env)
    steps = tmp_path / "killed" / "steps.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        if steps.exists() and len(steps.read_text().splitlines()) >= 10:  # >= 9 steps done: checkpoint at step 8
            break
        time.sleep(0.01)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    state = read_train_state(tmp_path / "killed" / "last.pt")
    assert 0 < state["step"] < 40
    resumed = subprocess.run(
        [*cmd, "--resume", *cli_args(tiny(mnist, tmp_path / "killed", **common))],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait() == 0, full.stderr.read() if full.stderr else ""
    for name in ("steps.csv", "metrics.csv"):
        expected, got = read_rows(tmp_path / "full" / name), read_rows(tmp_path / "killed" / name)
        drop = ("epoch_seconds", "images_per_second")
        assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
            {k: v for k, v in r.items() if k not in drop} for r in expected
        ]
    a, b = (
        read_checkpoint(tmp_path / "full" / "best.safetensors"),
        read_checkpoint(tmp_path / "killed" / "best.safetensors"),
    )
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


needs_venv = pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "mobilevit").exists(), reason="needs the README's .venv")


def script_command(name: str, mnist: Path, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """scripts/NAME with the tiny overrides, and its environment: data from ``mnist``, output in tmp_path/run."""
    overrides = cli_args({k: v for k, v in tiny(mnist, tmp_path).items() if k not in ("data", "output")})
    env = os.environ | {"FASHION_MNIST_DIR": str(mnist), "OUTPUT": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    env["MOBILEVIT_TCMALLOC"] = "0"  # the scripts would otherwise install it with apt
    return ["bash", str(ROOT / "scripts" / name), *overrides], env


@needs_venv
def test_quickstart_rerun_resumes_with_overrides(mnist: Path, tmp_path: Path):
    """Running the README's main job again after an interruption resumes it, extra overrides included."""
    script, env = script_command("quickstart.sh", mnist, tmp_path)
    first = subprocess.run([*script, "max_steps=2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "top-1" in again.stdout
    assert [row["epoch"] for row in read_rows(tmp_path / "run" / "metrics.csv")] == ["1", "2"]


@needs_venv
def test_long_fashion_mnist_script_chooses_on_holdout(mnist: Path, tmp_path: Path):
    """scripts/fashion_mnist_long.sh: trains, evaluates six test-time settings on the run's held-out images (its
    eval_size, +8 and +16 px, each with and without mirroring), picks the best, and evaluates the test set once with
    it."""
    script, env = script_command("fashion_mnist_long.sh", mnist, tmp_path)
    script.append("epochs=1")
    proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "holdout.jsonl").read_text().splitlines()]
    sizes = (32, 40, 48)  # the tiny run's eval_size=32
    assert [(r["size"], r["hflip"]) for r in rows] == [(s, f) for s in sizes for f in (False, True)]
    assert {(r["split"], r["count"]) for r in rows} == {("holdout", 12)}  # the run's val_fraction=0.25 of 48
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    best = max(rows, key=lambda r: (r["top1"], -r["size"], not r["hflip"]))
    assert (test["split"], test["count"], test["size"], test["hflip"]) == ("test", 20, best["size"], best["hflip"])
    assert (tmp_path / "run" / "confusion.png").exists()


@needs_venv
def test_long_fashion_mnist_script_final_stage_reuses_a_holdout_choice(mnist: Path, tmp_path: Path):
    """A final stage on every training image (val_fraction=0) holds out nothing: the script stops with an error
    naming HOLDOUT_FROM, and with it evaluates the test set once at the best held-out row of that file."""
    script, env = script_command("fashion_mnist_long.sh", mnist, tmp_path)
    script += ["epochs=1", "val_fraction=0", "val_split=null"]
    proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "HOLDOUT_FROM" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "run" / "best.safetensors").exists() and not (tmp_path / "run" / "test.json").exists()
    rows = [("holdout", 32, False, 80.0), ("holdout", 40, True, 90.0), ("holdout", 48, False, 90.0)]
    rows.append(("test", 48, True, 99.0))  # a test row is never a choice
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text(
        "".join(json.dumps(dict(zip(("split", "size", "hflip", "top1"), r, strict=True))) + "\n" for r in rows)
    )
    proc = subprocess.run(script, env=env | {"HOLDOUT_FROM": str(earlier)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    assert (test["split"], test["count"], test["size"], test["hflip"]) == ("test", 20, 40, True)


def test_resume_refuses_other_options(mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "run"
    train(load_recipe(RECIPE, tiny(mnist, out, epochs=1, max_steps=2)))
    with pytest.raises(ValueError, match=r"differ from it: \['lr'\]"):
        Trainer(load_recipe(RECIPE, tiny(mnist, out, epochs=1, lr=0.1)), resume=True)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", mnist)  # the same data named otherwise resumes
    for same in ("fashion-mnist", os.path.relpath(mnist)):
        assert Trainer(load_recipe(RECIPE, tiny(same, out, epochs=1)), resume=True).cfg.data == str(mnist)
    other = tmp_path / "other"
    write_mnist(other, n_train=48, n_test=20)
    with pytest.raises(ValueError, match=r"differ from it: \['data'\]"):
        Trainer(load_recipe(RECIPE, tiny(other, out, epochs=1)), resume=True)
    moved = out.rename(tmp_path / "moved")  # a run directory moved elsewhere resumes there
    assert Trainer(load_recipe(RECIPE, tiny(mnist, moved, epochs=1)), resume=True).cfg.output == str(moved)
    out = moved
    with pytest.raises(ValueError, match="not a mobilevit training state"):
        torch.save({"a": torch.zeros(1)}, out / "last.pt")
        Trainer(load_recipe(RECIPE, tiny(mnist, out, epochs=1)), resume=True)


@pytest.mark.parametrize("advanced", [False, True], ids=["paper", "advanced"])
def test_ddp_two_processes_gloo(mnist: Path, tmp_path: Path, advanced: bool):
    out = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mobilevit"]
    options = advanced_options(tmp_path) if advanced else {}
    proc = subprocess.run(
        [*cmd, "train", "--config", RECIPE, *cli_args(tiny(mnist, out, device="cpu", **options))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = read_train_state(out / "last.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"], state["ranks"][1]["rng"])  # ranks draw different dropout masks
    # 36 training images over 2 ranks: each epoch has half the single-process steps
    single = Trainer(load_recipe(RECIPE, tiny(mnist, tmp_path / "single")))
    assert state["step"] <= 2 * math.ceil(single.steps_per_epoch / 2) + 2
    # validation was reduced over both ranks: it equals a single-process evaluation of the same weights
    ckpt = read_checkpoint(out / "best.safetensors")
    model = create_model("mobilevit_xxs", weights=ckpt)
    val = build_dataset(mnist, "train", EvalTransform(32, 32)).subset(build_val_indices(mnist))
    loader = torch.utils.data.DataLoader(val, batch_sampler=eval_batches(len(val), 16), collate_fn=collate)
    assert evaluate(model, loader, torch.device("cpu")).top1 == pytest.approx(ckpt.meta["training"]["val_top1"])
