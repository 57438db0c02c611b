"""Tests of the task modules: real image files of every common mode, every local VQA-RAD layout,
the validation carve, prompts, answer classes, the errors a user can cause, and easy_vqa."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.base
from runner.errors import UserError
from tasks import TASKS, get_task
from tasks.base import Example, decode_image, image_key
from tasks.common import (
    Row,
    build_split,
    carve_validation,
    is_closed,
    make_prompt,
    normalize_answer,
)
from tasks.easy_vqa import EasyVQA
from tasks.vqa_rad import HUB_ID, HUB_REVISION, VQARad

MODES = ("L", "RGB", "RGBA", "P", "I;16")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the datasets cache (parquet loads write arrow files) inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def make_image(mode: str, seed: int, size: tuple[int, int] = (24, 16)) -> Image.Image:
    """A small image of `mode` whose pixels depend on `seed` (so every seed is a new image)."""
    width, height = size
    ramp = np.add.outer(np.arange(height), np.arange(width)) + seed * 7
    if mode == "I;16":
        return Image.fromarray((ramp * 97 % 4000).astype(np.uint16))  # 12-bit range, like DICOM
    gray = Image.fromarray((ramp * 5 % 256).astype(np.uint8))
    if mode == "L":
        return gray
    rgb = Image.merge("RGB", (gray, gray.point(lambda v: 255 - v), gray.point(lambda v: v // 2)))
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.where(ramp % 2 == 0, 0, 255).astype(np.uint8)))
        return rgba
    palette = rgb.quantize(colors=16)
    palette.info["transparency"] = 0
    return palette


def write_image(path: Path, mode: str, seed: int) -> Path:
    make_image(mode, seed).save(path)
    return path


def records(n_images: int, per_image: int = 3) -> list[dict[str, str]]:
    """Records over n_images images (named img{i}.png), alternating closed and open questions."""
    out = []
    for i in range(n_images):
        for j in range(per_image):
            answer = ("yes", "no", f"organ {i}")[j % 3]
            question = f"q{j} about image {i}?"
            out.append({"image": f"img{i}.png", "question": question, "answer": answer})
    return out


def image_folder(folder: Path, train: int = 10, test: int = 4, form: str = "json") -> Path:
    """An image folder with train.json/test.json (or .csv); images cycle through MODES."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(train + test):
        write_image(folder / f"img{i}.png", MODES[i % len(MODES)], seed=i)
    splits = {"train": records(train), "test": [
        {**r, "image": f"img{int(r['image'][3:-4]) + train}.png"} for r in records(test)
    ]}
    for split, rows in splits.items():
        write_table(folder / f"{split}.{form}", rows)
    return folder


def write_table(path: Path, rows: list[dict[str, str]]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
        return
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def hub_dataset(n_images: int, offset: int = 0) -> datasets.Dataset:
    """A Dataset in the hub schema (image as a datasets Image holding PNG bytes)."""
    rows = records(n_images)
    images = {}
    for i in range(n_images):
        buffer = io.BytesIO()
        make_image(MODES[i % len(MODES)], seed=i + offset).save(buffer, format="PNG")
        images[f"img{i}.png"] = {"bytes": buffer.getvalue(), "path": f"img{i}.png"}
    table = {
        "image": [images[r["image"]] for r in rows],
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
    }
    return datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())


