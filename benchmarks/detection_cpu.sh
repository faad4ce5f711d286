#!/usr/bin/env bash
# SSDLite-MobileViT inference speed on CPU at 320x320 (the paper's COCO size), batches 1 and 8, 2 threads:
# ours (eager), ours deploy(), ours ONNX Runtime, against torchvision's SSDLite320-MobileNetV3-Large (another
# architecture, random weights) eager and in ONNX Runtime, all timed in the same interleaved blocks.
# Every row times the network forward only (up to every anchor's decoded box and class probabilities), except
# the +post rows: deploy+post, onnx+post (NMS in the graph) and tv-ssdlite+post run the whole eval forward with
# each library's own post-processing, on detectors calibrated to pass ~1000 (anchor, class) scores per image
# through their score threshold (see mobilevit.deployment.bench). Exports are made before timing.
# Usage: bash benchmarks/detection_cpu.sh [OUT_DIR]   (writes detection_speed_cpu.{md,json})
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results}
MV=${MOBILEVIT:-.venv/bin/mobilevit}
mkdir -p "$OUT"
CMD=("$MV" bench --models mobilevit_xxs_ssdlite,mobilevit_xs_ssdlite,mobilevit_s_ssdlite --size 320
  --batch-sizes 1,8 --threads 2 --impl tv-ssdlite,tv-ssdlite-onnx,tv-ssdlite+post,ours,deploy,onnx,deploy+post,onnx+post
  --warmup 2 --repeats 6 --json "$OUT/detection_speed_cpu.json")
{
  echo "# SSDLite-MobileViT inference speed, CPU, 320x320"
  echo
  echo "Written by \`bash benchmarks/detection_cpu.sh\` on $(date -u +%Y-%m-%d) (UTC); command:"
  echo
  echo "    ${CMD[*]}"
  echo
  echo "Load average before the run (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)."
  echo "Other processes may have been using this machine's CPUs: the load average in the header below is"
  echo "measured at the end of the run; all rows of one model and batch are timed in the same interleaved blocks."
  echo
  echo "Rows without +post: the network forward only, up to every anchor's decoded box and softmax class"
  echo "probabilities (what the exported ONNX file outputs; torchvision's: its normalisation, backbone, head,"
  echo "anchors and box decoding, without its resize). +post rows: the whole eval forward to detections with each"
  echo "library's own post-processing (ours: score > 0.05, per-class NMS 0.5, 200 per class; onnx+post: the same"
  echo "with ONNX NonMaxSuppression in the graph; torchvision's: resize, score > 0.001, 300 candidates per class,"
  echo "NMS 0.55, 300 per image), random weights calibrated so that ~1000 (anchor, class) scores per image pass"
  echo "each model's threshold. Speed-ups are against tv-ssdlite (torchvision's network forward, eager)."
  echo
  "${CMD[@]}"
} | tee "$OUT/detection_speed_cpu.md"
