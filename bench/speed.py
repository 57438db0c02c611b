"""Trial speed, side by side in one process on one GPU: the reference loop vs ours (int8 and bf16).

The reference is re-created from the description of the original notebook (issue "Fast trials"):
int8 BLIP-2, batch 1, one processor call per sample (pixels + prompt), the full model forward (ViT and
Q-Former every step, in train mode), LoRA r8 on q,v, AdamW, gradient accumulation 8; generation one
question at a time. Ours is runner.train's loop: image features computed once per image, batched
prompts, the T5 language model alone per step. Timing: warm-up excluded, CUDA synchronised before every
clock read, median of several windows. Prints one table (and writes it to OUT/speed.md).

    python bench/speed.py FULL_MODEL_DIR EASY_VQA_DIR [OUT]     # FULL_MODEL_DIR from bench/full_size.py
    python bench/speed.py tiny EASY_VQA_DIR OUT                 # CPU smoke test (tests/test_bench.py)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from runner.config import TrialConfig
from runner.eval.evaluate import generate
from runner.model.blip2 import (
    add_lora,
    compute_dtype,
    encode_answers,
    load_blip2,
    resolve_device,
)
from runner.model.features import compute_image_features
from runner.train.loop import TrainState, train_epoch
from tasks import get_task

T5_TRAIN_GFLOP = 284  # Flan-T5-XL forward+backward per question (issue "Fast trials")
PEAK_TFLOPS = 700  # measured bf16 dense rate of an H100 (issue "Fast trials")
INT8_BATCHES = (16, 32, 64)  # the loop is host-bound: larger batches amortise the per-step launches
BF16_BATCHES = (64, 128, 256)
GEN_BATCHES = (32, 128)


WINDOWS = 2  # timed windows per measurement, after one warm-up (the H200 run of the first version, at 3,
# did not finish in its 330 s guard)


def note(rows: list, name: str, rate: float, peak: float) -> None:
    """Keep a result and print it at once: a run cut short by its time guard still shows what it measured."""
    rows.append((name, rate, peak))
    print(f"{name}: {rate:.2f}/s, peak {peak:.1f} GiB", flush=True)


def timed(fn, windows: int = WINDOWS) -> float:
    """Median seconds of `windows` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(windows):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return value


