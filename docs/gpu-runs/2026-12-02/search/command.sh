# The one `run` call of 2026-12-02 12:17 UTC (nvidia-h200, carry [".gpu"]: the bundle site.tar.xz + easy_vqa.tar.xz, the whole easy-vqa package).
set -uo pipefail; T0=$(date +%s); mkdir -p /tmp/site /tmp/bench && tar xJf .gpu/site.tar.xz -C /tmp/site && tar xJf .gpu/easy_vqa.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_CACHE=/tmp/hf-datasets CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -c "import sys; from importlib.metadata import version as v; print('python', sys.version.split()[0], *[p + ' ' + v(p) for p in ('torch','transformers','peft','bitsandbytes','ray','mlflow','optuna')])"; echo "unpack $(( $(date +%s) - T0 )) s"; } 2>&1 | tee $OUT/env.txt
mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d && echo "MPS started" | tee -a $OUT/env.txt
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 2 > /tmp/bench/smi.csv & SMI=$!
B0=$(date +%s); timeout -k 10 520 python3 bench/search.py --out /tmp/bench trial.precision=int8 trial.device=cuda resources.gpu=0.25 resources.cpu=2 2>&1 | tee $OUT/search_stdout.txt
echo "bench rc ${PIPESTATUS[0]}, $(( $(date +%s) - B0 )) s" | tee -a $OUT/env.txt
kill $SMI; echo quit | nvidia-cuda-mps-control
cp /tmp/bench/search.md $OUT/ 2>/dev/null; tar -C /tmp/bench -czf $OUT/bench.tar.gz --exclude=./ray . ; ls -la $OUT /tmp/bench; cat /tmp/bench/search.md; echo "total $(( $(date +%s) - T0 )) s"
