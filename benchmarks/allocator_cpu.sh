#!/usr/bin/env bash
# Inference speed under glibc's malloc and under tcmalloc, same machine, one after the other: the peers'
# batch-8 times depend on the allocator more than on the model code (docs/benchmarks.md, "The memory allocator (CPU)").
# Needs the Debian package libgoogle-perftools4 (tcmalloc). Usage: bash benchmarks/allocator_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results}
MV=${MOBILEVIT:-.venv/bin/mobilevit}
TCMALLOC=$(ls /usr/lib/*/libtcmalloc.so.4 2>/dev/null | head -1)
[ -n "$TCMALLOC" ] || { echo "tcmalloc not found: apt-get install libgoogle-perftools4" >&2; exit 1; }
env -u LD_PRELOAD "$MV" bench --impl timm,deploy,onnx --json "$OUT/inference_speed_cpu_glibc.json" | tee "$OUT/inference_speed_cpu_glibc.md"
LD_PRELOAD=$TCMALLOC "$MV" bench --impl timm,deploy,compile,onnx,executorch \
  --json "$OUT/inference_speed_cpu_tcmalloc.json" | tee "$OUT/inference_speed_cpu_tcmalloc.md"
# training steps (ours and timm under one loop) at the Fashion-MNIST recipe's 64 px, batch 128
for alloc in glibc tcmalloc; do
  preload=""; [ $alloc = tcmalloc ] && preload=$TCMALLOC
  env -u LD_PRELOAD ${preload:+LD_PRELOAD=$preload} .venv/bin/python benchmarks/train_throughput.py --device cpu \
    --threads 2 --batch-size 128 --image-size 64 --steps 10 --json "$OUT/train_throughput_cpu_64px_$alloc.json"
done
