#!/usr/bin/env bash
# DeepLabv3-MobileViT inference speed on CPU at 512x512 (the paper's PASCAL VOC size), batch 1, 2 threads:
# ours (eager), ours deploy(), ours ONNX Runtime, each at patch sizes (2,2,2) and (8,4,2), against Hugging Face's
# MobileViTForSemanticSegmentation (same architecture, random weights, logits upsampled to 512 as ours are) and
# torchvision's DeepLabv3 / LR-ASPP MobileNetV3-Large (random weights), all timed in the same blocks.
# The first ONNX row of each model includes no export time (files are exported before timing; ~30 s each here).
# Usage: bash benchmarks/segmentation_cpu.sh [OUT_DIR]   (writes segmentation_speed_cpu.{md,json})
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results}
MV=${MOBILEVIT:-.venv/bin/mobilevit}
mkdir -p "$OUT"
CMD=("$MV" bench --models mobilevit_xxs_deeplabv3,mobilevit_xs_deeplabv3,mobilevit_s_deeplabv3 --size 512
  --batch-sizes 1 --threads 2 --impl hf,tv-deeplabv3,tv-lraspp,ours,deploy,onnx --patch-sizes 2,2,2 8,4,2
  --warmup 2 --repeats 6 --json "$OUT/segmentation_speed_cpu.json")
{
  echo "# DeepLabv3-MobileViT inference speed, CPU, 512x512"
  echo
  echo "Written by \`bash benchmarks/segmentation_cpu.sh\` on $(date -u +%Y-%m-%d) (UTC); command:"
  echo
  echo "    ${CMD[*]}"
  echo
  echo "Load average before the run (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)."
  echo "Other processes may have been using this machine's CPUs: the load average in the header below is"
  echo "measured at the end of the run; all rows of one model are timed in the same interleaved blocks."
  echo
  "${CMD[@]}"
} | tee "$OUT/segmentation_speed_cpu.md"
