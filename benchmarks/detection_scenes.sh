#!/usr/bin/env bash
# The README's detection demo and its peer, on the same Fashion-MNIST scenes, with the same loop, recipe and
# initialisation policy: each detector starts from a classifier that the same loop trained on Fashion-MNIST with
# the same recipe and number of steps (the paper's protocol: classification, then detection).
#   ours: SSDLite-MobileViT-XXS, backbone from MobileViT-XXS
#   peer: torchvision ssdlite320_mobilenet_v3_large, backbone from torchvision mobilenet_v3_large
# Both see the scenes at their own 128x128 size (the peer's fixed 320x320 resize follows the input size).
# Usage: bash benchmarks/detection_scenes.sh [OUT=runs/detection_demo]
# Writes OUT/{scenes, fm_xxs, fm_mnv3, det_ours, det_peer} and OUT/detection_results.json (test mAP, parameters,
# wall times). The scenes and classifiers are shared with benchmarks/segmentation_scenes.sh (same OUT: reused).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the README's runs: one thread each, both runs side by side
out=${1:-runs/detection_demo}
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

# 2. Detection: the same recipe for both (mobilevit_xxs_ssdlite_scenes), timed, side by side.
detect() {  # NAME MODEL BACKBONE [OVERRIDES...]
  [ -f "$out/$1/best.safetensors" ] && return
  local start=$SECONDS
  $mv train --config mobilevit_xxs_ssdlite_scenes model="$2" weights="$out/$3/best.safetensors" \
    data="$out/scenes" output="$out/$1" progress=false "${@:4}"
  echo $((SECONDS - start)) > "$out/$1/wall_seconds.txt"
}
detect det_ours mobilevit_xxs_ssdlite fm_xxs &
detect det_peer torchvision:ssdlite320_mobilenet_v3_large fm_mnv3 "model_overrides={}" &  # its own anchors
wait

# 3. The test scenes, evaluated once per model (weights chosen on the validation scenes).
for name in det_ours det_peer; do
  $mv eval --weights "$out/$name/best.safetensors" --data "$out/scenes" --split test --json \
    --samples "$out/$name/test_samples.png" --score-thresh 0.1 > "$out/$name/test.json"
done
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
from mobilevit import create_model
from mobilevit.models.flops import count_params

out = Path(sys.argv[1])
rows = {}
for name, model in (("det_ours", "mobilevit_xxs_ssdlite"), ("det_peer", "torchvision:ssdlite320_mobilenet_v3_large")):
    test = json.loads((out / name / "test.json").read_text())
    rows[name] = {
        "model": model,
        "params": count_params(create_model(model, num_classes=len(test["ap"]) + 1)),
        **{k: test[k] for k in ("map", "map50", "map75", "map_small", "map_medium", "map_large")},
        "train_seconds": int((out / name / "wall_seconds.txt").read_text()),
    }
(out / "detection_results.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PY
