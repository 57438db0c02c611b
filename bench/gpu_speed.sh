#!/usr/bin/env bash
# On one GPU: the speed benchmark (reference vs ours; int8 and bf16 at several batch sizes; generation)
# and packing (1, 2, 4 int8 trials sharing the card), GPU utilisation sampled every second.
set -uo pipefail
mkdir -p /tmp/site && [ -d /tmp/site/ray ] || tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RUNNER_CACHE=$PWD/.gpu/cache MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
  transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/gpu.txt"
[ -f /tmp/full/config.json ] || python3 bench/full_size.py /tmp/full 2>&1 | grep -v -i warn | tail -1
quiet() { grep -v -i "warn\|Loading weights\|MatMul8bitLt\|^ *$"; }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/smi_speed.csv" &
smi=$!
echo "== speed"; start=$(date +%s)
[ -n "${SKIP_SPEED:-}" ] || timeout ${SPEED_GUARD:-500} python3 bench/speed.py /tmp/full $PWD/.gpu/easy_vqa "$OUT" 2>&1 | quiet | tee "$OUT/speed.log" | tail -20
echo "speed: $(( $(date +%s) - start )) s"; kill $smi
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/smi_packing.csv" &
smi=$!
echo "== packing"; start=$(date +%s)
[ -n "${SKIP_PACKING:-}" ] || timeout ${PACKING_GUARD:-200} python3 bench/packing.py /tmp/full $PWD/.gpu/easy_vqa "$OUT" \
  2>&1 | quiet | tee "$OUT/packing.log" | tail -8
echo "packing: $(( $(date +%s) - start )) s"; kill $smi
if [ -n "${WITH_MPS:-}" ]; then  # the same packing with CUDA MPS: kernels of the trials' processes run concurrently
  echo "== packing under MPS"; export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d && start=$(date +%s)
  timeout ${PACKING_GUARD:-200} python3 bench/packing.py /tmp/full $PWD/.gpu/easy_vqa "$OUT/mps" 2>&1 | quiet \
    | tee "$OUT/packing_mps.log" | tail -8
  echo "packing under MPS: $(( $(date +%s) - start )) s"; echo quit | nvidia-cuda-mps-control
fi
