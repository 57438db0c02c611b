"""Scoring a model on a split: image features once per image, batched greedy generation, metrics.

Used by training-time validation, `runner eval` and promotion, so a number means the same thing
everywhere. Every evaluation also scores a shuffled-image control (each question paired with another
question's image): accuracy that survives shuffling was learned from the question, not the image.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from runner import exiting
from runner.config import TrialConfig
from runner.errors import UserError
from runner.eval import metrics
from runner.model.blip2 import (
    adapter_trains_qformer,
    compute_dtype,
    encode_prompts,
    image_token_id,
    load_blip2,
    resolve_device,
    text_embeddings,
)
from runner.model.features import (
    ImageFeatures,
    compute_image_features,
    trial_feature_cache,
)
from tasks import get_task
from tasks.base import Example, Task, fingerprint

log = logging.getLogger(__name__)

# Greedy decoding, fixed: the same settings in validation, test, eval stages and promotion.
DECODING = {"do_sample": False, "num_beams": 1}
CONTROL_SEED = 1234


@torch.no_grad()
def generate(
    model, processor, task: Task, examples: list[Example], image_keys: list[str], features: ImageFeatures,
    *, batch_size: int, max_new_tokens: int, exemplar: Example | None = None,
) -> list[str]:
    """Greedy answers for `examples`, each shown the image named in `image_keys`."""
    device = features.values.device
    image_token = image_token_id(processor)
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        exiting.check()
        batch = examples[start : start + batch_size]
        encoded = encode_prompts(processor, [task.prompt(ex.question, exemplar) for ex in batch], device)
        embeds = text_embeddings(model, encoded["input_ids"],
                                 features.language_inputs(model, image_keys[start : start + batch_size]), image_token)
        output = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=encoded["attention_mask"], max_new_tokens=max_new_tokens, **DECODING
        )
        answers.extend(text.strip() for text in processor.tokenizer.batch_decode(output, skip_special_tokens=True))
    return answers


def evaluate(
    model, processor, task: Task, examples: list[Example], features: ImageFeatures,
    *, batch_size: int, max_new_tokens: int, exemplar: Example | None = None, control: bool = True,
) -> tuple[dict[str, float], list[dict]]:
    """Metrics (see runner.metrics.METRIC_NAMES) plus `shuffled_exact_match`, and per-question rows."""
    kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, exemplar=exemplar)
    own = [ex.image_key for ex in examples]
    predictions = generate(model, processor, task, examples, own, features, **kwargs)
    references = [task.normalize_answer(ex.answer) for ex in examples]
    closed = [task.is_closed(ex) for ex in examples]
    scores = metrics.score(predictions, references, closed)
    rows = [
        {"question": ex.question, "answer": ref, "prediction": pred, "closed": is_closed, "image_key": ex.image_key}
        for ex, ref, pred, is_closed in zip(examples, references, predictions, closed)
    ]
    if control:
        control_predictions = generate(model, processor, task, examples, shuffled_images(own), features, **kwargs)
        scores["shuffled_exact_match"] = metrics.score(control_predictions, references, closed)["exact_match"]
        for row, prediction in zip(rows, control_predictions):
            row["shuffled_prediction"] = prediction
    return scores, rows


def shuffled_images(keys: list[str]) -> list[str]:
    """Replace every image by a different one: a seeded single cycle over the distinct images."""
    distinct = sorted(set(keys))
    random.Random(CONTROL_SEED).shuffle(distinct)
    other = {key: distinct[(i + 1) % len(distinct)] for i, key in enumerate(distinct)}
    return [other[key] for key in keys]


def draw_samples(examples: list[Example], n: int | None, seed: int, what: str) -> list[Example]:
    """A seeded random subset (not the first n: files are often sorted by image or question type)."""
    if n is None:
        return list(examples)
    if n > len(examples):
        raise UserError(f"{what}: {n} is larger than the split ({len(examples)} questions)")
    return random.Random(seed).sample(examples, n)


def majority_exact_match(train_answers: list[str], references: list[str]) -> float:
    """Exact match of always answering the most common training answer: the floor to beat."""
    majority = Counter(train_answers).most_common(1)[0][0]
    return sum(ref == majority for ref in references) / len(references)


@dataclass
class Evaluation:
    scores: dict[str, float]
    rows: list[dict]
    fingerprint: str  # of the questions scored: equal only when two scores are comparable


def one_shot_exemplar(task: Task, seed: int) -> Example:
    """The one-shot prompt's exemplar: drawn from train (fixed seed), never from the split scored."""
    return random.Random(seed).choice(task.load_split("train").examples)


