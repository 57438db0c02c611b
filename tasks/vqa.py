"""Any VQA dataset — a team's own or a published one — read through a column mapping.

`data` (`trial.data`) is a path or a hub id, or a mapping that also says which column is which:

    data:
      path: /data/our_vqa              # a local file or folder, or a hub id owner/name[@revision]
      columns: {image: img_path, question: q, answer: a, answer_type: kind}
      filter: {q_lang: en}             # keep only records whose column holds one of these values
      images: imgs.zip                 # where relative image paths resolve: a folder or a .zip

Every key is optional for a named task (its defaults fill the rest); the generic `vqa` task needs
`path`. `answer_type` is the dataset's own closed/open label (values CLOSED/OPEN, any case): used
when mapped or when a column of that name is present; otherwise a question is closed when its
answer is yes/no.

Layouts of a local copy (or of a hub snapshot, which is read the same way once downloaded):

* a parquet / CSV / JSON (a list of objects) / JSON-lines file: one split, named by the file
  (`test*` test, `validation*`/`valid*`/`val*` validation, anything else train);
* a folder of parquet files (`{split}-*.parquet` or `{split}.parquet`, any depth: a hub snapshot);
* a `datasets` `save_to_disk` folder (a DatasetDict, or one Dataset taken as train);
* a folder with `{split}.json`/`.jsonl`/`.csv` next to the images (paths relative to it, or to
  `images`, which may be a zip archive: SLAKE's `imgs.zip`).

A split the source lacks: validation is then carved from train by image; train and test are
errors. Images are keyed from their encoded bytes (`tasks.common.build_split`) and decoded only
when used, so a bad image is reported with its file and row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from runner.errors import UserError
from tasks.base import ImageSource, Split, TableCell, ZipMember
from tasks.common import Row, VQATask, build_split

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

ROLES = ("image", "question", "answer", "answer_type")
SPEC_KEYS = ("path", "columns", "filter", "images")
TABLES = (".json", ".jsonl", ".csv")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


@dataclass(frozen=True)
class DataSpec:
    """Where a VQA dataset is and how to read it (see the module docstring)."""

    path: str | None = None
    """A local file or folder, or a hub id `owner/name[@revision]`; None: the task's own hub copy."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our role (image, question, answer, answer_type) -> the dataset's column; unnamed roles keep their name."""
    filter: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Column -> the values kept (e.g. {"q_lang": ("en",)})."""
    images: str | None = None
    """Folder or .zip (relative to the data folder) where relative image paths resolve; None: the table's folder."""

    def column(self, role: str) -> str:
        return self.columns.get(role, role)

    def describe(self) -> str:
        """The mapping and filter in words, for logs and the report."""
        parts = [f"{role}={self.columns[role]}" for role in ROLES if self.columns.get(role, role) != role]
        text = f"columns {', '.join(parts)}" if parts else ""
        if self.filter:
            kept = "; ".join(f"{column} in {{{', '.join(values)}}}" for column, values in self.filter.items())
            text = f"{text}; only {kept}" if text else f"only {kept}"
        return text


def parse_spec(data: Any, defaults: DataSpec) -> DataSpec:
    """`trial.data` (None, a path/hub id, or a mapping) over a task's defaults; every problem at once."""
    if data is None:
        return defaults
    if isinstance(data, str):
        return dataclasses.replace(defaults, path=data)
    if not isinstance(data, dict):
        raise UserError(f"trial.data: expected a path, a hub id or a mapping, got {data!r}")
    problems = [f"trial.data.{key}: unknown key (known: {', '.join(SPEC_KEYS)})" for key in data
                if key not in SPEC_KEYS]
    for key in ("path", "images"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"trial.data.{key}: expected a string, got {data[key]!r}")
    columns = data.get("columns") or {}
    if not isinstance(columns, dict):
        problems.append(f"trial.data.columns: expected a mapping of {', '.join(ROLES)} to column names")
        columns = {}
    for role, column in columns.items():
        if role not in ROLES:
            problems.append(f"trial.data.columns.{role}: unknown role (known: {', '.join(ROLES)})")
        elif not isinstance(column, str) or not column:
            problems.append(f"trial.data.columns.{role}: expected a column name, got {column!r}")
    filters: dict[str, tuple[str, ...]] = {}
    raw_filter = data.get("filter") or {}
    if not isinstance(raw_filter, dict):
        problems.append("trial.data.filter: expected a mapping of column to value(s)")
        raw_filter = {}
    for column, values in raw_filter.items():
        values = values if isinstance(values, list) else [values]
        if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
            problems.append(f"trial.data.filter.{column}: expected a value or a list of values, got {values!r}")
        else:
            filters[str(column)] = tuple(str(v) for v in values)
    if problems:
        raise UserError("; ".join(problems))
    return DataSpec(path=data.get("path", defaults.path), columns={**defaults.columns, **columns},
                    filter=filters if "filter" in data else defaults.filter,
                    images=data.get("images", defaults.images))


