"""Rehearse the single-T4 settings (search_spaces/t4.yaml) on a big GPU: the full-size blip2-flan-t5-xl
architecture (random weights, `bench/full_size.py`), int8 with fp32 dense weights as on a T4 (no bf16
there), every phase capped at 15 GiB with `torch.cuda.set_per_process_memory_fraction`. Then shows the
preflight refusing a batch that will not fit.

    python bench/t4_rehearsal.py FULL_MODEL_DIR EASY_VQA_DIR
"""

import json
import sys
import time
from pathlib import Path

import torch

from runner.config import TrialConfig
from runner.errors import UserError
from runner.train.loop import train_trial

# A T4 (sm_75) has no native bf16: make this card answer the same, so runner.model picks fp32 for
# the non-int8 weights exactly as it would on a T4.
torch.cuda.is_bf16_supported = lambda *args, **kwargs: False


def main(model: str, data: str) -> None:
    t4 = dict(task="easy_vqa", data=data, model=model, precision="int8", gpu_memory_gib=15.0, lora_rank=8,
              n_samples=256, epochs=1, eval_batch_size=16, max_eval_examples=64, learning_rate=1e-4)
    rows = []
    for batch, accum, checkpointing in ((8, 2, False), (16, 1, True)):
        config = TrialConfig(**t4, batch_size=batch, grad_accum=accum, gradient_checkpointing=checkpointing)
        started = time.perf_counter()
        metrics = train_trial(config, Path(f"/tmp/t4-b{batch}")).history[-1]
        rows.append({"batch": batch, "grad_accum": accum, "gradient_checkpointing": checkpointing,
                     "samples_per_s": round(metrics["train_samples_per_second"], 2),
                     "seconds": round(time.perf_counter() - started, 1),
                     **{k: round(v, 2) for k, v in metrics.items() if k.startswith("gpu_peak_gib")}})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    try:
        train_trial(TrialConfig(**t4, batch_size=64, grad_accum=1), Path("/tmp/t4-b64"))
        print("preflight did NOT refuse batch 64")
    except UserError as error:
        print(f"preflight refused batch 64: {error}")
    print("| batch | accum | checkpointing | samples/s | peak GiB load+features / train / eval |")
    for r in rows:
        print(f"| {r['batch']} | {r['grad_accum']} | {r['gradient_checkpointing']} | {r['samples_per_s']} | "
              f"{r.get('gpu_peak_gib_load_and_features')} / {r.get('gpu_peak_gib_train')} / {r.get('gpu_peak_gib_eval')} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
