#!/usr/bin/env bash
# The README's segmentation demo and its peer, on the same Fashion-MNIST scenes, with the same loop, recipe and
# initialisation policy: each segmentation model starts from a classifier that the same loop trained on
# Fashion-MNIST with the same recipe and number of steps (the paper's protocol: classification, then segmentation).
#   ours: DeepLabv3-MobileViT-XXS, backbone from MobileViT-XXS
#   peer: torchvision lraspp_mobilenet_v3_large (LR-ASPP), backbone from torchvision mobilenet_v3_large
# Usage: bash benchmarks/segmentation_scenes.sh [OUT=runs/segmentation_demo]
# Writes OUT/{scenes, fm_xxs, fm_mnv3, ours, peer} and OUT/results.json (test mIoU, parameters, wall times).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the README's runs: one thread each (the machine was shared)
out=${1:-runs/segmentation_demo}
mv=.venv/bin/mobilevit
mkdir -p "$out"

[ -f "$out/scenes/labels.txt" ] || $mv data scenes "$out/scenes"

# 1. Fashion-MNIST classifiers: the bundled recipe's 4-epoch schedule, stopped after its first 2 epochs
#    (727 steps: the multi-scale sampler gives 363 + 364 batches), each chosen on the held-out images.
classifier() {  # NAME MODEL
  [ -f "$out/$1/best.safetensors" ] && return
  $mv train --config mobilevit_xxs_fashion_mnist model="$2" epochs=4 max_steps=727 output="$out/$1" progress=false
}
classifier fm_xxs mobilevit_xxs
classifier fm_mnv3 torchvision:mobilenet_v3_large

# 2. Segmentation: the same recipe for both (mobilevit_xxs_deeplabv3_scenes), timed.
segment() {  # NAME MODEL BACKBONE
  [ -f "$out/$1/best.safetensors" ] && return
  local start=$SECONDS
  $mv train --config mobilevit_xxs_deeplabv3_scenes model="$2" weights="$out/$3/best.safetensors" \
    data="$out/scenes" output="$out/$1" progress=false
  echo $((SECONDS - start)) > "$out/$1/wall_seconds.txt"
}
segment ours mobilevit_xxs_deeplabv3 fm_xxs
segment peer torchvision:lraspp_mobilenet_v3_large fm_mnv3

# 3. The test scenes, evaluated once per model (weights chosen on the validation scenes).
for name in ours peer; do
  $mv eval --weights "$out/$name/best.safetensors" --data "$out/scenes" --split test --json \
    --samples "$out/$name/test_samples.png" > "$out/$name/test.json"
done
.venv/bin/python - "$out" <<'EOF'
import json, sys
from pathlib import Path
from mobilevit import create_model
from mobilevit.models.flops import count_params

out = Path(sys.argv[1])
rows = {}
for name, model in (("ours", "mobilevit_xxs_deeplabv3"), ("peer", "torchvision:lraspp_mobilenet_v3_large")):
    test = json.loads((out / name / "test.json").read_text())
    rows[name] = {
        "model": model,
        "params": count_params(create_model(model, num_classes=len(test["iou"]))),
        "test_miou": test["miou"],
        "test_pixel_acc": test["pixel_acc"],
        "train_seconds": int((out / name / "wall_seconds.txt").read_text()),
    }
(out / "results.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
EOF
