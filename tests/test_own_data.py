"""Bring your own data: SLAKE (JSON records + imgs.zip), Path-VQA (parquet with a datasets Image struct) and
a CSV of a team's own with a column mapping, each written here in its real layout; the closed/open counts
checked against each dataset's answer-type column; every bad mapping one line naming the column and file."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import datasets
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.errors import UserError
from tasks import get_task
from tasks.path_vqa import PathVQA
from tasks.slake import Slake
from tasks.vqa import VQA
from tests.test_tasks import MODES, make_image

SLAKE_SPLITS = {"train": 8, "validation": 3, "test": 3}  # images per split


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png(mode: str, seed: int, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    make_image(mode, seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def slake_records(split: str, first_image: int, n_images: int) -> list[dict]:
    """Per image: an English closed yes/no, an English CLOSED question whose answer is not yes/no (SLAKE has
    these: "Which is bigger, ...?"), an English open one and a Chinese open one."""
    out = []
    for i in range(first_image, first_image + n_images):
        name = f"xmlab{i}/source.jpg"
        common = {"img_id": i, "img_name": name, "modality": "CT", "location": "Abdomen", "base_type": "vqa"}
        out += [
            {**common, "qid": 4 * i, "question": f"Is there a liver in image {i}?", "answer": "Yes",
             "q_lang": "en", "answer_type": "CLOSED", "content_type": "Organ"},
            {**common, "qid": 4 * i + 1, "question": f"Which is bigger in image {i}, kidney or liver?",
             "answer": "Liver", "q_lang": "en", "answer_type": "CLOSED", "content_type": "Size"},
            {**common, "qid": 4 * i + 2, "question": f"What modality is image {i}?", "answer": "CT",
             "q_lang": "en", "answer_type": "OPEN", "content_type": "Modality"},
            {**common, "qid": 4 * i + 3, "question": f"图{i}是什么模态?", "answer": "CT",
             "q_lang": "zh", "answer_type": "OPEN", "content_type": "Modality"},
        ]
    return out


def slake_copy(root: Path, *, unzipped: bool = False) -> Path:
    """A local copy in BoKelvin/SLAKE's layout: {train,validation,test}.json next to imgs.zip, whose members
    sit under the archive's own top folder (imgs/xmlab<i>/source.jpg)."""
    root.mkdir(parents=True)
    first = 0
    archive = zipfile.ZipFile(root / "imgs.zip", "w") if not unzipped else None
    for split, n in SLAKE_SPLITS.items():
        (root / f"{split}.json").write_text(json.dumps(slake_records(split, first, n), ensure_ascii=False))
        for i in range(first, first + n):
            data = png(MODES[i % len(MODES)], seed=i)
            if archive is not None:
                archive.writestr(f"imgs/xmlab{i}/source.jpg", data)
            else:
                (root / "imgs" / f"xmlab{i}").mkdir(parents=True)
                (root / "imgs" / f"xmlab{i}" / "source.jpg").write_bytes(data)
        first += n
    if archive is not None:
        archive.close()
    return root


def path_vqa_copy(root: Path, sizes=(("train", 6), ("validation", 3), ("test", 3))) -> Path:
    """A local copy in flaviagiammarino/path-vqa's layout: data/{split}-00000-of-00001.parquet with the image
    as a datasets Image struct {bytes, path}, and question/answer."""
    (root / "data").mkdir(parents=True)
    first = 0
    for split, n in sizes:
        rows = {"image": [], "question": [], "answer": []}
        for i in range(first, first + n):
            for question, answer in ((f"is there necrosis in {i}?", "yes"), (f"what is shown in {i}?", "gland")):
                rows["image"].append({"bytes": png("RGB", seed=100 + i), "path": None})
                rows["question"].append(question)
                rows["answer"].append(answer)
        table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        first += n
    return root


def own_csv(root: Path, n_images: int = 8) -> Path:
    """A team's own data: train.csv/test.csv with their own column names, images in a subfolder; three
    questions per image, the last two images' six in test.csv."""
    (root / "pictures").mkdir(parents=True)
    for i in range(n_images):
        make_image("L", seed=200 + i).save(root / "pictures" / f"case{i}.png")
    header = "img_path,q,a,kind,site\n"
    lines = [f"pictures/case{i}.png,finding {j} in case {i}?,{('yes', 'mass', 'left')[j]},"
             f"{('CLOSED', 'closed', 'Open')[j]},{('A', 'B')[i % 2]}\n" for i in range(n_images) for j in range(3)]
    (root / "train.csv").write_text(header + "".join(lines[:-6]))
    (root / "test.csv").write_text(header + "".join(lines[-6:]))
    return root


