"""The offline tiny BLIP-2 (Flan-T5 style): built from a config, then pre-trained for ~1.5 CPU minutes.

Tests and the quick-start need a BLIP-2 that loads through exactly the code path of
`Salesforce/blip2-flan-t5-xl` without a download, and that *looks at the image*: a LoRA fine-tune of
its language model on easy-VQA must score clearly higher with each question's own image than with a
shuffled one. A randomly initialised tiny BLIP-2 does not (LoRA learns the question prior only:
../shared/FACTS.md), so the recipe pre-trains it, as BLIP-2 itself was pre-trained, on easy-VQA *train*
images 0..2999 (3000..3999 are held out for the accuracies in TINY_MODEL.json; questions and the test
split are never read):

- Stage 1, the image path (ViT, Q-Former, query tokens, projection): linear heads on the mean projected
  query output classify each image's colour and shape; two dense losses on the ViT's patch tokens
  (the shape under each outline patch, each patch's 4x4 foreground raster) make shape learnable in
  1,200 steps (held-out shape 0.89-0.96 over 5 seeds, colour 0.99). The heads are discarded.
- Stage 2, image-grounded generation through T5 (all weights + projection, image path frozen): half
  captioning ("a picture of" -> "blue circle", words in random order), half image-text matching as
  generation ("a circle ." -> yes/no). Without the matching half yes/no stayed at the question prior.

A LoRA fine-tune as `runner.train` does it (r=8, lr 3e-3, 3 epochs over 2,000 questions) then scores
~91% exact match with each question's own image against ~67% with shuffled images (seed 0).

Traps handled (FACTS.md): `Blip2VisionConfig.initializer_range` defaults to 1e-10 (a blind model), so
it is set to 0.02; `_init_weights` zeroes `query_tokens`, so they are re-drawn; the processor adds the
`<image>` token itself and `image_token_index` is set to its id; T5Config ties the embeddings.

The built model ships in `runner/tiny/artifact/` (see runner/tiny/__init__.py). Bump TINY_VERSION
whenever the recipe or the tokenizer changes, and regenerate the artifact: `python -m runner.tiny`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from runner.model.blip2 import (
    encode_answers,
    image_token_id,
)
from runner.tiny import TINY_VERSION, Recipe

if TYPE_CHECKING:
    from transformers import Blip2ForConditionalGeneration

    from runner.tiny.data import PretrainingData

log = logging.getLogger(__name__)
CPU = torch.device("cpu")  # the build always runs on CPU (deterministic, and GPU-less machines need it)


COLORS = ("red", "green", "blue", "black", "gray", "teal", "yellow", "brown")
SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPT = "a picture of"
# Image-text matching statements; {x} is "blue shape" or "circle" (the questions' own phrasing).
ITM_TEMPLATES = (
    CAPTION_PROMPT + " a {x} .",
    "a {x} .",
    CAPTION_PROMPT + " a {x} in the image .",
    "the image : a {x} .",
)
# Words the tokenizer knows besides the easy-VQA questions/answers: the QA prompt and the
# pre-training prompts ("Question: ... Answer:", "a picture of", "the image : a circle .").
EXTRA_WORDS = ("question", "answer", ":", ".", "picture")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in T5
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP: BlipImageProcessor's defaults
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
NO_LABEL = -100


def build_tiny_blip2(output_dir: Path, *, seed: int = 0, log_every: int = 100) -> Path:
    """Build, pre-train and save the tiny BLIP-2 + processor into `output_dir`; return it.

    Deterministic for a seed (on a given CPU type; it uses 2 threads whatever the machine has).
    Takes ~2 minutes on 2 idle CPU cores. `Blip2ForConditionalGeneration.from_pretrained(output_dir)`
    and `Blip2Processor.from_pretrained(output_dir)` load the result; `TINY_MODEL.json` records the
    recipe, the pre-training losses/accuracies and the time taken. The files are written to a
    sibling temporary directory first and moved in at the end, `config.json` last, so a crashed
    build never leaves a directory that looks complete. The caller's RNG state is left untouched.
    """
    return build_with_recipe(Path(output_dir), Recipe(), seed=seed, log_every=log_every)


def build_with_recipe(output_dir: Path, recipe: Recipe, *, seed: int = 0, log_every: int = 100) -> Path:
    """`build_tiny_blip2` with an explicit recipe (for experiments; the default is `Recipe()`)."""
    output_dir = Path(output_dir)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    staging = output_dir.parent / f".{output_dir.name}.building-{os.getpid()}"
    try:
        torch.set_num_threads(recipe.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            report = _build(staging, recipe, seed, log_every)
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["files"] = file_hashes(staging)
        (staging / "TINY_MODEL.json").write_text(json.dumps(report, indent=2) + "\n")
        _move_into(staging, output_dir)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny BLIP-2 built in %.1f s into %s", report["seconds"], output_dir)
    return output_dir


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weight and tokenizer file: what `runner.tiny.model_dir` verifies on load."""
    import hashlib

    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.is_file() and path.name != "TINY_MODEL.json"}


