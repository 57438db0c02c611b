# Sourced by the GPU sweep benches (bench/gpu_sweep_speed.sh, bench/gpu_hf_baseline.sh): the GPU host's
# packages (.gpu/site.tar.xz), the environment, the card and versions into $OUT/gpu.txt, the full-size
# random-weight model and VQA-RAD-like data (built once per host), CUDA MPS, and `stamp`.
mkdir -p /tmp/site && [ -d /tmp/site/ray ] || tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 PYTHONUNBUFFERED=1 \
  OUT=${OUT:-/tmp/out} HF_DATASETS_CACHE=/tmp/hf-datasets RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b, ray; print('torch', torch.__version__,
  'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__,
  'ray', ray.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/gpu.txt"
start=$(date +%s)
[ -f /tmp/full/config.json ] || python3 bench/full_size.py /tmp/full 2>&1 | tail -1
[ -f /tmp/vqa-rad/test-00000-of-00001.parquet ] || python3 bench/vqa_rad_like.py /tmp/vqa-rad /tmp/full 2>&1 | tail -1
echo "model + data: $(( $(date +%s) - start )) s"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d && echo "MPS started"

stamp() {  # seconds since start before every line; bitsandbytes' per-matmul notice counted, not kept
  python3 -u -c '
import sys, time
t, casts = time.time(), 0
for line in sys.stdin:
    if "MatMul8bitLt: inputs will be cast" in line:
        casts += 1
        continue
    print(f"{time.time() - t:7.1f} {line}", end="", flush=True)
print(f"{time.time() - t:7.1f} [MatMul8bitLt cast notices: {casts}]")'
}
