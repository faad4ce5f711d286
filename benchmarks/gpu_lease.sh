#!/usr/bin/env bash
# One call on a lent GPU (device tool, about 8 minutes) for the GPU parts of issues 19 and 20:
#   1. batches of Fashion-MNIST made per image on the host vs on the device (benchmarks/device_data.py);
#   2. 300 training steps of the XS 64 px recipe without and with data_on_device, nvidia-smi dmon logging how busy
#      the GPU is (issue 20: "an epoch bound by the model, not the host");
#   3. inference latency, ours vs timm's best path, eager / torch.compile, fp32 / fp16 / bf16, batches 1 and 128
#      (benchmarks/gpu_inference.py; issue 19).
# Fashion-MNIST travels with the call: here, `mkdir -p runs && cp -r /usr/share/datasets/fashion-mnist runs/fm`
# (30 MB; runs/ is ignored by git), then run(command="bash benchmarks/gpu_lease.sh runs/fm $OUT", carry=["runs/fm"]).
set -uo pipefail
data=${1:?directory of the Fashion-MNIST IDX files}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
workers=3
if [ "$(df -m --output=avail /dev/shm | tail -1)" -lt 4096 ]; then
  mount -o remount,size=16G /dev/shm 2>/dev/null || workers=0
fi
echo "workers=$workers"

timeout 90 python3 benchmarks/device_data.py --data "$data" --device cuda --workers "$workers" --batches 300 \
  | tee "$out/device_data.txt"

for on in false true; do
  nvidia-smi dmon -s u -d 1 > "$out/dmon_data_on_device_$on.txt" &
  dmon=$!
  start=$SECONDS
  timeout 150 python3 -m mobilevit train --config mobilevit_xxs_fashion_mnist_full model=mobilevit_xs data="$data" \
    base_size=64 min_size=48 max_size=80 eval_resize=64 eval_size=64 epochs=100 max_steps=300 workers=$workers \
    data_on_device=$on progress=false tensorboard=false output="$out/train_data_on_device_$on" 2>&1 | tail -3
  echo "data_on_device=$on: $((SECONDS - start)) s for 300 steps (with start-up)"
  kill $dmon
  awk '$1 != "#" {s += $2; n++} END {if (n) printf "GPU busy %.0f%% of %d samples\n", s / n, n}' \
    "$out/dmon_data_on_device_$on.txt"
done

timeout 330 python3 benchmarks/gpu_inference.py --budget 270 --json "$out/gpu_inference.json" 2>&1 \
  | grep -v Warning | tee "$out/gpu_inference.txt"
echo "total ${SECONDS} s"