@dataclass
class VQA(VQATask):
    """A VQA dataset of your own: `data` names it (a path, a hub id, or a mapping; module docstring)."""

    name: ClassVar[str] = "vqa"
    label: ClassVar[str] = "VQA data"
    hub_id: ClassVar[str | None] = None  # the task's own hub copy, used when `data` gives no path
    hub_revision: ClassVar[str] = "main"
    hub_files: ClassVar[tuple[str, ...] | None] = None  # what `runner fetch` downloads (None: everything)
    defaults: ClassVar[DataSpec] = DataSpec()
    benchmark: ClassVar[str | None] = None  # its name in Med-PaLM M's Table 2, when it is one of them

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec = parse_spec(self.data, self.defaults)
        if self.spec.path is None and self.hub_id is None:
            raise UserError(f"task {self.name}: trial.data must name the data (a path, a hub id, or a mapping "
                            "with path and columns)")
        self._root: Path | None = None

    def describe(self) -> str:
        """The data in words: what it is, where from, which mapping and filter."""
        where = self.spec.path or f"{self.hub_id}@{self.hub_revision}"
        details = self.spec.describe()
        return f"{self.label} ({where}{'; ' + details if details else ''})"

    def root(self) -> Path:
        """The local file or folder holding the data: the path given, or a hub snapshot (downloaded once)."""
        if self._root is None:
            self._root = self._locate()
        return self._root

    def _locate(self) -> Path:
        from tasks.hub import snapshot

        if self.spec.path is None:
            return snapshot(self.hub_id, self.hub_revision, allow_patterns=self.hub_files,
                            note=f"task {self.name}'s default data")
        path = Path(self.spec.path).expanduser()
        if path.exists():
            return path
        if HUB_ID.fullmatch(self.spec.path):
            hub_id, _, revision = self.spec.path.partition("@")
            own = hub_id == self.hub_id
            return snapshot(hub_id, revision or self.hub_revision, allow_patterns=self.hub_files if own else None,
                            note=f"data {self.spec.path!r} is not a local path, so it was read as a hub id")
        raise UserError(f"data path not found: {self.spec.path}")

    def _load_source(self, split: str) -> Split | None:
        rows = split_rows(self.root(), split, self.spec)
        if rows is None:
            if split != "validation":
                raise UserError(f"{self.root()}: no {split} split (task {self.name})")
            return None
        return build_split(split, rows, skip_bad_images=self.skip_bad_images)


# --- reading one split of a local copy ------------------------------------------------------------


def split_rows(root: Path, split: str, spec: DataSpec) -> Iterator[Row] | None:
    """Rows of `split` in whichever supported layout `root` has; None when it has no such split."""
    if root.is_file():
        if root.suffix not in (".parquet", *TABLES):
            raise UserError(f"{root}: expected a .parquet, .csv, .json or .jsonl file, or a folder")
        holds = split_of(root.name)
        if holds != split:
            if split == "validation":
                return None
            raise UserError(f"{root} holds only the {holds} split; for {split} pass a folder with one file "
                            f"per split (train, test and optionally validation)")
        return _parquet_rows([root], spec) if root.suffix == ".parquet" else _table_rows(root, root.parent, spec)
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        return _saved_rows(root, split, spec)
    if any(root.rglob("*.parquet")):
        files = sorted({file for name in SPLIT_NAMES[split]
                        for file in (*root.rglob(f"{name}-*.parquet"), *root.rglob(f"{name}.parquet"))})
        if not files:
            if split == "validation":
                return None
            raise UserError(f"{root}: no {split}-*.parquet or {split}.parquet file")
        return _parquet_rows(files, spec)
    tables = [root / f"{name}{suffix}" for name in SPLIT_NAMES[split] for suffix in TABLES]
    present = [table for table in tables if table.exists()]
    if len(present) > 1:
        raise UserError(f"{root}: {' and '.join(t.name for t in present)} both hold the {split} split; keep one")
    if present:
        return _table_rows(present[0], root, spec)
    if split == "validation" and any((root / f"{name}{suffix}").exists() for name in ("train",) for suffix in TABLES):
        return None
    raise UserError(f"{root}: no data for split {split}: expected parquet files, a save_to_disk folder, "
                    f"or {split}.json/.jsonl/.csv next to the images")