def check_task(task: VQARad, n_train_images: int = 10, n_test_images: int = 4) -> None:
    """All three splits load, RGB, with the expected sizes and an image-disjoint carve."""
    train, val, test = (task.load_split(s) for s in ("train", "validation", "test"))
    assert len(val.images) == round(0.1 * n_train_images) or len(val.images) == 1
    assert len(train.images) + len(val.images) == n_train_images
    assert len(train.examples) + len(val.examples) == 3 * n_train_images
    assert not set(train.images) & set(val.images)
    assert len(test.images) == n_test_images and len(test.examples) == 3 * n_test_images
    for split in (train, val, test):
        assert {ex.image_key for ex in split.examples} == set(split.images)
        assert all(image.mode == "RGB" for image in split.images.values())
        assert split.skipped == 0


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_loads_as_rgb(tmp_path: Path, mode: str) -> None:
    path = write_image(tmp_path / "x.png", mode, seed=1)
    with Image.open(path) as opened:
        assert opened.mode.startswith(mode[0])  # really written in that mode (I;16 may read as I)
    image = decode_image(str(path), "rec")
    assert image.mode == "RGB" and image.size == (24, 16)
    assert decode_image(path.read_bytes(), "rec").tobytes() == image.tobytes()


def test_16bit_is_scaled_to_full_range(tmp_path: Path) -> None:
    image = decode_image(str(write_image(tmp_path / "x.png", "I;16", seed=0)), "rec")
    pixels = np.asarray(image)
    assert pixels.min() == 0 and pixels.max() == 255  # not clipped to white, not all black
    assert 60 < pixels.mean() < 200
    ramp = np.linspace(-3.0, 5.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "float.tif")  # mode F, e.g. a scaled DICOM export
    pixels = np.asarray(decode_image(str(tmp_path / "float.tif"), "rec"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    source = make_image("RGBA", seed=0)
    image = decode_image(str(write_image(tmp_path / "rgba.png", "RGBA", seed=0)), "rec")
    transparent = np.asarray(source)[..., 3] == 0
    assert transparent.any() and (np.asarray(image)[transparent] == 255).all()  # not black
    # The opaque colours never contain white, so white can only come from the transparent index.
    image = decode_image(str(write_image(tmp_path / "p.png", "P", seed=0)), "rec")
    assert (255, 255, 255) in {colour for _, colour in image.getcolors(maxcolors=10_000)}


def test_same_picture_in_two_files_is_one_image(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.png", "RGB", seed=3)
    b = tmp_path / "b.bmp"
    make_image("RGB", seed=3).save(b)
    assert a.read_bytes() != b.read_bytes()
    split = build_split("train", [Row(str(a), "q1", "yes", "r0"), Row(str(b), "q2", "no", "r1")],
                        skip_bad_images=False)
    assert len(split.images) == 1 and len(split.examples) == 2


# --- prompts and answers ------------------------------------------------------------------------


def test_normalize_answer_is_gentle() -> None:
    assert normalize_answer("  Left   Lung. ") == "left lung"
    assert normalize_answer("The X-ray, AP view") == "the x-ray, ap view"  # articles/commas kept
    assert normalize_answer("3.5") == "3.5"


def test_closed_and_open() -> None:
    assert is_closed("Yes") and is_closed(" no. ") and is_closed("YES")
    assert not is_closed("left") and not is_closed("yes, left") and not is_closed("")
    task = get_task("vqa_rad")
    assert task.is_closed(Example("k", "q?", "No")) and not task.is_closed(Example("k", "q?", "liver"))
    # The dataset's own answer type wins over the answer's form.
    assert task.is_closed(Example("k", "q?", "liver", closed=True))
    assert not task.is_closed(Example("k", "q?", "yes", closed=False))


def test_prompts() -> None:
    task = get_task("easy_vqa")
    assert task.prompt("What colour is the shape?") == "Question: What colour is the shape? Answer:"
    exemplar = Example(image_key="k", question="Is there a circle?", answer="Yes.")
    assert task.prompt("Is it red?", exemplar) == (
        "Question: Is there a circle? Answer: yes. Question: Is it red? Answer:"
    )


# --- validation carve ---------------------------------------------------------------------------


def test_carve_is_by_image_deterministic_and_disjoint() -> None:
    examples = [Example(f"img{i:02d}", f"q{j}", "yes") for i in range(40) for j in range(i % 4 + 1)]
    train, val = carve_validation(examples, 0.25, seed=0)
    train_keys, val_keys = {e.image_key for e in train}, {e.image_key for e in val}
    assert len(val_keys) == 10 and len(train_keys) == 30 and not train_keys & val_keys
    assert sorted(train + val, key=examples.index) == examples  # nothing lost or duplicated
    assert carve_validation(list(reversed(examples)), 0.25, seed=0)[1] == list(reversed(val))
    assert carve_validation(examples, 0.25, seed=1)[1] != val
    assert len({e.image_key for e in carve_validation(examples, 0.001, seed=0)[1]}) == 1


def test_carve_rejects_bad_fraction_and_too_few_images() -> None:
    with pytest.raises(UserError, match="val_fraction"):
        get_task("easy_vqa", val_fraction=1.0)
    with pytest.raises(UserError, match="1 image"):
        carve_validation([Example("a", "q", "yes")], 0.5, seed=0)


# --- VQA-RAD layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["json", "csv"])
def test_image_folder(tmp_path: Path, form: str) -> None:
    check_task(VQARad(data=str(image_folder(tmp_path / "rad", form=form))))


def test_hub_schema_parquet_folder(tmp_path: Path) -> None:
    folder = tmp_path / "snapshot" / "data"
    folder.mkdir(parents=True)
    hub_dataset(10).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    hub_dataset(4, offset=100).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    check_task(get_task("vqa_rad", data=str(tmp_path / "snapshot")))


def test_raw_bytes_parquet_file(tmp_path: Path) -> None:
    rows = records(6)
    png = {}
    for i in range(6):
        path = write_image(tmp_path / f"img{i}.png", MODES[i % len(MODES)], seed=i)
        png[path.name] = path.read_bytes()
    table = pa.table({
        "image": [png[r["image"]] for r in rows],
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
    })
    pq.write_table(table, tmp_path / "train.parquet")
    task = VQARad(data=str(tmp_path / "train.parquet"), val_fraction=0.5)
    assert len(task.load_split("train").images) == 3
    assert len(task.load_split("validation").images) == 3
    with pytest.raises(UserError, match="holds only the train split"):
        task.load_split("test")


def test_save_to_disk_folder(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=hub_dataset(10), test=hub_dataset(4, offset=100)).save_to_disk(
        str(saved)
    )
    check_task(VQARad(data=str(saved)))


def test_loaded_splits_are_cached_and_fingerprinted(tmp_path: Path) -> None:
    data = str(image_folder(tmp_path / "rad"))
    task = VQARad(data=data)
    assert task.load_split("train") is task.load_split("train")
    again = VQARad(data=data).load_split("validation")
    assert again.fingerprint == task.load_split("validation").fingerprint
    assert VQARad(data=data, seed=5).load_split("validation").fingerprint != again.fingerprint


# --- errors -------------------------------------------------------------------------------------


def test_unknown_task_and_split() -> None:
    with pytest.raises(UserError, match=r"'nope'.*easy_vqa, path_vqa, slake, vqa, vqa_rad"):
        get_task("nope")
    with pytest.raises(UserError, match="'dev'"):
        get_task("easy_vqa").load_split("dev")
    assert set(TASKS) == {"easy_vqa", "vqa_rad", "slake", "path_vqa", "vqa"}
    task = get_task("vqa_rad", data="d", skip_bad_images=True, val_fraction=0.2, seed=3)
    assert task == VQARad(data="d", skip_bad_images=True, val_fraction=0.2, seed=3)
    assert isinstance(get_task("easy_vqa"), EasyVQA) and get_task("easy_vqa").name == "easy_vqa"


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(UserError, match=f"not found: {missing}"):
        VQARad(data=str(missing)).load_split("train")


def test_folder_without_data(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no data for split train"):
        VQARad(data=str(tmp_path)).load_split("train")


def test_missing_columns_are_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [b"x"], "query": ["q"]}), tmp_path / "train-0.parquet")
    with pytest.raises(UserError, match=r"train-0\.parquet: no column 'question' \(question\), 'answer' \(answer\) "
                                        r"\(has: image, query\)"):
        VQARad(data=str(tmp_path)).load_split("train")

    folder = image_folder(tmp_path / "csv", form="csv")
    write_table(folder / "train.csv", [{"image": "img0.png", "question": "q"}])
    with pytest.raises(UserError, match=r"train\.csv: no column 'answer' \(answer\)"):
        VQARad(data=str(folder)).load_split("train")

    folder = image_folder(tmp_path / "json")
    write_table(folder / "train.json", [{"image": "img0.png", "question": "q", "answer": "yes"},
                                        {"image": "img0.png", "answer": "yes"}])
    with pytest.raises(UserError, match=r"train\.json record 1: missing column 'question'"):
        VQARad(data=str(folder)).load_split("train")


def test_image_column_without_images(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [1], "question": ["q"], "answer": ["a"]}),
                   tmp_path / "train.parquet")
    with pytest.raises(UserError, match=r"train\.parquet: column 'image' \(image\) does not hold images"):
        VQARad(data=str(tmp_path)).load_split("train")


