"""A VQA-RAD-sized dataset in the hub's own layout (parquet, a datasets Image column, question, answer)
for GPU benchmarks: VQA-RAD itself cannot be downloaded here.

Sizes as VQA-RAD (`flaviagiammarino/vqa-rad`): 1,793 train / 451 test questions about 315 images,
512 x 512 greyscale-like PNGs (noise with structure, so PNG does not compress them to nothing).
Lengths modelled on VQA-RAD (our assumption, not measured from it, since it cannot be read here):
questions of 6 to 16 words (mean 11), answers "yes"/"no" for 55% of the questions (closed), else 1 to
5 words. Words come from the benchmark model's tokenizer, so no token is `<unk>` and the token counts
equal the word counts (bench/full_size.py reuses the tiny model's word-level tokenizer with T5's
32,128-row vocabulary in the model).

    python bench/vqa_rad_like.py OUT_DIR [TOKENIZER_DIR]
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN, TEST, IMAGES = 1793, 451, 315
QUESTION_WORDS = (6, 16)
CLOSED_FRACTION = 0.55
ANSWER_WORDS = (1, 5)


def vocabulary(tokenizer_dir: str) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tokenizer.all_special_tokens) | {"<image>", "yes", "no"}
    return sorted(word for word in tokenizer.get_vocab() if word not in special and word.isalpha())


def picture(seed: int) -> dict:
    generator = np.random.default_rng(seed)
    base = generator.normal(120, 40, (64, 64)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base).resize((512, 512), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": f"synthetic_{seed}.png"}


def records(n: int, images: list[dict], words: list[str], rng: random.Random) -> dict[str, list]:
    rows = {"image": [], "question": [], "answer": []}
    for _ in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(*QUESTION_WORDS))) + "?"
        if rng.random() < CLOSED_FRACTION:
            answer = rng.choice(["yes", "no"])
        else:
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(*ANSWER_WORDS)))
        rows["image"].append(rng.choice(images))
        rows["question"].append(question)
        rows["answer"].append(answer)
    return rows


def build(out: Path, tokenizer_dir: str) -> Path:
    import datasets

    rng = random.Random(0)
    words = vocabulary(tokenizer_dir)
    images = [picture(seed) for seed in range(IMAGES)]
    train_images, test_images = images[: int(IMAGES * 0.8)], images[int(IMAGES * 0.8):]
    out.mkdir(parents=True, exist_ok=True)
    for split, n, pool in (("train", TRAIN, train_images), ("test", TEST, test_images)):
        table = datasets.Dataset.from_dict(records(n, pool, words, rng)).cast_column("image", datasets.Image())
        table.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    print(f"VQA-RAD-like data: {TRAIN} train / {TEST} test questions, {IMAGES} images -> {out}")
    return out


if __name__ == "__main__":
    from runner.model.paths import resolve_model

    build(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else resolve_model("tiny"))
