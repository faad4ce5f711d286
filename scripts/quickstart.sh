#!/usr/bin/env bash
# The README's main job: set up a venv, train MobileViT-XXS on Fashion-MNIST (the bundled default recipe),
# evaluate it on the 10,000 test images, and draw a confusion matrix and sample predictions.
# Re-running continues an interrupted run (--resume) instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

out=${OUTPUT:-runs/fashion_mnist}
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
.venv/bin/mobilevit train --config mobilevit_xxs_fashion_mnist "${resume[@]}" data="$data" output="$out" "$@"
.venv/bin/mobilevit eval --weights "$out/best.safetensors" --data "$data" --split test \
  --confusion "$out/confusion.png" --samples "$out/samples.png"
echo "checkpoint: $out/best.safetensors (try: .venv/bin/mobilevit predict IMAGE --weights $out/best.safetensors)"
