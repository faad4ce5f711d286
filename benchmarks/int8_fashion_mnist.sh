#!/usr/bin/env bash
# int8 post-training quantization of the Fashion-MNIST model (README main job): accuracy on the 10,000
# test images before and after, and ONNX Runtime speed fp32 vs int8. Usage (after `bash scripts/quickstart.sh`):
#   bash benchmarks/int8_fashion_mnist.sh [runs/fashion_mnist/best.safetensors] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/fashion_mnist/best.safetensors}
OUT=${2:-runs/int8}
MV=${MOBILEVIT:-.venv/bin/mobilevit}
mkdir -p "$OUT"
SIZE=$(.venv/bin/python -c "import mobilevit as m; print(m.model_transform(m.create_model('mobilevit_xxs', weights='$W')).crop_size)")
$MV export --weights "$W" --format onnx --dynamic -o "$OUT/fm.onnx"
$MV export --weights "$W" --format onnx --precision int8 --calibration fashion-mnist --calibration-images 512 -o "$OUT/fm.int8.onnx"
for target in "$W" "$OUT/fm.onnx" "$OUT/fm.int8.onnx"; do  # the weights, then the exported files
  echo "== $target"; $MV eval --weights "$target" --data fashion-mnist --split test --json | tee "$OUT/$(basename "$target").json"
done
$MV bench --models mobilevit_xxs --size "$SIZE" --batch-sizes 1,64 --impl onnx,onnx-int8,deploy --repeats 30 | tee "$OUT/speed.md"
