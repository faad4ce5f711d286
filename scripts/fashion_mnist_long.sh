#!/usr/bin/env bash
# The long Fashion-MNIST run (target >= 95% test top-1): MobileViT-XS, bundled recipe mobilevit_xs_fashion_mnist_long
# (100 epochs at 64 px, 7-12 hours on 2 CPU cores). Re-running resumes exactly, so the run may span sessions.
# Once trained, the test-time size (the run's eval_size, +8 and +16 px: 64/72/80 by default) and mirroring are
# chosen on the 6,000 held-out training images, then the test set is evaluated once with that choice. Writes, in
# OUTPUT (default runs/fashion_mnist_long): holdout.jsonl (every held-out evaluation), test.json, confusion.png,
# samples.png, besides the run's own files.
# A final stage trained on every training image (val_fraction=0 val_split=null) has no held-out images of its own:
# HOLDOUT_FROM names the holdout.jsonl (or docs/results eval.jsonl) of the run it continues, whose choice it reuses.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

out=${OUTPUT:-runs/fashion_mnist_long}
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
.venv/bin/mobilevit train --config mobilevit_xs_fashion_mnist_long "${resume[@]}" data="$data" output="$out" "$@"

# the images this run held out (its val_fraction and seed) and its evaluation size
read -r fraction seed eval_size val_split < <(.venv/bin/python -c '
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
print(config["val_fraction"] or 0, config["seed"], config["eval_size"], config.get("val_split") or "none")
' "$out/config.yaml")
if [ "$fraction" = 0 ]; then
  if [ "$val_split" != none ]; then
    echo "error: $out validated on the $val_split split, which chose its best weights; a final stage on every" \
      "training image takes val_split=null (its last weights)" >&2
    exit 2
  fi
  if [ -z "${HOLDOUT_FROM:-}" ]; then
    echo "error: $out held out no images (val_fraction=0), so it cannot choose its test-time size: rerun with" \
      "HOLDOUT_FROM=the holdout.jsonl of the run it continues (training is done; the rerun only evaluates)" >&2
    exit 2
  fi
  holdout=$HOLDOUT_FROM
else
  holdout=$out/holdout.jsonl
  : >"$holdout.tmp"
  for size in $eval_size $((eval_size + 8)) $((eval_size + 16)); do
    for flip in "" --hflip; do
      .venv/bin/mobilevit eval --weights "$out/best.safetensors" --data "$data" --split holdout --size $size $flip \
        --val-fraction "$fraction" --seed "$seed" --json >>"$holdout.tmp"
    done
  done
  mv "$holdout.tmp" "$holdout"
fi
# the best held-out top-1; ties go to the cheaper setting (smaller size, then no mirroring)
read -r size flip < <(.venv/bin/python -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
best = max((r for r in rows if r["split"] == "holdout"), key=lambda r: (r["top1"], -r["size"], not r["hflip"]))
print(best["size"], "--hflip" if best["hflip"] else "")
' "$holdout")
echo "chosen on the held-out images ($holdout): ${size} px ${flip:-without mirroring}"
.venv/bin/mobilevit eval --weights "$out/best.safetensors" --data "$data" --split test --size "$size" $flip --json \
  --confusion "$out/confusion.png" --samples "$out/samples.png" | tee "$out/test.json"
