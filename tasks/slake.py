"""SLAKE: a bilingual (English/Chinese) medical VQA dataset (Liu et al., ISBI 2021), cc-by-4.0.

`BoKelvin/SLAKE` on the hub: `train.json` / `validation.json` / `test.json` (lists of records with
`img_name` — a path inside `imgs.zip` —, `question`, `answer`, `q_lang` en/zh, `answer_type`
OPEN/CLOSED, `modality`, `location`, ...) next to `imgs.zip`. Med-PaLM M used the bilingual set
(train 9,849 / validation 2,109 / test 2,070), which is the default here; English only is
`data: {filter: {q_lang: en}}` (the report then says the data differs from the paper's).
Closed/open comes from SLAKE's own `answer_type`, not from the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tasks.vqa import VQA, DataSpec

HUB_ID = "BoKelvin/SLAKE"
# No release tags. The commit other public medical-VQA projects pin (found 2026-12-02 by searching their code;
# the hub itself cannot be reached from here to confirm it). Another: data="BoKelvin/SLAKE@<commit>" or @main.
HUB_REVISION = "a9083ce6c34ac3ffb17671a605962924d8a8f9e9"


@dataclass
class Slake(VQA):
    """The SLAKE task (both languages unless filtered), from the hub or a local copy in its layout."""

    name: ClassVar[str] = "slake"
    label: ClassVar[str] = "SLAKE"
    hub_id: ClassVar[str] = HUB_ID
    hub_revision: ClassVar[str] = HUB_REVISION
    hub_files: ClassVar[tuple[str, ...]] = ("*.json", "imgs.zip", "README.md")  # not KG.zip, masks
    defaults: ClassVar[DataSpec] = DataSpec(columns={"image": "img_name", "answer_type": "answer_type"},
                                            images="imgs.zip")
    benchmark: ClassVar[str] = "Slake-VQA"

    def describe(self) -> str:
        languages = self.spec.filter.get("q_lang", ("en", "zh"))
        note = "bilingual, as Med-PaLM M" if set(languages) == {"en", "zh"} else "Med-PaLM M used en + zh"
        return f"{super().describe()}; questions in {' + '.join(languages)} ({note})"
