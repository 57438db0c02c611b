#!/usr/bin/env bash
# Issue "Sweep speed on one GPU", once: the full search_spaces/vqa_rad.yaml sweep (24 trials, 5 epochs, ASHA) on one
# GPU with 4 trials packed (resources.gpu=0.25 under CUDA MPS), the full-size random-weight model on VQA-RAD-like
# data, cold node caches, under a time guard (FULL_GUARD s; a device call holds at most 10 minutes): what it
# finished by then, each trial's start (start_seconds) and epochs, read from its MLflow store.
#
#   FULL_GUARD=470 bash bench/gpu_full_sweep.sh
set -uo pipefail
source bench/gpu_env.sh
rm -rf /tmp/cache-full /tmp/ray-full /tmp/mlruns-full && mkdir -p /tmp/mlruns-full
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$OUT/smi_full.csv" &
smi=$! began=$(date +%s)
RUNNER_CACHE=/tmp/cache-full timeout -s INT -k 20 ${FULL_GUARD:-470} python3 -m runner.cli tune \
  search_spaces/vqa_rad.yaml name=full trial.model=/tmp/full trial.data=/tmp/vqa-rad resources.gpu=0.25 \
  resources.cpu=3 storage_path=/tmp/ray-full tracking_uri=sqlite:////tmp/mlruns-full/mlflow.db 2>&1 \
  | stamp > "$OUT/sweep_full.log"
echo "sweep full: rc ${PIPESTATUS[0]}, wall $(( $(date +%s) - began )) s" | tee -a "$OUT/summary.txt"
kill $smi
grep -rh "first step" /tmp/ray/session_latest/logs/ 2>/dev/null | cut -c1-400 > "$OUT/worker_phases_full.txt"
wc -l < "$OUT/worker_phases_full.txt"; head -3 "$OUT/worker_phases_full.txt"
python3 bench/sweep_summary.py sqlite:////tmp/mlruns-full/mlflow.db full 2>/dev/null > "$OUT/trials_full.jsonl"
python3 - "$OUT/trials_full.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(len(rows), "trials started;", sum(r["status"] in ("TERMINATED", "STOPPED_EARLY") for r in rows), "ended")
for r in sorted(rows, key=lambda r: r["start_s"]):
    print(r["trial"], r["status"], r.get("epochs"), "start_s %.0f" % (r["start_seconds"] or -1), "samples/s", r["train_samples_per_second"])
PY
tail -30 "$OUT/sweep_full.log" | cut -c1-160
echo quit | nvidia-cuda-mps-control