class SplitScorer:
    """A split's questions, the base model (+ an adapter) and their image features, loaded once and scored
    as often as asked: with the adapter, or the bare base model (zero- or one-shot). Promotion and the
    stage comparison share one, so the post-sweep phase loads the model once, not once per score; a sweep
    loads it before its last trials end and adds the champion's adapter after (runner/eval/held_out.py)."""

    def __init__(self, config: TrialConfig, split: str, adapter: Path | None = None):
        """`adapter`: an epoch checkpoint or PEFT adapter directory (None: the bare model, until
        `add_adapter`; its features are then the ones an adapter of `config.lora_targets` needs)."""
        from runner.train.checkpoint import adapter_dir, adapter_weights

        if adapter is not None:
            adapter_weights(adapter_dir(adapter))  # a damaged adapter fails here, before the model loads
        self.config = config
        self.device = resolve_device(config.device)
        self.task = get_task(config.task, data=config.data, skip_bad_images=config.skip_bad_images,
                             val_fraction=config.val_fraction, seed=config.seed)
        data = self.task.load_split(split)
        n = min(config.max_eval_examples or len(data.examples), len(data.examples))
        self.examples = draw_samples(data.examples, n, config.seed, "max_eval_examples")
        self.model, self.processor = load_blip2(config.model, config.precision, self.device, config.model_revision)
        needed = {ex.image_key for ex in self.examples}
        dtype = compute_dtype(config.precision, self.device)
        vision_only = adapter_trains_qformer(adapter_dir(adapter)) if adapter is not None else config.trains_qformer
        self.features = compute_image_features(
            self.model, self.processor, data.images.select(needed), self.device, dtype,
            config.eval_batch_size, trial_feature_cache(config, dtype, self.model, self.processor, vision_only),
            vision_only=vision_only)
        self.lora_model = None
        if adapter is not None:
            self.add_adapter(adapter)

    def add_adapter(self, adapter: Path) -> None:
        """Put an adapter on the loaded model. After the features: a Q-Former adapter then applies in
        `language_inputs`. PEFT injects LoRA into the model in place; `disable_adapter` turns it off again
        for the bare-model scores."""
        from peft import PeftModel

        from runner.train.checkpoint import adapter_dir, adapter_weights

        if self.lora_model is not None:
            raise ValueError("this scorer holds an adapter already")
        folder = adapter_dir(adapter)
        adapter_weights(folder)
        if adapter_trains_qformer(folder) != self.features.vision_only:
            raise ValueError(f"{adapter}: its Q-Former adaptation needs other image features than this scorer's")
        self.lora_model = PeftModel.from_pretrained(self.model, folder)

    @functools.cached_property
    def exemplar(self) -> Example:
        return one_shot_exemplar(self.task, self.config.seed)

    def score(self, *, with_adapter: bool, one_shot: bool = False) -> Evaluation:
        if with_adapter and self.lora_model is None:
            raise ValueError("this scorer holds no adapter")
        bare = not with_adapter and self.lora_model is not None
        with self.lora_model.disable_adapter() if bare else contextlib.nullcontext():
            scores, rows = evaluate(self.model, self.processor, self.task, self.examples, self.features,
                                    exemplar=self.exemplar if one_shot else None,
                                    batch_size=self.config.eval_batch_size, max_new_tokens=self.config.max_new_tokens)
        return Evaluation(scores, rows, fingerprint(self.examples))


def score_adapter(config: TrialConfig, adapter: Path | None, split: str, *, one_shot: bool = False) -> Evaluation:
    """Score an adapter (epoch checkpoint or PEFT adapter directory) or the bare model on a split."""
    return SplitScorer(config, split, adapter).score(with_adapter=adapter is not None, one_shot=one_shot)


def write_predictions(rows: list[dict], path: Path) -> None:
    """Per-question predictions as JSON lines or CSV (by the file's suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
