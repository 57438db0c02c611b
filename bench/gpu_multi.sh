#!/usr/bin/env bash
# On a multi-GPU host: the same quick-start sweep (8 trials, 0.5 GPU each) on 4, 2 and 1 GPUs of the host,
# one Ray node, each under a time guard; per-GPU utilisation and memory sampled every 2 s.
set -uo pipefail
mkdir -p /tmp/site && [ -d /tmp/site/ray ] || tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RUNNER_CACHE=$PWD/.gpu/cache MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/multi_gpus.txt"
for set in ${GPU_SETS:-0,1,2,3:130 0,1:170 0:260}; do   # GPUs:time guard (s)
  gpus=${set%%:*} guard=${set##*:}
  n=$(echo $gpus | tr ',' '\n' | wc -l)
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/smi_${n}gpu.csv" &
  smi=$!
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpus timeout $guard python3 -m runner.cli tune search_spaces/quickstart.yaml \
    name=gpus-$n trial.data=$PWD/.gpu/easy_vqa trial.precision=int8 trial.epochs=2 resources.gpu=0.5 \
    resources.cpu=2 num_samples=8 storage_path=/tmp/ray-$n tracking_uri=sqlite:////tmp/mlruns-$n.db --no-promote \
    > "$OUT/sweep_${n}gpu.log" 2>&1
  echo "$n GPU(s): rc $? wall $(( $(date +%s) - start )) s" | tee -a "$OUT/multi_summary.txt"
  kill $smi
  grep -A12 "^trial " "$OUT/sweep_${n}gpu.log" | tail -10
done
