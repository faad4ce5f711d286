#!/usr/bin/env bash
# The README's main job: set up a venv, train MobileViT-XXS on Fashion-MNIST (the bundled default recipe),
# evaluate it on the 10,000 test images, and draw a confusion matrix and sample predictions.
# Re-running continues an interrupted run (--resume) instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mobilevit ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e .; }

data=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if ! ls "$data"/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST not found in $data: installing the Debian package dataset-fashion-mnist" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi

out=${OUTPUT:-runs/fashion_mnist}
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
.venv/bin/mobilevit train --config mobilevit_xxs_fashion_mnist data="$data" output="$out" "${resume[@]}" "$@"
.venv/bin/mobilevit eval --weights "$out/best.safetensors" --data "$data" --split test \
  --confusion "$out/confusion.png" --samples "$out/samples.png"
echo "checkpoint: $out/best.safetensors (try: .venv/bin/mobilevit predict IMAGE --weights $out/best.safetensors)"
