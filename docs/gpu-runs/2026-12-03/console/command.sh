# One `run` call (nvidia-h200, carry [".gpu"]): the README's main command on the GPU, as a user with a shared
# card would run it (int8, four trials at 0.25 of the card under CUDA MPS), to see what the console prints.
set -uo pipefail; T0=$(date +%s)
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && tar xJf .gpu/easy_vqa.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -c "import sys; from importlib.metadata import version as v; print('python', sys.version.split()[0], *[p + ' ' + v(p) for p in ('torch','transformers','peft','bitsandbytes','ray','mlflow')])"; git log --oneline -1; echo "unpack $(( $(date +%s) - T0 )) s"; } 2>&1 | tee $OUT/env.txt
mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d
B0=$(date +%s); timeout -k 20 ${LIMIT_S:-420} python3 -m runner.cli tune search_spaces/quickstart.yaml trial.device=cuda trial.precision=int8 resources.gpu=0.25 > $OUT/console.txt 2>&1
echo "rc $?, $(( $(date +%s) - B0 )) s, $(wc -l < $OUT/console.txt) lines" | tee -a $OUT/env.txt
echo quit | nvidia-cuda-mps-control; tail -c 20000 runs/ray/quickstart/runner.log > $OUT/runner_log_tail.txt 2>/dev/null; cat $OUT/console.txt