OWN = {"columns": {"image": "img_path", "question": "q", "answer": "a", "answer_type": "kind"}}


# --- SLAKE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unzipped", [False, True])
def test_slake_layout_bilingual_by_default(tmp_path: Path, unzipped: bool) -> None:
    task = Slake(data=str(slake_copy(tmp_path / "slake", unzipped=unzipped)))
    splits = {name: task.load_split(name) for name in ("train", "validation", "test")}
    for name, n_images in SLAKE_SPLITS.items():  # its own validation split, not carved from train
        assert len(splits[name].images) == n_images and len(splits[name].examples) == 4 * n_images
    image = next(iter(splits["train"].images.values()))
    assert image.mode == "RGB" and image.size == (24, 16)
    assert {ex.question[0] for ex in splits["test"].examples} >= {"图"}
    assert "en + zh (bilingual, as Med-PaLM M)" in task.describe()


def test_slake_closed_open_come_from_its_answer_type(tmp_path: Path) -> None:
    root = slake_copy(tmp_path / "slake")
    task = Slake(data=str(root))
    test = task.load_split("test")
    records = json.loads((root / "test.json").read_text())
    closed = [task.is_closed(ex) for ex in test.examples]
    assert sum(closed) == sum(r["answer_type"] == "CLOSED" for r in records) == 6
    assert len(closed) - sum(closed) == sum(r["answer_type"] == "OPEN" for r in records) == 6
    # "Liver" is a closed question in SLAKE, though not a yes/no answer.
    assert all(task.is_closed(ex) for ex in test.examples if ex.answer == "Liver")


def test_slake_english_only(tmp_path: Path) -> None:
    task = get_task("slake", data={"path": str(slake_copy(tmp_path / "slake")), "filter": {"q_lang": "en"}})
    test = task.load_split("test")
    assert len(test.examples) == 3 * SLAKE_SPLITS["test"]
    assert not any(ex.question.startswith("图") for ex in test.examples)
    assert "questions in en (Med-PaLM M used en + zh)" in task.describe()


def test_slake_filter_value_no_record_has(tmp_path: Path) -> None:
    task = Slake(data={"path": str(slake_copy(tmp_path / "slake")), "filter": {"q_lang": "EN"}})
    with pytest.raises(UserError, match=r"train\.json: filter q_lang: no record has 'EN' \(values: en, zh\)"):
        task.load_split("train")