def quality_gate(report: dict[str, Any], margin: float = 0.3) -> list[str]:
    """What makes a build unusable: captions that name the image's colour no more often with its own
    image than with another's (the model ignores the image); empty when the build passes."""
    own = report["stage2"]["held_out_caption_colour_accuracy"]
    shuffled = report["stage2"]["held_out_caption_colour_accuracy_shuffled"]
    if own < shuffled + margin:
        return [f"held-out caption colour accuracy {own:.3f} is not {margin} above the shuffled-image "
                f"control's {shuffled:.3f}"]
    return []


def _build(staging: Path, recipe: Recipe, seed: int, log_every: int) -> dict[str, Any]:
    import transformers

    from runner.tiny.data import load_pretraining_data
    from runner.tiny.pretrain import build_model, build_processor, stage1, stage2

    data = load_pretraining_data(recipe)
    processor = build_processor(recipe)
    model = build_model(recipe, processor)
    report: dict[str, Any] = {
        "tiny_version": TINY_VERSION,
        "seed": seed,
        "recipe": asdict(recipe),
        "pretraining_images": f"easy_vqa train ids 0..{recipe.pretrain_images - 1}",
        "held_out_images": f"easy_vqa train ids {recipe.pretrain_images}..{len(data.colour) - 1}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name, stage in (("stage1", stage1), ("stage2", stage2)):
        t0 = time.perf_counter()
        report[name] = stage(model, processor, data, recipe, log_every)
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    failed = quality_gate(report)
    if failed:
        raise RuntimeError(f"tiny BLIP-2: the build fails its quality gate: {'; '.join(failed)}")
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    _check_round_trip(model, staging, data)
    return report


def _move_into(staging: Path, output_dir: Path) -> None:
    """Move the staged files into `output_dir` (created if needed), config.json last."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(staging.iterdir(), key=lambda path: path.name == "config.json")
    for path in files:
        os.replace(path, output_dir / path.name)


def _check_round_trip(model: Blip2ForConditionalGeneration, saved: Path, data: PretrainingData) -> None:
    """The saved pair must load back, reproduce the pixels and logits, and run `generate`."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    loaded = Blip2ForConditionalGeneration.from_pretrained(saved).eval()
    processor = Blip2Processor.from_pretrained(saved)
    if (
        processor.num_query_tokens != loaded.config.num_query_tokens
        or image_token_id(processor) != loaded.config.image_token_index
    ):
        raise RuntimeError("tiny BLIP-2: the saved processor's image tokens do not match the model")
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    pixels255 = ((data.pixels[:2] * std + mean) * 255.0).round().clip(0, 255)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy().astype(np.uint8)) for p in pixels255]
    prompt = "Question: what color is the shape? Answer:"
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
    if not torch.allclose(inputs["pixel_values"], data.pixels[:2], atol=1e-4):
        raise RuntimeError("tiny BLIP-2: the saved image processor does not reproduce the training pixels")
    labels = encode_answers(processor, ["blue", "circle"], CPU)
    with torch.no_grad():
        expected = model(**inputs, labels=labels).logits
        got = loaded(**inputs, labels=labels).logits
        generated = loaded.generate(**inputs, max_new_tokens=4)
    if not torch.allclose(expected, got, atol=1e-5):
        raise RuntimeError("tiny BLIP-2: from_pretrained does not reproduce the saved model's logits")
    if generated.ndim != 2 or generated.shape[0] != 2:
        raise RuntimeError(f"tiny BLIP-2: generate returned shape {tuple(generated.shape)}")