def split_of(filename: str) -> str:
    """The split a single file holds, by its name."""
    lowered = filename.lower()
    for split in ("test", "validation"):
        if any(lowered.startswith(name) for name in SPLIT_NAMES[split]):
            return split
    return "train"


def _parquet_rows(files: list[Path], spec: DataSpec) -> Iterator[Row]:
    """Rows of parquet files; each file is loaded alone (memory-mapped by `datasets`) to name its rows."""
    import datasets

    for file in files:
        try:
            dataset = datasets.load_dataset("parquet", data_files=str(file), split="train")
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
            raise UserError(f"{file}: cannot read as parquet: {error}") from error
        yield from _dataset_rows(dataset, str(file), file.parent, spec)


def _saved_rows(folder: Path, split: str, spec: DataSpec) -> Iterator[Row] | None:
    """Rows of a `save_to_disk` folder: a DatasetDict, or a single Dataset taken as train."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise UserError(f"{folder}: cannot load the save_to_disk folder: {error}") from error
    if isinstance(saved, datasets.DatasetDict):
        name = next((n for n in SPLIT_NAMES[split] if n in saved), None)
        if name is None:
            if split == "validation":
                return None
            raise UserError(f"{folder}: no {split} split (has: {', '.join(saved)})")
        dataset = saved[name]
    elif split == "train":
        dataset = saved
    elif split == "validation":
        return None
    else:
        raise UserError(f"{folder} holds a single dataset (used as train); it has no {split} split")
    return _dataset_rows(dataset, f"{folder} {split}", folder, spec)


def _dataset_rows(dataset: Dataset, where: str, base: Path, spec: DataSpec) -> Iterator[Row]:
    """Rows of a `datasets.Dataset`; image cells stay in the (memory-mapped) table until used.

    `where` names the file or split in errors; `base` resolves relative image paths that come
    without bytes (a parquet written from file paths).
    """
    import datasets
    import pyarrow

    columns = _mapped(spec, dataset.column_names, where)
    image = columns["image"]
    try:
        dataset = dataset.select_columns(list(dict.fromkeys([*columns.values(), *spec.filter])))
        kind = dataset.features[image]
        if not (isinstance(kind, datasets.Value) and kind.dtype in ("string", "large_string")):  # paths stay text
            dataset = dataset.cast_column(image, datasets.Image(decode=False))
    except (ValueError, TypeError, pyarrow.ArrowException) as error:
        raise UserError(f"{where}: column {image!r} (image) does not hold images: {error}") from error
    keep = _kept(dataset, spec, where)
    resolve = ImageRoot.of(base, spec)
    texts = {column: list(dataset[column]) for column in dict.fromkeys(columns.values()) if column != image}
    cells = dataset.select_columns([image])  # one column: reading a cell touches nothing else
    for index in keep:
        record = {column: values[index] for column, values in texts.items()}
        yield _row(record, _cell_source(cells, image, index, resolve), columns, f"{where} row {index}")


def _cell_source(cells: Dataset, column: str, index: int, resolve: ImageRoot) -> ImageSource | None:
    """A cell with bytes stays a reference into the table; a path-only cell becomes that file."""
    cell = cells[index][column]
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return TableCell(cells, column, index)
        return resolve(cell["path"]) if cell.get("path") else None
    if isinstance(cell, str) and cell.strip():
        return resolve(cell.strip())
    return None


def _kept(dataset: Dataset, spec: DataSpec, where: str) -> list[int]:
    """Row indices passing the filter; a filter value no row has is an error (a typo, or the wrong column)."""
    keep = list(range(len(dataset)))
    for column, values in spec.filter.items():
        cells = [str(v) for v in list(dataset[column])]
        _check_filter(column, values, set(cells), where)
        wanted = set(values)
        keep = [i for i in keep if cells[i] in wanted]
    return keep


def _check_filter(column: str, values: tuple[str, ...], seen: set[str], where: str) -> None:
    absent = [v for v in values if v not in seen]
    if absent:
        raise UserError(f"{where}: filter {column}: no record has {', '.join(map(repr, absent))} "
                        f"(values: {', '.join(sorted(seen)[:20])})")


def _mapped(spec: DataSpec, have: list[str], where: str) -> dict[str, str]:
    """Role -> column for this file; a mapped column that is absent is an error naming it."""
    columns = {role: spec.column(role) for role in ROLES}
    if "answer_type" not in spec.columns and "answer_type" not in have:
        del columns["answer_type"]  # optional unless mapped: closed/open then comes from the answer
    missing = [f"{column!r} ({role})" for role, column in columns.items() if column not in have]
    missing += [f"{column!r} (filter)" for column in spec.filter if column not in have]
    if missing:
        raise UserError(f"{where}: no column {', '.join(missing)} (has: {', '.join(have)}); "
                        "map yours with trial.data.columns")
    return columns


def _row(record: dict, image: ImageSource | None, columns: dict[str, str], name: str) -> Row:
    closed = None
    if "answer_type" in columns:
        closed = closed_label(record[columns["answer_type"]], columns["answer_type"], name)
    return Row(image, record[columns["question"]], record[columns["answer"]], name, closed=closed)


def closed_label(value: object, column: str, record: str) -> bool:
    """CLOSED/OPEN (any case) -> True/False; anything else names the column and record."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in ("closed", "open"):
        raise UserError(f"{record}: column {column!r} (answer_type) holds {value!r}; expected CLOSED or OPEN")
    return text == "closed"


