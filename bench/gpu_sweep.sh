#!/usr/bin/env bash
# On the GPU host: the quick-start sweep with GPU trials sharing one card (resources.gpu=0.25 -> 4 at once),
# int8 tiny model, a real local Ray cluster and MLflow (SQLite). GPU utilisation/memory sampled every 2 s.
set -euo pipefail
mkdir -p /tmp/site && [ -d /tmp/site/ray ] || tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RUNNER_CACHE=$PWD/.gpu/cache MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/mlruns
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/gpu_sweep_smi.csv" &
smi=$!
start=$(date +%s)
python3 -m runner.cli tune search_spaces/quickstart.yaml name=gpu-quickstart trial.data=$PWD/.gpu/easy_vqa \
  trial.precision=int8 trial.device=cuda resources.gpu=${GPU_SHARE:-0.25} resources.cpu=2 num_samples=8 \
  test_max_examples=500 storage_path=/tmp/ray-store tracking_uri=sqlite:////tmp/mlruns/mlflow.db 2>&1 \
  | grep -v -i "warn\|Reporting training result" | tee "$OUT/gpu_sweep.log" | tail -40
echo "sweep wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_sweep.log"
kill $smi
cp runs/reports/gpu-quickstart/report.md "$OUT/gpu_sweep_report.md" 2>/dev/null || true
