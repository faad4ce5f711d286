#!/usr/bin/env bash
# The README's main job: set up a venv, show the model zoo, classify the bundled sample photos.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mobilevit ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e .; }
.venv/bin/mobilevit models
weights=${MOBILEVIT_WEIGHTS:-mobilevit_xxs.cvnets_in1k}
if .venv/bin/mobilevit predict examples/images --model mobilevit_xxs --weights "$weights" --topk 3; then
  exit 0
fi
echo "note: weights '$weights' are not reachable (offline?); running the same pipeline on random weights." >&2
echo "      set MOBILEVIT_WEIGHTS=/path/to/checkpoint (any supported layout) for real predictions." >&2
.venv/bin/mobilevit predict examples/images --model mobilevit_xxs --topk 3
