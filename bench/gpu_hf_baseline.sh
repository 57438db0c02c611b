#!/usr/bin/env bash
# On one GPU (issue "Sweep speed on one GPU"): the field's way of the same 4-trial int8 sweep as
# bench/gpu_sweep_speed.sh — HF Trainer.hyperparameter_search(backend="ray"), bench/hf_baseline.py — on the same
# full-size random-weight BLIP-2 (/tmp/full) and VQA-RAD-like data (/tmp/vqa-rad), 4 trials sharing the card at
# 0.25 under CUDA MPS, 3 CPUs each. Log lines stamped with seconds since its start; GPU utilisation and memory
# sampled every second ($OUT/smi_hf.csv); GPU busy over the trials' window and the wall time in $OUT/summary.txt.
# Bounded for a 10-minute command: the bench gets min(HF_GUARD, BUDGET - time already spent) seconds.
#
#   bash bench/gpu_hf_baseline.sh                    # HF_GUARD=560 BUDGET=590 (seconds) by default
#   PARTS="hf new" bash bench/gpu_hf_baseline.sh     # also our sweep in the same call (bench/gpu_sweep_speed.sh's
#                                                    # `new`); only with a longer budget than one 10-minute command
set -uo pipefail
t0=$(date +%s)
source bench/gpu_env.sh
export TOKENIZERS_PARALLELISM=false
trap 'echo quit | nvidia-cuda-mps-control' EXIT

gpu_busy() {  # mean GPU utilisation over the trials' window (first trial start -> last trial end) and overall
  python3 - "$OUT" <<'EOF'
import datetime, json, sys
out = sys.argv[1]
samples = []
for line in open(f"{out}/smi_hf.csv"):
    parts = [part.strip() for part in line.split(",")]
    try:  # nvidia-smi's timestamp is local time, as time.time() read back through datetime
        when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        samples.append((when, float(parts[1].split()[0]), float(parts[2].split()[0]) / 1024))
    except (ValueError, IndexError):
        continue
try:
    trials = json.load(open(f"{out}/hf/hf_baseline.json"))["trials"]
    low, high = min(t["started"] for t in trials), max(t["ended"] for t in trials)
except (OSError, ValueError, KeyError):
    low, high = float("-inf"), float("inf")
window = [s for s in samples if low <= s[0] <= high]
mean = lambda rows: sum(r[1] for r in rows) / max(len(rows), 1)
print(f"GPU busy: {mean(window):.0f}% over the trials' window ({len(window)} samples), {mean(samples):.0f}% over "
      f"the whole bench ({len(samples)} samples); GPU memory used at most {max((s[2] for s in samples), default=0):.1f} GiB")
EOF
}

hf() {
  local left=$(( ${BUDGET:-590} - ($(date +%s) - t0) - 20 )) guard=${HF_GUARD:-560}  # 20: SIGINT -> SIGKILL grace
  [ "$left" -lt "$guard" ] && guard=$left
  echo "hf baseline: guard $guard s"
  rm -rf /tmp/hf-baseline-ray /tmp/ray-hf-baseline "$OUT/hf"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$OUT/smi_hf.csv" &
  local smi=$! began=$(date +%s)
  # SIGINT: Tune ends the run cleanly (ray/tune/tune.py _setup_signal_catching) and the bench writes what it has
  timeout -s INT -k 20 "$guard" python3 bench/hf_baseline.py /tmp/full /tmp/vqa-rad "$OUT/hf" --precision int8 \
    --gpu-per-trial 0.25 --cpu-per-trial 3 --epochs 2 2>&1 | stamp > "$OUT/hf_baseline.log"
  echo "hf baseline: rc ${PIPESTATUS[0]}, wall $(( $(date +%s) - began )) s" | tee -a "$OUT/summary.txt"
  kill $smi
  gpu_busy | tee -a "$OUT/summary.txt"
  [ -f "$OUT/hf/hf_baseline.md" ] && cat "$OUT/hf/hf_baseline.md" | tee -a "$OUT/summary.txt"
  grep -E "Error|ERROR|Traceback|OutOfMemory|TERMINATED|cast notices" "$OUT/hf_baseline.log" | cut -c1-200 | tail -20
}

for part in ${PARTS:-hf}; do
  echo "== $part"
  case $part in
    hf) hf ;;
    new) PARTS=new bash bench/gpu_sweep_speed.sh ;;
  esac
done
