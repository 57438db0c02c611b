"""The task contract: what a dataset/task must provide so the training loop knows nothing about it.

A task knows its data (splits, loading from a hub id or a local path, offline), how to phrase a
prompt (zero-shot or with a one-shot exemplar), how to normalise answers and which questions are
closed (yes/no). Metrics are computed by `runner.metrics` from predictions and these facts.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

SPLITS = ("train", "validation", "test")

# Larger images are refused (a radiology slice is ~0.3 MP; 50 MP is a mistake or a bomb). Checked
# from the header before decoding, so a huge file costs nothing. Pillow's own bomb guard is 179 MP.
MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True)
class Example:
    """One question about one image."""

    image_key: str  # sha256 of the decoded RGB pixels: images are shared by many questions
    question: str
    answer: str


@dataclass
class Split:
    """A split of a task: examples plus the RGB images they refer to (each stored once)."""

    name: str
    examples: list[Example]
    images: dict[str, Image.Image]
    skipped: int = 0  # records dropped: bad images (with skip_bad_images) and exact duplicates
    fingerprint: str = field(default="")  # sha256 over (image_key, question, answer) in order

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.examples)


def fingerprint(examples: list[Example]) -> str:
    """sha256 over (image, question, answer) in order: equal fingerprints, equal questions."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.image_key}\x1f{ex.question}\x1f{ex.answer}\x1e".encode())
    return digest.hexdigest()


class Task(Protocol):
    """What every task module provides (see tasks/easy_vqa.py, tasks/vqa_rad.py)."""

    name: str

    def load_split(self, split: str) -> Split:
        """Load 'train', 'validation' (carved from train, fixed seed) or 'test'."""

    def prompt(self, question: str, exemplar: Example | None = None) -> str:
        """The text the model sees (image tokens are added by the processor)."""

    def normalize_answer(self, answer: str) -> str:
        """Canonical form used for training targets and for scoring."""

    def is_closed(self, answer: str) -> bool:
        """True for closed (yes/no) questions, judged by the reference answer."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, 16-bit, RGBA, palette, CMYK ... all become 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit integer or float grayscale (DICOM exports): scale the real range to 0..255,
        # not clip.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype("uint8"), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white rather than dropping alpha (transparent pixels would turn black).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_key(image: Image.Image) -> str:
    """Content hash of an RGB image: the same picture in two files is one image."""
    digest = hashlib.sha256()
    digest.update(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]


def decode_image(data: bytes | str, record: str) -> Image.Image:
    """Open image bytes or a path fully (so corruption shows now) and make it RGB.

    `record` names the record in the error, e.g. "train.parquet row 17".
    """
    from runner.errors import UserError

    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise UserError(
                    f"{record}: image is {opened.width}x{opened.height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS:,} allowed"
                )
            opened.load()
            return to_rgb(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{record}: cannot read image: {error}") from error
