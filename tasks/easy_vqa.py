"""easy_vqa: the offline quick-start task (shapes and colours, 64x64 PNGs from the PyPI package).

The package ships train (38,575 questions about 4,000 images) and test (9,673 about 1,000).
Train and validation are carved from the package's train by image; test is the package's test.
Nothing is downloaded, so this task works on a machine without network.

`data` may name a folder laid out like the package's own `data/` (`train/questions.json`,
`train/images/<id>.png`, the same for `test/`): a subset to carry to a machine without the package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from runner.errors import UserError
from tasks.base import Split
from tasks.common import Row, VQATask, build_split


def package_data() -> Path:
    import easy_vqa

    return Path(easy_vqa.__file__).parent / "data"


@dataclass
class EasyVQA(VQATask):
    """The easy_vqa task; `data` None reads the installed easy_vqa package."""

    name: ClassVar[str] = "easy_vqa"

    def _load_source(self, split: str) -> Split | None:
        if split == "validation":
            return None  # carved from train
        if self.data is not None and not isinstance(self.data, str):
            raise UserError(f"trial.data: task easy_vqa takes a folder path, got {self.data!r}")
        root = Path(self.data) if self.data is not None else package_data()
        questions_file = root / split / "questions.json"
        if not questions_file.is_file():
            raise UserError(f"data: {questions_file} not found (expected the easy_vqa data layout)")
        try:
            records = json.loads(questions_file.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{questions_file}: not valid JSON: {error}") from error
        images = root / split / "images"  # joined as text below: a Path per question costs ~1 s a load
        rows = (
            # A question whose image file is absent is a bad image, named by its record.
            Row(f"{images}{os.sep}{image_id}.png", question, answer,
                f"easy_vqa {split} question {index} (image {image_id})")
            for index, (question, answer, image_id) in enumerate(records)
        )
        return build_split(split, rows, skip_bad_images=self.skip_bad_images)
