"""VQA-RAD: radiology visual question answering (Lau et al. 2018), the task the sweeps tune on.

`data` says where it comes from:

* None: the hub dataset `HUB_ID` at `HUB_REVISION`;
* "owner/name" or "owner/name@revision": another hub copy or a pinned commit of it;
* a parquet file or a folder of parquet files (`train-*.parquet`/`test-*.parquet` or
  `train.parquet`/`test.parquet`, any depth, e.g. a hub snapshot) in the hub schema: columns
  image (a datasets Image struct {bytes, path}, or raw bytes), question, answer;
* a `datasets` `save_to_disk` folder (a DatasetDict with train and test);
* an image folder with `train.json`/`test.json` (a list of objects) or `train.csv`/`test.csv`
  whose records have image (a file name relative to the folder), question and answer.

Images are read with `decode=False` and decoded by `tasks.base.decode_image`, so a bad image is
reported with its file and row instead of failing inside `datasets`. Validation is carved from
train by image; test is loaded as is (never for model selection).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from runner.errors import UserError
from tasks.base import Split
from tasks.common import Row, VQATask, build_split

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

HUB_ID = "flaviagiammarino/vqa-rad"
# The hub dataset has no release tags, so the default follows its latest commit. To pin the data
# of a study, pass data="flaviagiammarino/vqa-rad@<commit sha>" (or a local copy).
HUB_REVISION = "main"

COLUMNS = ("image", "question", "answer")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


@dataclass
class VQARad(VQATask):
    """The VQA-RAD task, from the hub or a local copy (see the module docstring for `data`)."""

    name: ClassVar[str] = "vqa_rad"

    def _load_source(self, split: str) -> Split:
        return build_split(split, self._rows(split), skip_bad_images=self.skip_bad_images)

    def _rows(self, split: str) -> Iterator[Row]:
        if self.data is None:
            return _hub_rows(HUB_ID, HUB_REVISION, split)
        path = Path(self.data).expanduser()
        if path.exists():
            return _local_rows(path, split)
        if _HUB_ID.fullmatch(self.data):
            hub_id, _, revision = self.data.partition("@")
            note = f"data {self.data!r} is not a local path, so it was read as a hub id"
            return _hub_rows(hub_id, revision or HUB_REVISION, split, note)
        raise UserError(f"data path not found: {self.data}")


def _hub_rows(hub_id: str, revision: str, split: str, note: str = "") -> Iterator[Row]:
    """Rows of one split of a hub dataset (downloaded once into the datasets cache)."""
    import datasets

    if revision == HUB_REVISION:
        logger.info("loading %s at unpinned revision %s; pin one with data=%s@<sha>", hub_id,
                    revision, hub_id)
    try:
        dataset = datasets.load_dataset(hub_id, revision=revision, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise UserError(
            f"cannot load hub dataset {hub_id}@{revision} split {split} ({note or 'default data'};"
            f" offline? pass a local copy as data): {error}"
        ) from error
    yield from _dataset_rows(dataset, f"{hub_id}@{revision} {split}", base=None)


def _local_rows(path: Path, split: str) -> Iterator[Row]:
    """Rows of one split of a local copy, whichever of the supported layouts it has."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise UserError(f"{path}: expected a .parquet file or a folder")
        holds = "test" if path.name.startswith("test") else "train"
        if holds != split:
            raise UserError(
                f"{path} holds only the {holds} split; for {split} pass a folder with "
                f"train-*.parquet and test-*.parquet files"
            )
        return _parquet_rows([path], split)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _saved_rows(path, split)
    if any(path.rglob("*.parquet")):
        files = sorted({*path.rglob(f"{split}-*.parquet"), *path.rglob(f"{split}.parquet")})
        if not files:
            raise UserError(f"{path}: no {split}-*.parquet or {split}.parquet file")
        return _parquet_rows(files, split)
    tables = [path / f"{split}.{suffix}" for suffix in ("json", "csv")]
    present = [table for table in tables if table.exists()]
    if len(present) == 2:
        raise UserError(f"{path}: both {split}.json and {split}.csv exist; keep one")
    if present:
        return _table_rows(present[0])
    raise UserError(
        f"{path}: no VQA-RAD data for split {split}: expected parquet files, a save_to_disk "
        f"folder, or {split}.json/{split}.csv next to the images"
    )


