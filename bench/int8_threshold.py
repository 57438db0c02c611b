"""What bitsandbytes' outlier threshold costs an int8 trial, in one process on one GPU.

With `llm_int8_threshold` > 0 (6.0: transformers' default and ours) every int8 linear looks for outlier columns
in its input (`if outliers.any()`, `torch.argwhere`: the host waits for the card twice per layer) and multiplies
them in 16-bit; 0 quantises everything and never waits. Here: the full-size model loaded at each threshold, the
loss of the same fixed batches at LoRA's initialisation (with random weights this says nothing of a real model's
quality, only how far the numbers move), and our training loop's samples/s at batch 16 and 32. The image
features are computed once (threshold 6.0) and used by both: only the language model's step is compared.

    python bench/int8_threshold.py FULL_MODEL_DIR DATA_DIR     # DATA_DIR: bench/vqa_rad_like.py's output
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from int8_path import fixed_losses, throughput  # noqa: E402

from runner.model.blip2 import add_lora  # noqa: E402
from runner.model.features import compute_image_features  # noqa: E402
from tasks import get_task  # noqa: E402

THRESHOLDS = (6.0, 0.0)


def main(model_dir: str, data: str) -> None:
    from transformers import (
        BitsAndBytesConfig,
        Blip2ForConditionalGeneration,
        Blip2Processor,
    )

    device = torch.device("cuda", 0)
    task = get_task("vqa_rad", data=data)
    split = task.load_split("train")
    processor = Blip2Processor.from_pretrained(model_dir)
    features, rows = None, []
    for threshold in THRESHOLDS:
        started = time.perf_counter()
        base = Blip2ForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.bfloat16, device_map={"": 0},
            quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold))
        print(f"threshold {threshold}: loaded and quantised in {time.perf_counter() - started:.1f} s", flush=True)
        if features is None:
            features = compute_image_features(base, processor, split.images, device, torch.bfloat16, batch_size=32)
        lora_model = add_lora(base, rank=8, alpha=16, dropout=0.05, gradient_checkpointing=False)
        losses = fixed_losses(lora_model, base, processor, task, split.examples, features, device)
        rates = throughput(lora_model, base, processor, task, split.examples, features, device, model_dir, data)
        rows.append((threshold, statistics.mean(losses), losses, rates))
        del lora_model, base
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: int8 training samples/s by llm_int8_threshold (one process)\n")
    print("| llm_int8_threshold | batch 16 samples/s | batch 32 samples/s | fixed-batch loss (mean of 4) |")
    print("| --- | --- | --- | --- |")
    for threshold, mean, _, rates in rows:
        print(f"| {threshold:g} | {rates[16]:.1f} | {rates[32]:.1f} | {mean:.5f} |")
    relative = max(abs(a - b) / abs(b) for a, b in zip(rows[1][2], rows[0][2]))
    print(f"\nlargest relative difference of a fixed batch's loss, 0 against 6.0: {relative:.2e}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
