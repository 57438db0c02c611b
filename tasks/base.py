"""The task contract: what a dataset/task must provide so the training loop knows nothing about it.

A task knows its data (splits, loading from a hub id or a local path, offline), how to phrase a
prompt (zero-shot or with a one-shot exemplar), how to normalise answers and which questions are
closed. Metrics are computed by `runner.metrics` from predictions and these facts.

A split's images are an `ImageStore`: each image is kept as its source (a file, a zip member, a row of
a memory-mapped table) and decoded when asked for, so a 5,000-image dataset does not sit decoded in
memory, and images whose features are already cached are never decoded at all.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    closed: bool | None = None  # from the dataset's own answer-type column; None: judged by the answer


@dataclass(frozen=True)
class ZipMember:
    """An image inside a zip archive (SLAKE ships its images as imgs.zip)."""

    archive: str
    member: str


@dataclass(frozen=True)
class TableCell:
    """An image cell of a row of a `datasets.Dataset` (memory-mapped: reading it costs no RAM to keep)."""

    table: Any  # datasets.Dataset with the image column cast to Image(decode=False)
    column: str
    row: int


ImageSource = bytes | str | ZipMember | TableCell  # encoded bytes, a file path, a zip member, a table cell


@functools.lru_cache(maxsize=16)
def _open_zip(archive: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(archive)  # kept open: thousands of members are read from one archive


def read_source(source: ImageSource) -> bytes:
    """The encoded bytes of an image source (OSError/KeyError when it cannot be read)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, str):
        with open(source, "rb") as file:
            return file.read()
    if isinstance(source, ZipMember):
        return _open_zip(source.archive).read(source.member)
    cell = source.table[source.row][source.column]
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise OSError(f"row {source.row} column {source.column} holds no image bytes")


def source_name(source: ImageSource) -> str:
    """The file an image comes from, for errors (empty for bytes held in a table)."""
    if isinstance(source, str):
        return source
    if isinstance(source, ZipMember):
        return f"{source.archive}:{source.member}"
    return ""


def named(record: str, source: ImageSource) -> str:
    """`record`, with the image's file when it has one: "train.json record 3 (imgs/a.png)"."""
    name = source_name(source)
    if not name or name in record:
        return record
    folder = record.split(" ")[0].rpartition("/")[0]  # the table's folder: say the rest only
    return f"{record} ({name.removeprefix(folder + '/') if folder else name})"


class ImageStore(Mapping[str, Image.Image]):
    """Images by key, each decoded (to RGB) when it is looked up and not kept: iterate, don't collect.

    `records` names each image's first record, for errors ("train.json record 3: cannot read image").
    """

    def __init__(self, sources: dict[str, ImageSource], records: dict[str, str]):
        self._sources = sources
        self._records = records

    def __getitem__(self, key: str) -> Image.Image:
        source = self._sources[key]
        record = named(self._records[key], source)
        try:
            data = read_source(source)
        except (OSError, KeyError) as error:
            from runner.errors import UserError

            raise UserError(f"{record}: cannot read image: {error}") from error
        return decode_image(data, record)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def select(self, keys: Iterable[str]) -> ImageStore:
        """The images of `keys` only (still undecoded)."""
        keys = [key for key in dict.fromkeys(keys) if key in self._sources]
        return ImageStore({k: self._sources[k] for k in keys}, {k: self._records[k] for k in keys})

    def __or__(self, other: ImageStore) -> ImageStore:
        return ImageStore({**other._sources, **self._sources}, {**other._records, **self._records})


@dataclass
class Split:
    """A split of a task: examples plus the RGB images they refer to (each stored once, decoded lazily)."""

    name: str
    examples: list[Example]
    images: ImageStore
    skipped: int = 0  # records dropped: bad images (with skip_bad_images) and exact duplicates
    fingerprint: str = field(default="")  # sha256 over (image_key, question, answer) in order

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.examples)


def fingerprint(examples: list[Example]) -> str:
    """sha256 over (image, question, answer[, closed]) in order: equal fingerprints, equal questions."""
    digest = hashlib.sha256()
    for ex in examples:
        # A dataset's own closed/open label counts too; without one the digest is as it always was.
        closed = "" if ex.closed is None else f"\x1f{'closed' if ex.closed else 'open'}"
        digest.update(f"{ex.image_key}\x1f{ex.question}\x1f{ex.answer}{closed}\x1e".encode())
    return digest.hexdigest()


class Task(Protocol):
    """What every task module provides (see tasks/easy_vqa.py, tasks/vqa.py)."""

    name: str

    def load_split(self, split: str) -> Split:
        """Load 'train', 'validation' (carved from train, fixed seed) or 'test'."""

    def prompt(self, question: str, exemplar: Example | None = None) -> str:
        """The text the model sees (image tokens are added by the processor)."""

    def normalize_answer(self, answer: str) -> str:
        """Canonical form used for training targets and for scoring."""

    def is_closed(self, example: Example) -> bool:
        """True for closed questions: the dataset's own answer type where it has one, else a yes/no answer."""


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