def _parquet_rows(files: list[Path], split: str) -> Iterator[Row]:
    """Rows of parquet files in the hub schema; each file is loaded alone to name its rows."""
    import datasets

    for file in files:
        try:
            dataset = datasets.load_dataset("parquet", data_files=str(file), split="train")
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
            raise UserError(f"{file}: cannot read as parquet ({split} split): {error}") from error
        yield from _dataset_rows(dataset, str(file), base=file.parent)


def _saved_rows(folder: Path, split: str) -> Iterator[Row]:
    """Rows of a `save_to_disk` folder: a DatasetDict, or a single Dataset taken as train."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise UserError(f"{folder}: cannot load the save_to_disk folder: {error}") from error
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(f"{folder}: no {split} split (has: {', '.join(saved)})")
        dataset = saved[split]
    elif split == "train":
        dataset = saved
    else:
        raise UserError(f"{folder} holds a single dataset (used as train); it has no {split} split")
    yield from _dataset_rows(dataset, f"{folder} {split}", base=folder)


def _dataset_rows(dataset: Dataset, where: str, base: Path | None) -> Iterator[Row]:
    """Rows of a `datasets.Dataset` in the hub schema, images left encoded.

    `where` names the file or split in errors; `base` resolves relative image paths that come
    without bytes (a parquet written from file paths).
    """
    import datasets
    import pyarrow

    have = dataset.column_names
    missing = [column for column in COLUMNS if column not in have]
    if missing:
        raise UserError(f"{where}: missing columns {', '.join(missing)} (has: {', '.join(have)})")
    try:
        dataset = dataset.select_columns(list(COLUMNS))
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    except (ValueError, TypeError, pyarrow.ArrowException) as error:
        raise UserError(f"{where}: column image does not hold images: {error}") from error
    for index, row in enumerate(dataset):
        image = _image_source(row["image"], base)
        yield Row(image, row["question"], row["answer"], f"{where} row {index}")


def _image_source(cell: dict | None, base: Path | None) -> bytes | str | None:
    """Encoded bytes if present, else the file path (relative ones resolved against `base`)."""
    if not cell:
        return None
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path")
    if not path:
        return None
    if base is not None and not Path(path).is_absolute():
        return str(base / path)
    return path


def _table_rows(table: Path) -> Iterator[Row]:
    """Rows of `train.json`/`test.json` (a list of objects) or `.csv` beside the images."""
    folder = table.parent
    try:
        if table.suffix == ".json":
            records = list(_json_records(table))
        else:
            records = list(_csv_records(table))
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise UserError(f"{table}: cannot read: {error}") from error
    for name, record in records:
        missing = [column for column in COLUMNS if column not in record]
        if missing:
            raise UserError(f"{name}: missing columns {', '.join(missing)}")
        image = record["image"]
        source = str(folder / image.strip()) if isinstance(image, str) and image.strip() else None
        yield Row(source, record["question"], record["answer"], name)


def _json_records(table: Path) -> Iterator[tuple[str, dict]]:
    with table.open(encoding="utf-8") as file:
        records = json.load(file)
    if not isinstance(records, list):
        raise UserError(f"{table}: expected a JSON list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{table} record {index}: expected an object, got {record!r:.80}")
        yield f"{table} record {index}", record


def _csv_records(table: Path) -> Iterator[tuple[str, dict]]:
    with table.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{table}: missing columns {', '.join(missing)}")
        for record in reader:
            yield f"{table} line {reader.line_num}", record