def reference_training(model, processor, task, examples, images, device, dtype, samples: int):
    """The original loop: one sample per step, processor per sample, full forward, accumulate 8."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    def run():
        for index, example in enumerate(examples[:samples]):
            inputs = processor(images=images[example.image_key], text=task.prompt(example.question),
                               return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            labels = encode_answers(processor, [task.normalize_answer(example.answer)], device)
            (model(**inputs, labels=labels).loss / 8).backward()
            if (index + 1) % 8 == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return samples / timed(run)


def our_training(model, base, processor, task, examples, features, config, device, samples: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    chunk = examples[:samples]
    assert len(chunk) == samples, f"only {len(chunk)} training questions for a {samples}-sample window"
    state = TrainState(config, device, task, base, processor, features, model, optimizer, scheduler)
    return samples / timed(lambda: train_epoch(state, chunk, 1))


def reference_generation(model, processor, task, examples, images, device, dtype, n: int) -> float:
    model.eval()

    @torch.no_grad()
    def run():
        for example in examples[:n]:
            inputs = processor(images=images[example.image_key], text=task.prompt(example.question),
                               return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            model.generate(**inputs, max_new_tokens=8, do_sample=False)

    return n / timed(run)


def our_generation(base, processor, task, examples, images, device, dtype, n: int, batch: int) -> float:
    chunk = examples[:n]

    def run():  # image features included (no disk cache): they are computed once per evaluation
        features = compute_image_features(base, processor, {e.image_key: images[e.image_key] for e in chunk},
                                          device, dtype, batch_size=32)
        generate(base, processor, task, chunk, [e.image_key for e in chunk], features, batch_size=batch,
                 max_new_tokens=8)

    return n / timed(run)


def setting(model_path: str, data: str, precision: str):
    device = resolve_device("auto")
    task = get_task("easy_vqa", data=data)
    split = task.load_split("train")
    base, processor = load_blip2(model_path, precision, device)
    dtype = compute_dtype(precision, device)
    return device, task, split, base, processor, dtype


def config_for(model_path: str, data: str, precision: str, batch: int) -> TrialConfig:
    return TrialConfig(task="easy_vqa", data=data, model=model_path, precision=precision, batch_size=batch,
                       learning_rate=1e-4, lora_rank=8)


def main(model_path: str, data: str, out: Path) -> None:
    gpu = torch.cuda.is_available()
    scale = 1 if gpu else 0.1  # CPU smoke test: few samples, one batch size each
    rows, generation = [], []

    precision = "int8" if gpu else "fp32"
    device, task, split, base, processor, dtype = setting(model_path, data, precision)
    examples, images = split.examples, split.images
    needed = {e.image_key: images[e.image_key] for e in examples[: int(4096 * scale)]}
    peak_gib()
    ref_gen = reference_generation(base, processor, task, examples, images, device, dtype, int(8 * scale) or 2)
    note(generation, "reference: batch 1, full forward per question", ref_gen, peak_gib())
    for batch in GEN_BATCHES if gpu else [32]:
        rate = our_generation(base, processor, task, examples, images, device, dtype, int(256 * scale), batch)
        note(generation, f"ours: batch {batch}, image features once per image", rate, peak_gib())
    features = compute_image_features(base, processor, needed, device, dtype, batch_size=32)
    model = add_lora(base, rank=8, alpha=16, dropout=0.05, gradient_checkpointing=False)
    peak_gib()
    reference = reference_training(model, processor, task, examples, images, device, dtype, int(24 * scale) or 2)
    note(rows, f"reference: {precision}, batch 1, processor per sample, full forward, accumulate 8", reference,
         peak_gib())
    for batch in INT8_BATCHES if gpu else [16]:
        config = config_for(model_path, data, precision, batch)
        rate = our_training(model, base, processor, task, examples, features, config, device,
                            int(max(512, 16 * batch) * scale))
        note(rows, f"ours: {precision}, batch {batch}, image features cached", rate, peak_gib())
    del model, base, features
    torch.cuda.empty_cache() if gpu else None

    if gpu:
        device, task, split, base, processor, dtype = setting(model_path, data, "bf16")
        features = compute_image_features(base, processor, needed, device, dtype, batch_size=64)
        model = add_lora(base, rank=8, alpha=16, dropout=0.05, gradient_checkpointing=False)
        peak_gib()
        for batch in BF16_BATCHES:
            config = config_for(model_path, data, "bf16", batch)
            rate = our_training(model, base, processor, task, examples, features, config, device,
                                max(2048, 16 * batch))
            note(rows, f"ours: bf16, batch {batch}, image features cached", rate, peak_gib())

    card = torch.cuda.get_device_name() if gpu else "CPU"
    import peft
    import transformers

    lines = [f"{card}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
             f"model {model_path}",
             "", "| loop | samples/s | × reference | peak GiB | % of cached-vision FLOP limit |",
             "| --- | --- | --- | --- | --- |"]
    limit = PEAK_TFLOPS * 1000 / T5_TRAIN_GFLOP
    for name, rate, peak in rows:
        lines.append(f"| {name} | {rate:.2f} | {rate / reference:.1f} | {peak:.1f} | {100 * rate / limit:.1f} |")
    lines += ["", "| generation, 8 tokens | questions/s | × batch 1 | peak GiB |", "| --- | --- | --- | --- |"]
    for name, rate, peak in generation:
        lines.append(f"| {name} | {rate:.2f} | {rate / ref_gen:.1f} | {peak:.1f} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/tmp/speed"))
