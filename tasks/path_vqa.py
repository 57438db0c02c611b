"""Path-VQA: pathology visual question answering (He et al. 2020).

`flaviagiammarino/path-vqa` on the hub: parquet files with columns image (a datasets Image),
question, answer; train 19,654 / validation 6,259 / test 6,719 questions about ~5,000 images, a
validation split of its own (used as is, not carved). No answer-type column: closed = yes/no answer.
MIT card; the images' rights stay with their publishers. About 10x VQA-RAD: see
search_spaces/path_vqa.yaml for what a trial costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tasks.vqa import VQA

HUB_ID = "flaviagiammarino/path-vqa"
# No release tags. The commit another public medical-VQA project pins (found 2026-12-02 by searching its
# code; the hub cannot be reached from here to confirm it). Another: data="flaviagiammarino/path-vqa@<commit>".
HUB_REVISION = "1685832883334b5bb5beaf4e4b333fdeecaa4ad9"


@dataclass
class PathVQA(VQA):
    """The Path-VQA task, from the hub or a local copy in its layout."""

    name: ClassVar[str] = "path_vqa"
    label: ClassVar[str] = "Path-VQA"
    hub_id: ClassVar[str] = HUB_ID
    hub_revision: ClassVar[str] = HUB_REVISION
    benchmark: ClassVar[str] = "Path-VQA"
