#!/usr/bin/env bash
# The full CPU inference comparison of the OpenVINO issue, in three `mobilevit bench` runs:
#   classifiers XXS / XS / S at 256x256, batches 1 and 8;
#   DeepLabv3 segmentation XXS / XS / S at 512x512, batch 1;
#   SSDLite detection XXS / XS / S at 320x320, batches 1 and 8;
# each with every implementation available for its task (ours: eager, deploy, compile, TorchScript, ONNX, ONNX int8,
# OpenVINO fp32 / bf16 (where the CPU has native bf16) / int8, ExecuTorch; the peers' eager, torch.compile, ONNX and
# OpenVINO paths), all rows of one (model, batch) timed in the same interleaved blocks, with the fp32 / bf16 / int8
# arithmetic floors measured at the start of each run. Each run prints its table, the best-peer summary and notes.
# Writes $OUT/inference_speed_cpu_<date>.md (the three outputs) and .json ({"classification": ..., "segmentation":
# ..., "detection": ...}, each what `mobilevit bench --json` writes).
#
# Usage: bash benchmarks/cpu_inference.sh [OUT_DIR]        (default docs/results)
# Run it alone on a quiet machine: it takes hours (torch.compile alone is about a minute per model, batch and
# library). tcmalloc is preloaded when installed (Debian: libgoogle-perftools4), for every implementation alike.
# Knobs (environment): THREADS (2), WARMUP (5), REPEATS (20), IMPL (comma-separated; default: all available),
# CLS_MODELS / SEG_MODELS / DET_MODELS (comma-separated; empty skips that run), CLS_SIZE (256), SEG_SIZE (512),
# DET_SIZE (320), CLS_BATCHES (1,8), SEG_BATCHES (1), DET_BATCHES (1,8), DATE (today, UTC).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results}
MV=${MOBILEVIT:-.venv/bin/mobilevit}
PY=${PYTHON:-.venv/bin/python}
DATE=${DATE:-$(date -u +%Y-%m-%d)}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-5}
REPEATS=${REPEATS:-20}
CLS_MODELS=${CLS_MODELS-mobilevit_xxs,mobilevit_xs,mobilevit_s}
SEG_MODELS=${SEG_MODELS-mobilevit_xxs_deeplabv3,mobilevit_xs_deeplabv3,mobilevit_s_deeplabv3}
DET_MODELS=${DET_MODELS-mobilevit_xxs_ssdlite,mobilevit_xs_ssdlite,mobilevit_s_ssdlite}
mkdir -p "$OUT"
MD="$OUT/inference_speed_cpu_$DATE.md"
JSON="$OUT/inference_speed_cpu_$DATE.json"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

TCMALLOC=$(ls /usr/lib/*/libtcmalloc.so.4 2>/dev/null | head -1 || true)
if [ -n "$TCMALLOC" ]; then
  export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
else
  echo "tcmalloc not found (apt-get install libgoogle-perftools4): running on the C library's malloc" >&2
fi
export OMP_NUM_THREADS=$THREADS

run() {  # run TASK MODELS SIZE BATCHES
  local task=$1 models=$2 size=$3 batches=$4
  [ -n "$models" ] || return 0
  local cmd=("$MV" bench --models "$models" --size "$size" --batch-sizes "$batches" --threads "$THREADS"
    --warmup "$WARMUP" --repeats "$REPEATS" --json "$TMP/$task.json")
  [ -z "${IMPL:-}" ] || cmd+=(--impl "$IMPL")
  {
    echo "## ${task^}, ${size}x${size}"
    echo
    echo "    ${cmd[*]}"
    echo
    echo "Load average before this run (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)."
    echo
    "${cmd[@]}"
    echo
  } | tee -a "$MD"
}

{
  echo "# MobileViT inference speed on CPU: ours and the peers' best paths"
  echo
  echo "Written by \`bash benchmarks/cpu_inference.sh\` on $DATE (UTC); $THREADS threads, $WARMUP warm-up calls, median"
  echo "of $REPEATS timed calls; LD_PRELOAD=${LD_PRELOAD:-none}. How rows, floors and the summary are measured:"
  echo "docs/benchmarks.md and \`mobilevit bench --help\`. Every table names the CPU and its flags."
  echo
} > "$MD"
run classification "$CLS_MODELS" "${CLS_SIZE:-256}" "${CLS_BATCHES:-1,8}"
run segmentation "$SEG_MODELS" "${SEG_SIZE:-512}" "${SEG_BATCHES:-1}"
run detection "$DET_MODELS" "${DET_SIZE:-320}" "${DET_BATCHES:-1,8}"

"$PY" - "$TMP" "$JSON" "$DATE" <<'EOF'
import json, sys
from pathlib import Path

tmp, out, date = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
runs = {task: json.loads((tmp / f"{task}.json").read_text())
        for task in ("classification", "segmentation", "detection") if (tmp / f"{task}.json").exists()}
out.write_text(json.dumps({"date": date, "script": "benchmarks/cpu_inference.sh"} | runs, indent=2))
print(f"wrote {out} ({', '.join(runs)})", file=sys.stderr)
EOF
echo "wrote $MD" >&2
