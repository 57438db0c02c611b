"""What every VQA task shares: prompts, answer normalisation, turning raw rows into a `Split`,
and carving a validation split out of train by image (when the source has none of its own).

Each task module only has to say where its rows come from (`VQATask._load_source`).

Keying an image (a hash of its decoded pixels) is the one costly step of loading: every trial of a
sweep loads the data again. So the key of each image's encoded bytes is remembered on the node's disk
(`RUNNER_CACHE/image-keys.sqlite`, content-addressed: a changed file is a new entry), and a trial
after the first reads and hashes the bytes but decodes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import tasks.base
from runner.errors import UserError
from tasks.base import (
    SPLITS,
    Example,
    ImageSource,
    ImageStore,
    Split,
    TableCell,
    decode_image,
    image_key,
    named,
    read_source,
)

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
    """Without an answer-type column, a question is closed (yes/no) when its reference answer is yes or no."""
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
    """One raw record before decoding: `image` is where its image is (None: absent)."""

    image: ImageSource | None
    question: object
    answer: object
    record: str  # how to name this record in an error, e.g. "data/train.json record 3"
    closed: bool | None = None  # the dataset's own answer type, where it has one


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
    """Key the images of `rows` (each distinct source once) and build a `Split` that decodes lazily.

    Empty questions/answers are always an error. An unreadable image (missing, empty, corrupt,
    too large) is an error naming the record, or, with `skip_bad_images`, the record is dropped
    and counted. Exact duplicates (same image content, question and answer) are dropped and
    counted too: they would only weight some examples twice in training and scoring.
    """
    keys = KeyCache.open()
    keyed: dict[object, str | UserError] = {}
    sources: dict[str, ImageSource] = {}
    records: dict[str, str] = {}
    examples: list[Example] = []
    seen: set[Example] = set()
    bad = duplicates = 0
    for row in rows:
        question = _text(row.question, "question", row.record)
        answer = _text(row.answer, "answer", row.record)
        identity = _identity(row.image)
        if identity not in keyed:
            keyed[identity] = _key(row, keys)
        key = keyed[identity]
        if isinstance(key, UserError):
            if not skip_bad_images:
                raise key  # the first record with this source: the error names it
            bad += 1
            continue
        example = Example(image_key=key, question=question, answer=answer, closed=row.closed)
        if example in seen:
            duplicates += 1
            continue
        seen.add(example)
        examples.append(example)
        if key not in sources:
            sources[key], records[key] = row.image, row.record
    keys.commit()
    if bad:
        logger.warning("%s: skipped %d records with unreadable images (skip_bad_images)", name, bad)
    if duplicates:
        logger.warning("%s: dropped %d exact duplicate records", name, duplicates)
    logger.info("%s: %d examples, %d images", name, len(examples), len(sources))
    return Split(name=name, examples=examples, images=ImageStore(sources, records), skipped=bad + duplicates)


def _identity(source: ImageSource | None) -> object:
    """What makes two rows' image sources the same source (a table cell by its position)."""
    if isinstance(source, (bytes, bytearray)):
        return hashlib.sha256(source).digest()  # identical bytes are keyed once
    if isinstance(source, TableCell):
        return (id(source.table), source.column, source.row)
    return source


def _key(row: Row, keys: KeyCache) -> str | UserError:
    """The image's key: remembered for these bytes, or decoded and hashed; a bad image is returned
    (to be remembered for this load), not raised."""
    if row.image is None or row.image == b"":
        return UserError(f"{row.record}: no image (missing or empty)")
    record = named(row.record, row.image)
    try:
        data = read_source(row.image)
    except (OSError, KeyError) as error:
        return UserError(f"{record}: cannot read image: {error}")
    digest = hashlib.sha256(data).hexdigest()
    known = keys.get(digest)
    if known is not None:
        key, width, height = known
        if width * height <= tasks.base.MAX_IMAGE_PIXELS:  # the bound holds today, not only when cached
            return key
    try:
        image = decode_image(data, record)
    except UserError as error:
        return error
    key = image_key(image)
    keys.put(digest, (key, *image.size))
    return key


Known = tuple[str, int, int]  # (pixel key, width, height)


class KeyCache:
    """sha256 of an image's encoded bytes -> its pixel key and size, on this node's disk (one SQLite file,
    safe for trials loading at once). A cache that cannot be opened is skipped: keys are then computed."""

    def __init__(self, path: Path | None):
        self.path = path
        self.known: dict[str, Known] = {}
        self.new: dict[str, Known] = {}
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("create table if not exists image_keys (digest text primary key, key text not null, "
                           "width integer not null, height integer not null)")
                self.known = {digest: (key, width, height) for digest, key, width, height
                              in db.execute("select digest, key, width, height from image_keys")}
        except (OSError, sqlite3.Error) as error:
            logger.warning("image-key cache %s unusable (%s); keying every image", path, error)
            self.path = None

    @classmethod
    def open(cls) -> KeyCache:
        # The same node cache as the image features (runner.model.paths.cache_dir).
        root = Path(os.environ.get("RUNNER_CACHE", Path.home() / ".cache" / "blip2-lora-runner"))
        return cls(root / "image-keys.sqlite")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, digest: str) -> Known | None:
        return self.known.get(digest) or self.new.get(digest)

    def put(self, digest: str, known: Known) -> None:
        self.new[digest] = known

    def commit(self) -> None:
        if self.path is None or not self.new:
            return
        try:
            with self._connect() as db:
                db.executemany("insert or ignore into image_keys values (?, ?, ?, ?)",
                               [(digest, *known) for digest, known in self.new.items()])
        except sqlite3.Error as error:
            logger.warning("image-key cache %s not updated (%s)", self.path, error)
        self.known.update(self.new)
        self.new = {}


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
    images = source.images.select(ex.image_key for ex in examples)
    return Split(name=name, examples=examples, images=images, skipped=skipped)


@dataclass
class VQATask:
    """Behaviour shared by the VQA tasks; subclasses implement `_load_source`.

    A source with a validation split of its own (Path-VQA, SLAKE) is used as it is. Otherwise
    `load_split("validation")` is carved from the source's train split (see `carve_validation`)
    and `load_split("train")` is the rest. The test split is loaded as is. Loaded splits are
    cached on the instance, so train and validation key the images once.
    """

    name: ClassVar[str]

    data: Any = None  # str | dict | None: what each task accepts is in its docstring
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
                own = self._load_source("validation")
                if own is not None:
                    self._splits.update(train=source, validation=own)
                    return self._splits[split]
                train, val = carve_validation(source.examples, self.val_fraction, self.seed)
                # Records dropped while loading are reported with train (they came from its source).
                self._splits["train"] = subset(source, "train", train, skipped=source.skipped)
                self._splits["validation"] = subset(source, "validation", val)
        return self._splits[split]

    def _load_source(self, split: str) -> Split | None:
        """The source's 'train', 'test', or its own 'validation' split (None: it has none, carve one)."""
        raise NotImplementedError

    def prompt(self, question: str, exemplar: Example | None = None) -> str:
        return make_prompt(question, exemplar)

    def normalize_answer(self, answer: str) -> str:
        return normalize_answer(answer)

    def is_closed(self, example: Example) -> bool:
        return example.closed if example.closed is not None else is_closed(example.answer)
