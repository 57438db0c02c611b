"""Copy the first N train / M test images of the easy_vqa package (and their questions) into a folder
in the package's layout, for machines that lack the package (the GPU host; a transfer is size-limited).

    python bench/easy_vqa_subset.py OUT_DIR [N_TRAIN_IMAGES] [N_TEST_IMAGES]
Then: runner train --task easy_vqa --data OUT_DIR ...
"""

import json
import shutil
import sys
from pathlib import Path

from tasks.easy_vqa import package_data


def copy_subset(out: Path, n_train: int, n_test: int) -> None:
    for split, n in (("train", n_train), ("test", n_test)):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        records = json.loads((package_data() / split / "questions.json").read_text())
        kept = [r for r in records if r[2] < n]
        for image_id in range(n):
            shutil.copy(package_data() / split / "images" / f"{image_id}.png", out / split / "images")
        (out / split / "questions.json").write_text(json.dumps(kept))
        print(f"{split}: {n} images, {len(kept)} questions")


if __name__ == "__main__":
    copy_subset(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 800,
                int(sys.argv[3]) if len(sys.argv) > 3 else 200)