def test_corrupt_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "train-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"train-0\.parquet: cannot read as parquet"):
        VQARad(data=str(tmp_path)).load_split("train")


def test_bad_json(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "rad")
    (folder / "train.json").write_text('[{"image": "img0.png",')
    with pytest.raises(UserError, match=r"train\.json: cannot read"):
        VQARad(data=str(folder)).load_split("train")


def corrupt_folder(tmp_path: Path) -> Path:
    """10 train images, of which img2 is truncated, img5 zero bytes and img7 missing."""
    folder = image_folder(tmp_path / "rad")
    data = (folder / "img2.png").read_bytes()
    (folder / "img2.png").write_bytes(data[: len(data) // 2])
    (folder / "img5.png").write_bytes(b"")
    (folder / "img7.png").unlink()
    return folder


@pytest.mark.parametrize("image, why", [(2, "truncated"), (5, "cannot identify"), (7, "No such")])
def test_bad_image_names_the_record(tmp_path: Path, image: int, why: str) -> None:
    folder = corrupt_folder(tmp_path)
    # Keep img0, img1 and one bad image, so the error must come from that one.
    rows = [r for r in records(10) if r["image"] in {"img0.png", "img1.png", f"img{image}.png"}]
    write_table(folder / "train.json", rows)
    # records 0-5 are about img0 and img1; record 6 is the first about the bad image
    with pytest.raises(UserError, match=rf"train\.json record 6 \(img{image}\.png\): cannot read image: .*{why}"):
        VQARad(data=str(folder)).load_split("train")


def test_skip_bad_images_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    task = VQARad(data=str(corrupt_folder(tmp_path)), skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        train = task.load_split("train")
    validation = task.load_split("validation")
    assert train.skipped == 9  # 3 bad images x 3 questions
    assert len(train.images) + len(validation.images) == 7
    assert "skipped 9 records" in caplog.text


def test_image_over_the_pixel_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.base, "MAX_IMAGE_PIXELS", 200)  # a 24x16 image has 384
    folder = image_folder(tmp_path / "rad")
    with pytest.raises(UserError, match=r"train\.json record 0 \(img0\.png\): image is 24x16 pixels"):
        VQARad(data=str(folder)).load_split("train")
    skipping = VQARad(data=str(folder), skip_bad_images=True)
    with pytest.raises(UserError, match="from 0 image"):
        skipping.load_split("train")  # everything skipped: nothing left to carve


@pytest.mark.parametrize("field, value", [("answer", ""), ("answer", "  "), ("question", None)])
def test_empty_question_or_answer(tmp_path: Path, field: str, value: str | None) -> None:
    folder = image_folder(tmp_path / "rad")
    rows = records(10)
    rows[4][field] = value
    write_table(folder / "train.json", rows)
    with pytest.raises(UserError, match=rf"train\.json record 4: empty or missing {field}"):
        VQARad(data=str(folder), skip_bad_images=True).load_split("train")


def test_duplicates_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = image_folder(tmp_path / "rad")
    rows = records(10)
    write_table(folder / "train.json", rows + rows[:2] + [{**rows[0], "answer": "maybe"}])
    task = VQARad(data=str(folder))
    with caplog.at_level(logging.WARNING):
        train = task.load_split("train")
    assert train.skipped == 2
    assert len(train.examples) + len(task.load_split("validation").examples) == 31
    assert "dropped 2 exact duplicate records" in caplog.text


def test_easy_vqa_reads_a_folder_in_the_package_layout(tmp_path: Path) -> None:
    for split, colour in (("train", "red"), ("test", "blue")):
        (tmp_path / split / "images").mkdir(parents=True)
        for image_id in range(3):
            Image.new("RGB", (8, 8), (image_id * 80, 0, 0)).save(tmp_path / split / "images" / f"{image_id}.png")
        records = [[f"is there a {colour} shape?", "yes", i] for i in range(3)]
        (tmp_path / split / "questions.json").write_text(json.dumps(records))
    task = get_task("easy_vqa", data=str(tmp_path), val_fraction=0.34)
    train, validation, test = (task.load_split(s) for s in ("train", "validation", "test"))
    assert (len(train.examples), len(validation.examples), len(test.examples)) == (2, 1, 3)
    assert test.examples[0].question == "is there a blue shape?"


def test_easy_vqa_folder_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="questions.json not found"):
        get_task("easy_vqa", data=str(tmp_path)).load_split("test")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "questions.json").write_text(json.dumps([["what shape?", "circle", 7]]))
    with pytest.raises(UserError, match=r"question 0 \(image 7\)"):
        get_task("easy_vqa", data=str(tmp_path)).load_split("test")


