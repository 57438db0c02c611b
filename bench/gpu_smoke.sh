#!/usr/bin/env bash
# On the GPU host (see ../shared/gpu-host/README.md): one short int8 trial of the tiny model on CUDA, then
# the full-size blip2-flan-t5-xl architecture (random weights) loaded in int8 for a few training steps.
# Expects .gpu/site.tar.xz (packages), .gpu/cache (the built tiny model), .gpu/easy_vqa (data subset).
set -euo pipefail
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RUNNER_CACHE=$PWD/.gpu/cache MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, ray, mlflow; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'ray', ray.__version__, 'mlflow', mlflow.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
echo "== tiny model, int8, CUDA"
python3 -m runner.cli train --task easy_vqa --data .gpu/easy_vqa --model tiny --precision int8 --lr 3e-3 \
  --n-samples 2000 --epochs 2 --batch-size 32 --max-eval-examples 300 --output /tmp/tiny-int8 2>&1 \
  | grep -v -i warn | tee "$OUT/tiny_int8.log"
echo "== full-size blip2-flan-t5-xl architecture, random weights, int8"
python3 bench/full_size.py /tmp/full 2>&1 | grep -v -i warn | tail -2 | tee "$OUT/full_build.log"
python3 -m runner.cli train --task easy_vqa --data .gpu/easy_vqa --model /tmp/full --precision int8 \
  --n-samples 256 --batch-size 8 --epochs 1 --max-eval-examples 64 --eval-batch-size 32 --output /tmp/full-int8 \
  2>&1 | grep -v -i warn | tee "$OUT/full_int8.log"
cp /tmp/full-int8/epoch-001/metrics.json "$OUT/full_int8_metrics.json"
