source bench/gpu_env.sh; echo quit | nvidia-cuda-mps-control; timeout 300 python3 bench/int8_threshold.py /tmp/full /tmp/vqa-rad
