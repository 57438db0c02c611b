# One `run` call (nvidia-h200, carry [".gpu"]: site.tar.xz + easy_vqa.tar.xz): bash THIS SEEDS... CONCURRENCY
# e.g. `bash .../command.sh "0 1" 3`. Everything under $OUT is packed into one tarball (the device returns
# few files); the big files (MLflow artifacts, Ray storage) stay in /tmp/bench-work.
set -uo pipefail; T0=$(date +%s); W=/tmp/bench-work; SEEDS=$1; CONC=$2
mkdir -p /tmp/site $W $OUT/r && tar xJf .gpu/site.tar.xz -C /tmp/site && tar xJf .gpu/easy_vqa.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_CACHE=/tmp/hf-datasets CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
R=$OUT/r
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -c "import sys; from importlib.metadata import version as v; print('python', sys.version.split()[0], *[p + ' ' + v(p) for p in ('torch','transformers','peft','bitsandbytes','ray','mlflow','optuna')])"; git log --oneline -1; echo "seeds $SEEDS, concurrency $CONC; unpack $(( $(date +%s) - T0 )) s"; } 2>&1 | tee $R/env.txt
mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d && echo "MPS started" | tee -a $R/env.txt
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > $R/smi.csv & SMI=$!
B0=$(date +%s); timeout -k 30 ${BENCH_S:-510} python3 bench/search.py --parallel --ray-cpus 16 --seeds $SEEDS --out $R --work $W trial.precision=int8 trial.device=cuda resources.gpu=0.05 resources.cpu=1 max_concurrent_trials=$CONC 2>&1 | tee $R/search_stdout.txt
echo "bench rc ${PIPESTATUS[0]}, $(( $(date +%s) - B0 )) s" | tee -a $R/env.txt
kill $SMI; echo quit | nvidia-cuda-mps-control; python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
for f in $W/*.log; do tail -c 200000 $f > $R/$(basename $f); done
for f in $W/*.db; do cp $f $R/; done
tar cJf $OUT/search.tar.xz -C $R . && rm -rf $R; ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
