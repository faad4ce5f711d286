#!/usr/bin/env bash
# int8 (OpenVINO + NNCF, the library's default settings) of the dense demo models: mIoU and mAP before and after,
# on the 500 validation scenes (what any choice may look at) and the 1,000 test scenes (once per file).
# Calibration: 512 training scenes (never evaluated). Each model is evaluated three times: its weights in PyTorch,
# the fp32 IR and the int8 IR (`mobilevit eval` runs exported files through `load_exported`).
# Usage (weights from benchmarks/segmentation_scenes.sh and benchmarks/detection_scenes.sh, "ours" rows):
#   bash benchmarks/int8_dense_scenes.sh SEG_WEIGHTS DET_WEIGHTS SCENES [OUT=runs/int8_dense]
# Writes OUT/{seg,det}{,.int8}.{xml,bin}, OUT/<file>.<split>.json and OUT/results.json; prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
seg=$1 det=$2 scenes=$3 out=${4:-runs/int8_dense}
mv=${MOBILEVIT:-.venv/bin/mobilevit}
mkdir -p "$out"

for task in seg det; do
  weights=$([ $task = seg ] && echo "$seg" || echo "$det")
  thresh=$([ $task = det ] && echo "--score-thresh 0.1" || true)  # the detection demo's evaluation threshold
  $mv export --weights "$weights" --format openvino -o "$out/$task.xml"
  $mv export --weights "$weights" --format openvino --precision int8 --calibration "$scenes" -o "$out/$task.int8.xml"
  for target in "$weights" "$out/$task.xml" "$out/$task.int8.xml"; do
    for split in val test; do
      # shellcheck disable=SC2086
      $mv eval --weights "$target" --data "$scenes" --split $split --json $thresh > "$out/$task.$(basename "$target").$split.json"
    done
  done
done

.venv/bin/python - "$out" "$seg" "$det" <<'PY'
import json, sys
from pathlib import Path

out, weights = Path(sys.argv[1]), {"seg": Path(sys.argv[2]), "det": Path(sys.argv[3])}
metric = {"seg": ("miou", "mIoU (%)"), "det": ("map", "mAP")}
rows = []
print("| model | metric | split | PyTorch | OpenVINO fp32 | OpenVINO int8 | int8 - fp32 |")
print("|---|---|---|---:|---:|---:|---:|")
for task, w in weights.items():
    key, name = metric[task]
    for split in ("val", "test"):
        got = {form: json.loads((out / f"{task}.{file}.{split}.json").read_text())[key]
               for form, file in (("pytorch", w.name), ("fp32", f"{task}.xml"), ("int8", f"{task}.int8.xml"))}
        rows.append({"task": task, "metric": key, "split": split, **got, "int8_minus_fp32": got["int8"] - got["fp32"]})
        print(f"| {'DeepLabv3' if task == 'seg' else 'SSDLite'}-MobileViT-XXS | {name} | {split} | {got['pytorch']:.2f} "
              f"| {got['fp32']:.2f} | {got['int8']:.2f} | {got['int8'] - got['fp32']:+.2f} |")
(out / "results.json").write_text(json.dumps(rows, indent=2))
PY
