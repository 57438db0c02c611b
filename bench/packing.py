"""Packing: 1, 2 and 4 int8 trials sharing one GPU at once; aggregate training samples/s (issue "Fast trials").

Each trial is its own process, as under Ray (one Train worker process per trial, `resources.gpu: 0.25`
packs four): it loads the model, takes its image features from the node's disk cache, adds LoRA and runs
our training loop (`runner.train.loop.train_epoch`). After a warm-up the trials start their timed pass together
(a barrier); aggregate = all samples / (last end - first start). Prints a table, writes OUT/packing.md.

    python bench/packing.py FULL_MODEL_DIR EASY_VQA_DIR [OUT]     # a GPU; FULL_MODEL_DIR from bench/full_size.py
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

COUNTS = (1, 2, 4)
BATCH = 16
SAMPLES = 384  # per trial, timed
THREADS = 2  # CPU threads per trial process (a 16-core host packs 4 with room to spare)


def trial(model_dir: str, data: str, barrier, results) -> None:
    import torch

    from runner.config import TrialConfig
    from runner.model.blip2 import add_lora, compute_dtype, load_blip2, resolve_device
    from runner.model.features import compute_image_features, trial_feature_cache
    from runner.train.loop import TrainState, train_epoch
    from tasks import get_task

    torch.set_num_threads(THREADS)
    gpu = torch.cuda.is_available()
    precision = "int8" if gpu else "fp32"  # CPU: a dry run of the bench on the tiny model
    config = TrialConfig(task="easy_vqa", data=data, model=model_dir, precision=precision, batch_size=BATCH)
    device = resolve_device("auto")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    task = get_task("easy_vqa", data=data)
    split = task.load_split("train")
    examples, images = split.examples[: SAMPLES + 64], split.images
    base, processor = load_blip2(model_dir, precision, device)
    dtype = compute_dtype(precision, device)
    features = compute_image_features(base, processor, {e.image_key: images[e.image_key] for e in examples},
                                      device, dtype, cache=trial_feature_cache(config, dtype, base, processor))
    model = add_lora(base, rank=8, alpha=16, dropout=0.05, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(config, device, task, base, processor, features, model, optimizer, scheduler)
    train_epoch(state, examples[:64], 1)
    sync()
    barrier.wait()
    start = time.time()
    train_epoch(state, examples[64:], 2)
    sync()
    results.put((start, time.time(), torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")))


def packed(model_dir: str, data: str, count: int) -> tuple[float, float, float]:
    """(aggregate samples/s, mean per-trial samples/s, max peak GiB of a trial) for `count` trials at once."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(count), context.Queue()
    processes = [context.Process(target=trial, args=(model_dir, data, barrier, results)) for _ in range(count)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a trial process exited with {process.exitcode}")
    first, last = min(o[0] for o in outcomes), max(o[1] for o in outcomes)
    return (count * SAMPLES / (last - first), sum(SAMPLES / (o[1] - o[0]) for o in outcomes) / count,
            max(o[2] for o in outcomes))


def main(model_dir: str, data: str, out: Path) -> None:
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run, tiny fp32)"
    lines = [f"{card}, torch {torch.__version__}: int8 trials on one GPU, batch {BATCH}, "
             f"{SAMPLES} timed samples each",
             "", "| trials at once | aggregate samples/s | × one trial | per trial samples/s | peak GiB per trial |",
             "| --- | --- | --- | --- | --- |"]
    single = None
    for count in COUNTS:
        aggregate, per_trial, peak = packed(model_dir, data, count)
        single = single or aggregate
        lines.append(f"| {count} | {aggregate:.1f} | {aggregate / single:.2f} | {per_trial:.1f} | {peak:.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/tmp/packing"))
