"""Large datasets stay cheap: load time and peak RSS on a generated Path-VQA-sized dataset.

    python bench/large_data.py [--images 5000] [--questions 33000] [--out /tmp/large-vqa] [--features]

Writes a dataset in flaviagiammarino/path-vqa's layout (data/{train,validation,test}-*.parquet, every row
carrying its image as a datasets Image struct, as the hub's files do), then measures, each phase in a fresh
process (so its peak RSS is its own):

1. the first load of train + validation on a node (cold image-key cache: every distinct image decoded once);
2. the next trial's load (warm cache: bytes hashed, nothing decoded);
3. with --features: the tiny model's frozen image features for every train image, images decoded a batch
   at a time;
4. with --before DIR: the same first load by an older checkout (DIR, e.g. /work/main) for comparison.

Prints a markdown table. The numbers depend on the machine: the README and ARCHITECTURE quote this
script's output with its date and machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SPLITS = (("train", 0.60), ("validation", 0.19), ("test", 0.21))  # Path-VQA: 19,654 / 6,259 / 6,719


def generate(out: Path, n_images: int, n_questions: int, size: int) -> dict:
    """Distinct images (smooth gradients + noise, JPEG, like stained slides in size), questions spread over them."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (out / "data").mkdir(parents=True, exist_ok=True)
    per_image = n_questions / n_images
    first, written = 0, {}
    for split, share in SPLITS:
        images = round(n_images * share)
        rows = {"image": [], "question": [], "answer": []}
        for i in range(first, first + images):
            y, x = np.mgrid[0:size, 0:size]
            base = np.stack([(x * (i % 7 + 1) + y) % 256, (y * (i % 5 + 1)) % 256, (x + y + i) % 256], axis=-1)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
            encoded = buffer.getvalue()
            count = int(per_image) + (rng.random() < per_image - int(per_image))
            for q in range(count):  # every row carries its image's bytes, as in the hub's parquet files
                closed = q % 2 == 0
                rows["image"].append({"bytes": encoded, "path": None})
                rows["question"].append(f"{'is there' if closed else 'what is'} finding {q} in slide {i}?")
                rows["answer"].append(("yes", "no")[q % 4 // 2] if closed else f"tissue {i % 50}")
        table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
        # Several files per split, as the hub shards it.
        shards = max(1, len(table) // 8_000)
        for shard in range(shards):
            table.shard(shards, shard, contiguous=True).to_parquet(
                str(out / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))
        written[split] = {"images": images, "questions": len(table)}
        first += images
    return written


PHASE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import datasets
datasets.config.HF_DATASETS_CACHE = sys.argv[3]
datasets.disable_progress_bars()
from tasks import get_task
started = time.perf_counter()
task = get_task("{task}", data=sys.argv[2])
train, validation = task.load_split("train"), task.load_split("validation")
result = {{"load_s": time.perf_counter() - started, "questions": len(train.examples) + len(validation.examples),
          "images": len(train.images) + len(validation.images)}}
if "{features}" == "yes":
    import torch
    from runner.model.blip2 import load_blip2
    from runner.model.features import compute_image_features
    torch.set_num_threads(1)
    model, processor = load_blip2("tiny", "fp32", torch.device("cpu"))
    started = time.perf_counter()
    features = compute_image_features(model, processor, train.images, torch.device("cpu"), torch.float32,
                                      batch_size=32)
    result["features_s"] = time.perf_counter() - started
    result["feature_rows"] = int(features.values.shape[0])
# VmHWM: this process's own peak (ru_maxrss would keep the peak of the process that forked it).
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
result["peak_rss_mib"] = int(hwm.split()[1]) / 1024
print(json.dumps(result))
"""


def phase(code_dir: Path, data: Path, hf_cache: Path, cache: Path, *, task: str, features: bool) -> dict:
    script = PHASE.format(task=task, features="yes" if features else "no")
    env = {**os.environ, "RUNNER_CACHE": str(cache), "PYTHONPATH": str(code_dir), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(code_dir), str(data), str(hf_cache)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--questions", type=int, default=33_000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--out", type=Path, default=Path("/tmp/large-vqa"))
    parser.add_argument("--features", action="store_true", help="also compute the tiny model's image features")
    parser.add_argument("--before", type=Path, default=None, help="an older checkout to compare the first load with")
    args = parser.parse_args()

    repo = Path(__file__).resolve().parents[1]
    data, hf_cache, cache = args.out / "path-vqa", args.out / "hf-datasets", args.out / "runner-cache"
    if not (data / "data").exists():
        started = time.perf_counter()
        written = generate(data, args.images, args.questions, args.size)
        print(f"generated {json.dumps(written)} in {time.perf_counter() - started:.0f} s; "
              f"{sum(f.stat().st_size for f in (data / 'data').iterdir()) / 2**20:.0f} MiB of parquet", flush=True)
    import shutil

    for folder in (hf_cache, cache, args.out / "hf-before", args.out / "cache-before"):
        shutil.rmtree(folder, ignore_errors=True)  # every run starts as a fresh node
    rows = []
    if args.before is not None:  # an old checkout knows only vqa_rad for a hub-layout parquet folder
        rows.append(("before (" + str(args.before) + "): first load", phase(
            args.before, data, args.out / "hf-before", args.out / "cache-before", task="vqa_rad", features=False)))
        print(rows[-1], flush=True)
    for name, features in (("first load on a node (cold key cache)", False), ("next trial's load (warm)", False)):
        rows.append((name, phase(repo, data, hf_cache, cache, task="path_vqa", features=features)))
        print(rows[-1], flush=True)
    if args.features:
        rows.append(("warm load + tiny model's image features (train)",
                     phase(repo, data, hf_cache, cache, task="path_vqa", features=True)))
    print("\n| phase | questions | images | load s | features s | peak RSS MiB |\n| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        features = f"{r['features_s']:.1f}" if "features_s" in r else "–"
        print(f"| {name} | {r['questions']:,} | {r['images']:,} | {r['load_s']:.1f} | {features} | "
              f"{r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