def test_slake_image_missing_from_the_archive_names_the_record(tmp_path: Path) -> None:
    root = slake_copy(tmp_path / "slake")
    records = json.loads((root / "test.json").read_text())
    records[5]["img_name"] = "xmlab999/source.jpg"
    (root / "test.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match=r"test\.json record 5 \(imgs\.zip:xmlab999/source\.jpg\): cannot read image: .*no item"):
        Slake(data=str(root)).load_split("test")


# --- Path-VQA ------------------------------------------------------------------------------------


def test_path_vqa_layout_uses_its_own_validation(tmp_path: Path) -> None:
    task = PathVQA(data=str(path_vqa_copy(tmp_path / "pvqa")))
    train, validation, test = (task.load_split(s) for s in ("train", "validation", "test"))
    assert (len(train.images), len(validation.images), len(test.images)) == (6, 3, 3)
    assert (len(train.examples), len(validation.examples), len(test.examples)) == (12, 6, 6)
    assert not set(train.images) & set(validation.images)
    # No answer-type column: closed means a yes/no answer.
    assert [task.is_closed(ex) for ex in test.examples] == [True, False] * 3
    assert all(ex.closed is None for ex in test.examples)
    assert next(iter(test.images.values())).mode == "RGB"


def test_path_vqa_without_validation_carves_one(tmp_path: Path) -> None:
    root = path_vqa_copy(tmp_path / "pvqa", sizes=(("train", 10), ("test", 2)))
    task = PathVQA(data=str(root))
    assert len(task.load_split("train").images) + len(task.load_split("validation").images) == 10


# --- your own CSV with a mapping -----------------------------------------------------------------


def test_csv_with_a_custom_mapping(tmp_path: Path) -> None:
    root = own_csv(tmp_path / "ours")
    task = get_task("vqa", data={**OWN, "path": str(root)})
    test = task.load_split("test")
    kinds = [line.split(",")[3].lower() for line in (root / "test.csv").read_text().splitlines()[1:]]
    assert [task.is_closed(ex) for ex in test.examples] == [kind == "closed" for kind in kinds]
    assert sum(task.is_closed(ex) for ex in test.examples) == 4  # "mass" is closed by its kind column
    train, validation = task.load_split("train"), task.load_split("validation")
    assert len(train.images) + len(validation.images) == 6  # no validation file: carved by image
    assert "columns image=img_path, question=q, answer=a, answer_type=kind" in task.describe()


def test_csv_filter_keeps_only_matching_rows(tmp_path: Path) -> None:
    task = VQA(data={**OWN, "path": str(own_csv(tmp_path / "ours")), "filter": {"site": ["A"]}})
    test = task.load_split("test")
    assert len(test.examples) == 3 and {ex.question.split()[-1] for ex in test.examples} == {"6?"}


@pytest.mark.parametrize("data, message", [
    ({"columns": {"image": "picture"}}, r"train\.csv: no column 'picture' \(image\).*has: img_path, q, a, kind"),
    ({"columns": {**OWN["columns"], "answer_type": "type"}}, r"train\.csv: no column 'type' \(answer_type\)"),
    ({**OWN, "filter": {"lang": "en"}}, r"train\.csv: no column 'lang' \(filter\)"),
    ({**OWN, "colums": {}}, r"trial\.data\.colums: unknown key \(known: path, columns, filter, images\)"),
    ({"columns": {"picture": "img_path"}}, r"trial\.data\.columns\.picture: unknown role"),
])
def test_bad_mapping_is_one_line_naming_the_column(tmp_path: Path, data: dict, message: str) -> None:
    root = own_csv(tmp_path / "ours")
    with pytest.raises(UserError, match=message) as caught:
        VQA(data={"path": str(root), **data}).load_split("train")
    assert "\n" not in str(caught.value)


def test_bad_answer_type_value_names_column_and_row(tmp_path: Path) -> None:
    root = own_csv(tmp_path / "ours")
    text = (root / "train.csv").read_text().replace(",Open,", ",maybe,", 1)
    (root / "train.csv").write_text(text)
    with pytest.raises(UserError, match=r"train\.csv line 4: column 'kind' \(answer_type\) holds 'maybe'; "
                                        r"expected CLOSED or OPEN"):
        VQA(data={**OWN, "path": str(root)}).load_split("train")


def test_generic_task_needs_data() -> None:
    with pytest.raises(UserError, match="task vqa: trial.data must name the data"):
        get_task("vqa")


def test_a_bad_mapping_in_a_space_fails_the_cli_before_anything_starts(tmp_path: Path) -> None:
    """`runner tune` checks the data on the driver first: exit 2, one line, no sweep state, no MLflow store."""
    root = own_csv(tmp_path / "ours")
    space = tmp_path / "ours.yaml"
    space.write_text(f"""name: ours
trial: {{task: vqa, model: tiny, precision: fp32, data: {{path: {root}, columns: {{image: picture}}}}}}
space: {{lora_rank: {{choice: [4]}}}}
storage_path: {tmp_path / 'ray'}
tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}
""")
    result = CliRunner().invoke(main, ["tune", str(space)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0 and "no column 'picture' (image)" in result.stderr
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


# --- large datasets stay cheap -------------------------------------------------------------------


def test_images_are_decoded_only_when_used_and_keyed_once_per_node(tmp_path: Path, monkeypatch) -> None:
    """A second load of the same data (the next trial) decodes no image; a split holds no decoded image."""
    import tasks.common

    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "node-cache"))  # a node that has not seen these images
    root = path_vqa_copy(tmp_path / "pvqa")
    decoded = []
    real = tasks.common.decode_image
    monkeypatch.setattr(tasks.common, "decode_image", lambda data, record: decoded.append(record) or real(data, record))
    PathVQA(data=str(root)).load_split("train")
    assert len(decoded) == 6 + 3  # each distinct image once (train and validation)
    decoded.clear()
    split = PathVQA(data=str(root)).load_split("train")  # a new task object: as in the next trial
    assert decoded == []
    assert len(split.images) == 6 and next(iter(split.images.values())).size == (24, 16)
