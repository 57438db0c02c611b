"""The report's reference table and axes, without MLflow: the published rows follow the swept dataset, the
sources are named as a reader would cite them, and the figures' ticks read well."""

from __future__ import annotations

import re

import matplotlib
import pytest

from runner.config import sweep_from_dict
from runner.report import log_ticks, reference_section

matplotlib.use("Agg")


def section(task: str, data=None) -> str:
    config = sweep_from_dict({"name": "s", "trial": {"task": task, "data": data},
                              "space": {"lora_rank": {"choice": [4]}}}, "test")
    return "\n".join(reference_section(config))


@pytest.mark.parametrize("task, title, rows", [
    ("vqa_rad", "Published VQA-RAD results", ["| Prior specialist SOTA | 71.03 | – |", "| PaLM-E 84B | 59.19 | 38.67 |",
                                              "| Med-PaLM M 562B | 71.27 | 62.06 |", "| BLIP-2 Flan-T5-XL LoRA | 26.16* |"]),
    ("slake", "Published Slake-VQA results", ["| Prior specialist SOTA | 78.60 | 78.10 |",
                                              "| Med-PaLM M 84B | 92.70 | 89.28 |", "| Med-PaLM M 562B | 91.64 | 87.50 |"]),
    ("path_vqa", "Published Path-VQA results", ["| PaLM-E 84B | 54.92 | 29.68 |", "| Med-PaLM M 12B | 68.97 | 57.24 |",
                                                "| Med-PaLM M 562B | 72.27 | 62.69 |"]),
])
def test_the_swept_datasets_table_2_rows(task: str, title: str, rows: list[str]) -> None:
    text = section(task)
    assert title in text and "the Med-PaLM M paper's Table 2" in text
    for row in rows:
        assert row in text
    assert "arXiv:2307.14334, Table 2" in text
    assert "seed" not in text.lower()  # never an internal word for a source
    assert ("BLIP-2 VQA-RAD reproduction project" in text) == (task == "vqa_rad")
    assert text.count("| Med-PaLM M 12B |") == 1  # one dataset's rows only


def test_slake_says_which_languages() -> None:
    assert "questions in en + zh (bilingual, as Med-PaLM M)" in section("slake")
    assert "questions in en (Med-PaLM M used en + zh)" in section("slake", {"filter": {"q_lang": "en"}})


@pytest.mark.parametrize("task, data", [("easy_vqa", None), ("vqa", {"path": "/data/ours"})])
def test_a_task_that_is_none_of_them_gets_no_published_rows(task: str, data) -> None:
    text = section(task, data)
    assert "None shown" in text and "none of the datasets of the Med-PaLM M paper's Table 2" in text
    assert "|" not in text


def test_learning_rate_ticks_are_readable() -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.scatter([1e-4, 3e-4, 1e-3], [0.1, 0.2, 0.3])
    log_ticks(ax)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    plt.close(fig)
    assert labels and all(re.fullmatch(r"[125]e-\d", label) for label in labels), labels
    assert {"1e-4", "2e-4", "5e-4", "1e-3"} <= set(labels)


def test_the_parameter_figure_takes_a_text_parameter(tmp_path) -> None:
    """LoRA targets are text (`q,v`): the figure plots them as categories (a sweep over them crashed it)."""
    from types import SimpleNamespace

    from PIL import Image

    from runner.report import SweepRecord, draw_figures

    config = sweep_from_dict({"name": "s", "trial": {"task": "easy_vqa"}, "space": {
        "lora_rank": {"choice": [4, 8]}, "lora_targets": {"choice": ["q,v", "q,v,query,value"]}}}, "test")
    trials = [SimpleNamespace(info=SimpleNamespace(run_id=f"run{i}"), data=SimpleNamespace(
        params={"lora_rank": str(rank), "lora_targets": targets}, metrics={"best_val_exact_match": score},
        tags={})) for i, (rank, targets, score) in enumerate([(4, "q,v", 0.4), (8, "q,v,query,value", 0.7)])]
    histories = {run.info.run_id: {"val_exact_match": [(1, 0.4)], "train_loss": [(1, 1.0)]} for run in trials}
    figures = draw_figures(SweepRecord(parent=None, trials=trials, stages={}, histories=histories), config, [],
                           tmp_path)
    with Image.open(figures["metric vs parameters"]) as image:
        assert image.size[0] > 400
