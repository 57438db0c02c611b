#!/usr/bin/env bash
# On one GPU (issue "Sweep speed on one GPU"): the same 4-trial int8 sweep of the full-size random-weight
# BLIP-2 on VQA-RAD-like data (bench/vqa_rad_like.py through the vqa_rad local loader), 4 trials sharing the
# card at 0.25 under CUDA MPS, by today's code and by the code before this change, each with a cold node cache
# (image features and quantised weights), the whole pipeline (sweep, promotion, zero-shot, one-shot, report).
# Also the int8 path bench (bench/int8_path.py) and post-sweep scoring by batch size (bench/decode_speed.py).
# Each run's log lines are stamped with seconds since its start; GPU utilisation sampled every second.
#
#   PARTS="int8 new old" bash bench/gpu_sweep_speed.sh      # old: the code at $OLD (a `git archive` of it)
#   PARTS=decode bash bench/gpu_sweep_speed.sh              # generation batch sizes (DECODE_BATCHES)
#   SWEEP_ARGS=trial.eval_batch_size=32 PARTS=old bash ...   # more overrides for the sweeps
set -uo pipefail
source bench/gpu_env.sh
ROOT=$PWD OLD=${OLD:-$PWD/.old}

sweep() {  # $1: code tree, $2: name
  rm -rf /tmp/cache-$2 /tmp/ray-$2 /tmp/mlruns-$2 && mkdir -p /tmp/mlruns-$2
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$OUT/smi_$2.csv" &
  local smi=$! began=$(date +%s)
  (cd "$1" && RUNNER_CACHE=/tmp/cache-$2 PYTHONPATH=/tmp/site:$1 timeout ${SWEEP_GUARD:-560} python3 -m runner.cli \
    tune "$ROOT/search_spaces/vqa_rad.yaml" name=$2 trial.model=/tmp/full trial.data=/tmp/vqa-rad trial.epochs=2 \
    num_samples=1 'space={lora_rank: {grid: [8, 16]}, n_samples: {grid: [800, 1600]}}' trial.learning_rate=1e-4 \
    scheduler.type=none resources.gpu=0.25 resources.cpu=3 test_max_examples=null storage_path=/tmp/ray-$2 \
    tracking_uri=sqlite:////tmp/mlruns-$2/mlflow.db ${SWEEP_ARGS:-} 2>&1) | stamp > "$OUT/sweep_$2.log"
  echo "sweep $2: rc ${PIPESTATUS[0]}, wall $(( $(date +%s) - began )) s" | tee -a "$OUT/summary.txt"
  kill $smi
  cp /tmp/ray-$2/$2/runner.log "$OUT/runner_$2.log" 2>/dev/null
  # Where each trial's start went (a Train worker's records are in Ray Train's JSON log files only, docs/TRAPS.md):
  # "first step N s after the trial started (…)".
  grep -rh "first step" /tmp/ray/session_latest/logs/ 2>/dev/null | cut -c1-400 > "$OUT/worker_phases_$2.txt"
  cat "$OUT/worker_phases_$2.txt"
  grep -E "image features:|quantised weights|promotion:|report:|stage|test scor|sweep .*: up to|TERMINATED|ERROR|Error|cast notices" \
    "$OUT/sweep_$2.log" | cut -c1-200 | tail -30
  PYTHONPATH=/tmp/site:$1 python3 bench/sweep_summary.py sqlite:////tmp/mlruns-$2/mlflow.db $2 2>/dev/null \
    > "$OUT/trials_$2.jsonl"; cat "$OUT/trials_$2.jsonl" | cut -c1-260
}

for part in ${PARTS:-int8 new old}; do
  echo "== $part"
  case $part in
    int8) RUNNER_CACHE=/tmp/cache-int8 timeout ${INT8_GUARD:-300} python3 bench/int8_path.py /tmp/full /tmp/vqa-rad \
            "$OUT" 2>&1 | grep -v "MatMul8bitLt\|Loading weights\|Writing model" | tee "$OUT/int8_path.log" | tail -14 ;;
    decode) RUNNER_CACHE=/tmp/cache-decode timeout ${DECODE_GUARD:-400} python3 bench/decode_speed.py /tmp/full \
              /tmp/vqa-rad int8 ${DECODE_BATCHES:-32 64 128 256} 2>&1 | grep -v "MatMul8bitLt\|Loading weights" \
              | tee "$OUT/decode_speed.log" | tail -9 ;;
    new) sweep "$ROOT" new ;;
    old) sweep "$OLD" old ;;
  esac
done
echo quit | nvidia-cuda-mps-control
