"""VQA-RAD: radiology visual question answering (Lau et al. 2018), the task the sweeps tune on.

`flaviagiammarino/vqa-rad` on the hub: columns image (a datasets Image), question, answer; train
1,793 / test 451 (2,244 questions about 314 images); CC0. It has no answer-type column: a question
is closed when its answer is yes/no. `data` takes everything `tasks.vqa` reads (a local copy in the
hub layout, another hub copy or revision, a mapping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tasks.vqa import VQA

HUB_ID = "flaviagiammarino/vqa-rad"
# The hub dataset has no release tags, so the default follows its latest commit. To pin the data
# of a study, pass data="flaviagiammarino/vqa-rad@<commit sha>" (`runner fetch vqa_rad` records it).
HUB_REVISION = "main"


@dataclass
class VQARad(VQA):
    """The VQA-RAD task, from the hub or a local copy."""

    name: ClassVar[str] = "vqa_rad"
    label: ClassVar[str] = "VQA-RAD"
    hub_id: ClassVar[str] = HUB_ID
    hub_revision: ClassVar[str] = HUB_REVISION
    benchmark: ClassVar[str] = "VQA-RAD"
