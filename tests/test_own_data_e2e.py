"""Bring your own data, end to end: one trial on each dataset layout through the real CLI (`runner train`,
in-process, no Ray: seconds each). The real sweep on a team's own CSV (Ray Tune, Train workers, MLflow,
promotion, the report, the column mapping, answer-type column and filter from the space file) is the
two-node cluster's: tests/test_multinode.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from tests.test_own_data import path_vqa_copy, slake_copy

pytestmark = pytest.mark.slow

TRIAL = ["--model", "tiny", "--precision", "fp32", "--n-samples", "8", "--batch-size", "4", "--epochs", "1",
         "--max-eval-examples", "6", "--eval-batch-size", "6"]


@pytest.mark.parametrize("task, layout", [("slake", slake_copy), ("path_vqa", path_vqa_copy)])
def test_one_trial_on_each_layout(tiny_model, tmp_path: Path, task: str, layout) -> None:
    data = layout(tmp_path / task)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--task", task, "--data", str(data), *TRIAL, "--output", str(out)])
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    metrics = json.loads((out / "epoch-001" / "metrics.json").read_text())[-1]
    for key in ("val_closed_accuracy", "val_open_recall", "val_bleu1", "val_token_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