@dataclass(frozen=True)
class ImageRoot:
    """Where relative image paths resolve: a folder, or a zip archive (members found with or without
    the archive's own top folder, e.g. `imgs/xmlab1/source.jpg` for `xmlab1/source.jpg`)."""

    folder: Path
    archive: Path | None = None
    members: frozenset[str] = frozenset()

    @classmethod
    def of(cls, base: Path, spec: DataSpec) -> ImageRoot:
        if spec.images is None:
            return cls(base)
        place = base / spec.images
        if place.suffix == ".zip" and place.is_file():
            try:
                with zipfile.ZipFile(place) as archive:
                    return cls(base, place, frozenset(archive.namelist()))
            except (OSError, zipfile.BadZipFile) as error:
                raise UserError(f"{place}: cannot open the image archive: {error}") from error
        unpacked = place.with_suffix("") if place.suffix == ".zip" else place
        if unpacked.is_dir():  # the archive, unpacked next to the tables
            return cls(unpacked)
        raise UserError(f"trial.data.images: {place} is neither a folder nor a zip archive")

    def __call__(self, name: str) -> ImageSource:
        if self.archive is None:
            return name if Path(name).is_absolute() else str(self.folder / name)
        nested = f"{self.archive.stem}/{name}"
        member = nested if name not in self.members and nested in self.members else name
        return ZipMember(str(self.archive), member)


def _table_rows(table: Path, base: Path, spec: DataSpec) -> Iterator[Row]:
    """Rows of a JSON list, JSON-lines or CSV file; images relative to `base` (or `spec.images`)."""
    try:
        records = list(_csv_records(table) if table.suffix == ".csv" else _json_records(table))
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise UserError(f"{table}: cannot read: {error}") from error
    have = list(dict.fromkeys(key for _, record in records for key in record))
    columns = _mapped(spec, have, str(table))
    for column, values in spec.filter.items():
        seen = {str(record.get(column)) for _, record in records}
        _check_filter(column, values, seen, str(table))
        records = [(n, r) for n, r in records if str(r.get(column)) in values]
    resolve = ImageRoot.of(base, spec)
    for name, record in records:
        missing = [column for column in columns.values() if column not in record]
        if missing:
            raise UserError(f"{name}: missing column {', '.join(map(repr, missing))}")
        image = record[columns["image"]]
        source = resolve(image.strip()) if isinstance(image, str) and image.strip() else None
        yield _row(record, source, columns, name)


def _json_records(table: Path) -> Iterator[tuple[str, dict]]:
    with table.open(encoding="utf-8") as file:
        if table.suffix == ".jsonl":
            records = [json.loads(line) for line in file if line.strip()]
        else:
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
        for record in reader:
            yield f"{table} line {reader.line_num}", record
