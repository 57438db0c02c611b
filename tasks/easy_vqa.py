"""easy_vqa: the offline quick-start task (shapes and colours, 64x64 PNGs from the PyPI package).

The package ships train (38,575 questions about 4,000 images) and test (9,673 about 1,000).
Train and validation are carved from the package's train by image; test is the package's test.
Nothing is downloaded, so this task works on a machine without network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from runner.errors import UserError
from tasks.base import Split
from tasks.common import Row, VQATask, build_split


@dataclass
class EasyVQA(VQATask):
    """The easy_vqa task; `data` must stay None (the data is the installed package)."""

    name: ClassVar[str] = "easy_vqa"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is not None:
            raise UserError(
                f"task easy_vqa reads the installed easy_vqa package; data must not be set "
                f"(got {self.data!r})"
            )

    def _load_source(self, split: str) -> Split:
        import easy_vqa

        if split == "train":
            questions, answers, image_ids = easy_vqa.get_train_questions()
            paths = easy_vqa.get_train_image_paths()
        else:
            questions, answers, image_ids = easy_vqa.get_test_questions()
            paths = easy_vqa.get_test_image_paths()
        rows = (
            # A question whose image file is absent gets image=None: a bad image, named.
            Row(
                paths.get(image_id),
                question,
                answer,
                f"easy_vqa {split} question {index} (image {image_id})",
            )
            for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids))
        )
        return build_split(split, rows, skip_bad_images=self.skip_bad_images)
