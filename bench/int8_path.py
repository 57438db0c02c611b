"""The int8 trial path, before and after, in one process on one GPU: model load, the loss of fixed
batches, training samples/s.

* Load: today's `from_pretrained` + bitsandbytes quantisation of the source weights; writing this node's
  quantised-weight cache (runner/model/quantized.py) once; and a trial's load from that cache.
* Before: PEFT's `prepare_model_for_kbit_training` (every non-int8 weight upcast to fp32, so fp32
  activations) + LoRA q,v. After: `runner.model.add_lora` (bf16 dense weights and activations, LoRA in
  fp32). The same fixed batches' loss at LoRA's initialisation (B = 0: the base model's loss) must agree
  within 2% (bf16 vs fp32 activations); then our training loop's samples/s at batch 16 and 32.

    python bench/int8_path.py FULL_MODEL_DIR DATA_DIR [OUT]    # DATA_DIR: bench/vqa_rad_like.py's output
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import timed  # noqa: E402

from runner.config import TrialConfig  # noqa: E402
from runner.model.blip2 import (  # noqa: E402
    add_lora,
    encode_answers,
    encode_prompts,
    image_token_id,
    load_quantized,
    text_embeddings,
)
from runner.model.features import compute_image_features  # noqa: E402
from runner.model.paths import cache_dir  # noqa: E402
from runner.train.loop import TrainState, train_epoch  # noqa: E402
from tasks import get_task  # noqa: E402

BATCHES = (16, 32)
LOSS_TOLERANCE = 0.02  # relative: bf16 against fp32 activations


def fixed_losses(lora_model, base, processor, task, examples, features, device) -> list[float]:
    """The loss of 4 fixed batches of 16, no gradient, train-mode off (no dropout)."""
    lora_model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, 64, 16):
            batch = examples[start : start + 16]
            encoded = encode_prompts(processor, [task.prompt(ex.question) for ex in batch], device)
            labels = encode_answers(processor, [task.normalize_answer(ex.answer) for ex in batch], device)
            embeds = text_embeddings(base, encoded["input_ids"], features.lookup([ex.image_key for ex in batch]),
                                     image_token_id(processor))
            losses.append(base.language_model(inputs_embeds=embeds, attention_mask=encoded["attention_mask"],
                                              labels=labels).loss.item())
    return losses


def throughput(lora_model, base, processor, task, examples, features, device, model_dir, data) -> dict[int, float]:
    rates = {}
    for batch in BATCHES:
        config = TrialConfig(task="vqa_rad", data=data, model=model_dir, precision="int8", batch_size=batch,
                             learning_rate=1e-4, lora_rank=8)
        optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-4,
                                      fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        state = TrainState(config, device, task, base, processor, features, lora_model, optimizer, scheduler)
        chunk = examples[: 12 * batch]  # 12 steps a window
        rates[batch] = len(chunk) / timed(lambda: train_epoch(state, chunk, 1))
        print(f"  batch {batch}: {rates[batch]:.1f} samples/s", flush=True)
    return rates


def main(model_dir: str, data: str, out: Path) -> None:
    from peft import prepare_model_for_kbit_training
    from transformers import (
        BitsAndBytesConfig,
        Blip2ForConditionalGeneration,
        Blip2Processor,
    )

    from runner.model.quantized import quantized_cache

    # bitsandbytes int8 runs on the CPU too: there this is a smoke test on the tiny model.
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    placement = {"": device.index if device.type == "cuda" else "cpu"}
    int8 = {"dtype": torch.bfloat16, "revision": None, "device_map": placement,
            "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    task = get_task("vqa_rad", data=data)
    split = task.load_split("train")
    examples = split.examples
    shutil.rmtree(cache_dir() / "quantized", ignore_errors=True)

    started = time.perf_counter()
    source = Blip2ForConditionalGeneration.from_pretrained(model_dir, **int8)
    sync()
    load_source = time.perf_counter() - started
    cache = quantized_cache(cache_dir() / "quantized", model_dir, None, "int8", torch.bfloat16)
    started = time.perf_counter()
    cache.store(source)
    store = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in cache.directory.iterdir()) / 2**30
    del source
    print(f"load from source {load_source:.1f} s, cache written in {store:.1f} s ({disk:.2f} GiB)", flush=True)

    processor = Blip2Processor.from_pretrained(model_dir)
    results = {}
    for path in ("after", "before"):
        started = time.perf_counter()
        base = load_quantized(model_dir, None, "int8", torch.bfloat16, int8)  # what load_blip2 does for int8
        sync()
        load_cached = time.perf_counter() - started
        print(f"{path}: load from the cache {load_cached:.1f} s", flush=True)
        features = compute_image_features(base, processor, split.images, device, torch.bfloat16, batch_size=32)
        if path == "before":  # today's path: PEFT's preparation upcasts every non-int8 weight to fp32
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        lora_model = add_lora(base, rank=8, alpha=16, dropout=0.05, gradient_checkpointing=False)
        losses = fixed_losses(lora_model, base, processor, task, examples, features, device)
        dtype = base.language_model.shared.weight.dtype
        print(f"{path}: embeddings {dtype}, fixed-batch losses {[round(x, 5) for x in losses]}", flush=True)
        rates = throughput(lora_model, base, processor, task, examples, features, device, model_dir, data)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[path] = {"load": load_cached, "losses": losses, "rates": rates, "dtype": dtype, "peak": peak}
        del lora_model, base, features
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    before, after = results["before"], results["after"]
    relative = max(abs(a - b) / abs(b) for a, b in zip(after["losses"], before["losses"]))
    import bitsandbytes
    import peft
    import transformers

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"{card}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, model {model_dir}", "",
             f"model load: from the source weights (quantising) {load_source:.1f} s; writing the node's cache once "
             f"{store:.1f} s, {disk:.2f} GiB on disk; a trial's load from the cache {after['load']:.1f} s "
             f"(again: {before['load']:.1f} s)", "",
             "| int8 path | activations | batch 16 samples/s | batch 32 samples/s | peak GiB |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in (("before: prepare_model_for_kbit_training", before), ("after: runner add_lora", after)):
        lines.append(f"| {name} | {row['dtype']} | {row['rates'][16]:.1f} | {row['rates'][32]:.1f} | "
                     f"{row['peak']:.1f} |")
    lines += ["", f"fixed-batch loss (4 batches of 16, LoRA at init): before {statistics.mean(before['losses']):.5f}, "
              f"after {statistics.mean(after['losses']):.5f}, largest relative difference {relative:.2e} "
              f"(tolerance {LOSS_TOLERANCE:g}: {'within' if relative <= LOSS_TOLERANCE else 'OUTSIDE'})"]
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_path.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/tmp/int8"))
