#!/usr/bin/env bash
# On a multi-GPU host (issue "Sweep scaling"): one sweep of 16 full-size int8 trials (random weights, 16
# optimizer steps of batch 16 each) on 4, 2 and 1 GPUs of one Ray node with 4 trials per GPU, and on 4 GPUs
# with 2 per GPU; CUDA MPS on (bench/packing.py: packed trials need it). Each configuration runs under a
# time guard, starts with an empty image-feature cache, and appends to OUT: summary.txt, trials.jsonl
# (bench/sweep_summary.py), smi.csv (per-GPU utilisation and memory every 2 s), NAME.log.
set -uo pipefail
mkdir -p /tmp/site && [ -d /tmp/site/ray ] || tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RUNNER_CACHE=$PWD/.gpu/cache MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} NCCL_NVLS_ENABLE=0 RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=300 \
  CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$OUT" /tmp/logs /tmp/mps /tmp/mps-log
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b, ray, mlflow; print('torch', torch.__version__,
  'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__, 'ray',
  ray.__version__, 'mlflow', mlflow.__version__)" | tee -a "$OUT/summary.txt"
[ -f /tmp/full/config.json ] || python3 bench/full_size.py /tmp/full 2>&1 | grep -v -i warn | tail -1
nvidia-cuda-mps-control -d
SPACE='{lora_rank: {choice: [4, 8, 16]}, learning_rate: {loguniform: [1.0e-5, 1.0e-3]}, n_samples: {choice: [256]}}'
for set in ${SETS:-0,1,2,3:4:100 0:4:200 0,1:4:130 0,1,2,3:2:120}; do   # GPUs:trials per GPU:time guard (s)
  IFS=: read -r gpus per guard <<< "$set"
  n=$(echo "$gpus" | tr ',' '\n' | wc -l) name=scale-${n}gpu-${per}per
  rm -rf "$RUNNER_CACHE/image-features"
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -l 2 \
    | sed "s/^/$name, /" >> "$OUT/smi.csv" &
  smi=$!
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpus timeout "$guard" python3 -m runner.cli tune search_spaces/quickstart.yaml \
    name=$name trial.model=/tmp/full trial.data=$PWD/.gpu/easy_vqa trial.precision=int8 trial.epochs=1 \
    trial.batch_size=16 trial.max_eval_examples=32 trial.eval_batch_size=32 "space=$SPACE" num_samples=16 \
    scheduler.type=none resources.gpu=$(python3 -c "print(1/$per)") resources.cpu=3 \
    storage_path=/tmp/ray-$name tracking_uri=sqlite:////tmp/mlruns.db --no-promote > /tmp/logs/$name.log 2>&1
  rc=$?
  echo "$name: GPUs $gpus, $per trials per GPU: rc $rc wall $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  kill $smi
  python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # nothing of a cut-short sweep lingers on the GPUs
  python3 bench/sweep_summary.py sqlite:////tmp/mlruns.db $name 2>/dev/null | sed "s/^{/{\"sweep\": \"$name\", /" \
    >> "$OUT/trials.jsonl"
  grep -v -i "warn\|Loading weights\|MatMul8bitLt" /tmp/logs/$name.log | tail -c 200000 > "$OUT/$name.log"
done
echo quit | nvidia-cuda-mps-control
