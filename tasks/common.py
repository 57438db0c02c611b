"""What both VQA tasks share: prompts, answer normalisation, turning raw rows into a `Split`,
and carving a validation split out of train by image.

Each task module only has to say where its rows come from (`VQATask._load_source`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from runner.errors import UserError
from tasks.base import SPLITS, Example, Split, decode_image, image_key

logger = logging.getLogger(__name__)

PROMPT = "Question: {question} Answer:"
# The exemplar is text only: BLIP-2 takes one image, so the exemplar's image cannot be shown.
ONE_SHOT_PROMPT = "Question: {ex_q} Answer: {ex_a}. Question: {question} Answer:"

CLOSED_ANSWERS = frozenset({"yes", "no"})


def normalize_answer(answer: str) -> str:
    """Gentle canonical form: trimmed, lowercase, single spaces, no trailing period.

    Deliberately no more than that (articles, punctuation): the metrics apply their own SQuAD
    normalisation, and training targets should stay close to what the annotators wrote.
    """
    text = " ".join(answer.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def is_closed(answer: str) -> bool:
    """A question is closed (yes/no) when its reference answer is yes or no."""
    return normalize_answer(answer) in CLOSED_ANSWERS


def make_prompt(question: str, exemplar: Example | None = None) -> str:
    """Zero-shot prompt, or one-shot with a text-only exemplar in front."""
    question = " ".join(question.split())
    if exemplar is None:
        return PROMPT.format(question=question)
    return ONE_SHOT_PROMPT.format(
        ex_q=" ".join(exemplar.question.split()),
        ex_a=normalize_answer(exemplar.answer),
        question=question,
    )


@dataclass(frozen=True)
class Row:
    """One raw record before decoding: `image` is encoded bytes or a file path (None: absent)."""

    image: bytes | str | None
    question: object
    answer: object
    record: str  # how to name this record in an error, e.g. "data/train.json record 3"


def _text(value: object, column: str, record: str) -> str:
    """A non-empty, stripped question/answer; numbers (JSON `2`) are accepted as text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        text = ""
    else:
        text = str(value).strip()
    if not text:
        raise UserError(f"{record}: empty or missing {column} ({value!r})")
    return text


def build_split(name: str, rows: Iterable[Row], *, skip_bad_images: bool) -> Split:
    """Decode and key the images of `rows` (each distinct source once) and build a `Split`.

    Empty questions/answers are always an error. An unreadable image (missing, empty, corrupt,
    too large) is an error naming the record, or, with `skip_bad_images`, the record is dropped
    and counted. Exact duplicates (same image content, question and answer) are dropped and
    counted too: they would only weight some examples twice in training and scoring.
    """
    decoded: dict[object, tuple[str, Image.Image] | UserError] = {}
    images: dict[str, Image.Image] = {}
    examples: list[Example] = []
    seen: set[Example] = set()
    bad = duplicates = 0
    for row in rows:
        question = _text(row.question, "question", row.record)
        answer = _text(row.answer, "answer", row.record)
        source: object = row.image
        if isinstance(source, (bytes, bytearray)):
            source = hashlib.sha256(source).digest()  # identical bytes decode once
        if source not in decoded:
            decoded[source] = _decode(row)
        result = decoded[source]
        if isinstance(result, UserError):
            if not skip_bad_images:
                raise result  # the first record with this source: the error names it
            bad += 1
            continue
        key, image = result
        example = Example(image_key=key, question=question, answer=answer)
        if example in seen:
            duplicates += 1
            continue
        seen.add(example)
        examples.append(example)
        images.setdefault(key, image)
    if bad:
        logger.warning("%s: skipped %d records with unreadable images (skip_bad_images)", name, bad)
    if duplicates:
        logger.warning("%s: dropped %d exact duplicate records", name, duplicates)
    logger.info("%s: %d examples, %d images", name, len(examples), len(images))
    return Split(name=name, examples=examples, images=images, skipped=bad + duplicates)


def _decode(row: Row) -> tuple[str, Image.Image] | UserError:
    """Decode one image source; a bad image is returned (to be cached), not raised."""
    if row.image is None or row.image == b"":
        return UserError(f"{row.record}: no image (missing or empty)")
    try:
        image = decode_image(row.image, row.record)
    except UserError as error:
        return error
    return image_key(image), image


def carve_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, validation) by image, deterministically for a seed.

    All questions about one image land on the same side, so validation images are unseen in
    training. Image keys are sorted, then shuffled with `random.Random(seed)`; validation gets
    round(fraction * n_images) images, at least 1 and leaving at least 1 for training.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"val_fraction must be strictly between 0 and 1, got {fraction}")
    keys = sorted({ex.image_key for ex in examples})
    if len(keys) < 2:
        raise UserError(f"cannot carve a validation split from {len(keys)} image(s): need 2+")
    random.Random(seed).shuffle(keys)
    n_val = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    val_keys = set(keys[:n_val])
    train = [ex for ex in examples if ex.image_key not in val_keys]
    val = [ex for ex in examples if ex.image_key in val_keys]
    return train, val


def subset(source: Split, name: str, examples: list[Example], skipped: int = 0) -> Split:
    """A split holding `examples` and only the images they use."""
    images = {ex.image_key: source.images[ex.image_key] for ex in examples}
    return Split(name=name, examples=examples, images=images, skipped=skipped)


@dataclass
class VQATask:
    """Behaviour shared by the VQA tasks; subclasses implement `_load_source`.

    `load_split("validation")` is carved from the source's train split (see `carve_validation`)
    and `load_split("train")` is the rest; the test split is loaded as is. Loaded splits are
    cached on the instance, so train and validation decode the images once.
    """

    name: ClassVar[str]

    data: str | None = None
    skip_bad_images: bool = False
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        # Not a dataclass field: asdict(task) (e.g. to log the config) must not copy images.
        self._splits: dict[str, Split] = {}
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(
                f"val_fraction must be strictly between 0 and 1, got {self.val_fraction}"
            )

    def load_split(self, split: str) -> Split:
        """Load 'train', 'validation' (carved from train by image) or 'test'."""
        if split not in SPLITS:
            known = ", ".join(SPLITS)
            raise UserError(f"unknown split {split!r} for task {self.name}; known: {known}")
        if split not in self._splits:
            if split == "test":
                self._splits["test"] = self._load_source("test")
            else:
                source = self._load_source("train")
                train, val = carve_validation(source.examples, self.val_fraction, self.seed)
                # Records dropped while loading are reported with train (they came from its source).
                self._splits["train"] = subset(source, "train", train, skipped=source.skipped)
                self._splits["validation"] = subset(source, "validation", val)
        return self._splits[split]

    def _load_source(self, split: str) -> Split:
        """The source's 'train' (before the carve) or 'test' split."""
        raise NotImplementedError

    def prompt(self, question: str, exemplar: Example | None = None) -> str:
        return make_prompt(question, exemplar)

    def normalize_answer(self, answer: str) -> str:
        return normalize_answer(answer)

    def is_closed(self, answer: str) -> bool:
        return is_closed(answer)
