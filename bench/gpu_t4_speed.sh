#!/usr/bin/env bash
# On the GPU host: the single-T4 rehearsal (15 GiB cap, fp32 dense + int8) and the speed benchmark.
set -euo pipefail
mkdir -p /tmp/site && [ -d /tmp/site/ray ] || tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RUNNER_CACHE=$PWD/.gpu/cache MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
[ -f /tmp/full/config.json ] || python3 bench/full_size.py /tmp/full 2>&1 | grep -v -i warn | tail -1
echo "== T4 rehearsal"
python3 bench/t4_rehearsal.py /tmp/full $PWD/.gpu/easy_vqa 2>&1 | grep -v -i "warn\|Loading weights\|MatMul8bitLt" \
  | tee "$OUT/t4_rehearsal.log" | tail -12
echo "== speed"
python3 bench/speed.py /tmp/full $PWD/.gpu/easy_vqa "$OUT" 2>&1 | grep -v -i "warn\|Loading weights\|MatMul8bitLt" \
  | tee "$OUT/speed.log" | tail -16