# --- easy_vqa -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy_vqa_splits() -> dict[str, tasks.base.Split]:
    task = get_task("easy_vqa")
    return {split: task.load_split(split) for split in ("train", "validation", "test")}


def test_easy_vqa_counts(easy_vqa_splits: dict[str, tasks.base.Split]) -> None:
    train, val, test = (easy_vqa_splits[s] for s in ("train", "validation", "test"))
    assert len(train.examples) + len(val.examples) == 38_575
    assert len(train.images) + len(val.images) == 4_000
    assert len(val.images) == 400 and not set(train.images) & set(val.images)
    assert len(test.examples) == 9_673 and len(test.images) == 1_000
    assert train.skipped == val.skipped == test.skipped == 0
    image = next(iter(train.images.values()))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image_key(image) in train.images
    assert any(is_closed(ex.answer) for ex in test.examples)
    assert make_prompt(train.examples[0].question).startswith("Question: ")


def test_hub_id_and_revision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub path: `snapshot_download` faked with a folder in the hub's layout (no network here)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs["revision"], kwargs["repo_type"]))
        folder = tmp_path / repo_id.replace("/", "--") / "data"
        if not folder.exists():
            folder.mkdir(parents=True)
            hub_dataset(10).to_parquet(folder / "train-00000-of-00001.parquet")
            hub_dataset(4, offset=100).to_parquet(folder / "test-00000-of-00001.parquet")
        return str(folder.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    check_task(VQARad())
    assert calls == [(HUB_ID, HUB_REVISION, "dataset")]  # one snapshot, read for every split
    VQARad(data="someone/vqa-rad-copy@0123abc").load_split("test")
    assert calls[-1] == ("someone/vqa-rad-copy", "0123abc", "dataset")


def test_hub_unreachable_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real `snapshot_download`, offline (as on an air-gapped cluster with nothing fetched)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"cannot get dataset owner/offline@main from the hub .*runner fetch"):
        VQARad(data="owner/offline").load_split("train")
