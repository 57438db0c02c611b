# The one `run` call of 2026-12-02 (nvidia-h200, timeout_s 600, carry [".gpu"]: site.tar.xz + easy_vqa.tar.xz),
# run as `bash docs/gpu-runs/2026-12-02/search-parallel/command.sh`. Big files stay in /tmp/bench-work.
# As run, with bench/search.py as it was then (ray start --include-dashboard=false; a second SIGTERM broke the
# partial rows). Only 8 of the 16 files under $OUT came back (a cap on the number of files): pack them into one
# tarball next time.
set -uo pipefail; T0=$(date +%s); W=/tmp/bench-work; mkdir -p /tmp/site $W && tar xJf .gpu/site.tar.xz -C /tmp/site && tar xJf .gpu/easy_vqa.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_CACHE=/tmp/hf-datasets CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -c "import sys; from importlib.metadata import version as v; print('python', sys.version.split()[0], *[p + ' ' + v(p) for p in ('torch','transformers','peft','bitsandbytes','ray','mlflow','optuna')])"; echo "unpack $(( $(date +%s) - T0 )) s"; } 2>&1 | tee $OUT/env.txt
mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d && echo "MPS started" | tee -a $OUT/env.txt
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > $W/smi.csv & SMI=$!
B0=$(date +%s); timeout -k 30 520 python3 bench/search.py --parallel --ray-cpus 24 --out $OUT --work $W trial.precision=int8 trial.device=cuda resources.gpu=0.05 resources.cpu=1 max_concurrent_trials=3 2>&1 | tee $OUT/search_stdout.txt
echo "bench rc ${PIPESTATUS[0]}, $(( $(date +%s) - B0 )) s" | tee -a $OUT/env.txt
kill $SMI; echo quit | nvidia-cuda-mps-control; python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
for f in $W/*.log; do tail -c 150000 $f > $OUT/$(basename $f); done; tail -c 100000 $W/smi.csv > $OUT/smi.csv
for f in $W/*.db; do [ $(stat -c %s $f) -lt 2500000 ] && cp $f $OUT/; done
ls -la $OUT; du -sh $W/* 2>/dev/null | tail -20; echo "total $(( $(date +%s) - T0 )) s"
